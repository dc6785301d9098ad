"""Data-parallel scaling: the same global sample budget with 1 and with 2 processes (torchrun, gloo, loopback).

For each case, the same training is launched with ``torchrun --standalone --nproc_per_node=P`` for P = 1 and 2.
Each process runs ``n_envs`` environments with ``n_steps / P`` steps each per rollout and a critic minibatch of
``batch_size / P``, so the global rollout, the global minibatch and the number of updates are the same at every
P: the runs do the same algorithm on the same amount of experience, and only the collection and the per-rank
share of the update are split. Every process uses one thread (``torch.set_num_threads(1)``) on this 2-core
machine. With 2 processes each case runs with both critic modes, ``distributed_critic="gather"`` (one all-gather
of every rank's critic data and one of the minibatch orders, then every rank runs the whole regression) and
``"gradients"`` (one all-reduce of the critic's gradient per minibatch); with 1 process the mode does nothing.

With ``--two-nodes``, each selected case (critic "gather") is also launched as two one-process "nodes" on this
machine, as two machines would be, over loopback: two concurrent ``python -m torch.distributed.run --nnodes=2
--node-rank=R --nproc_per_node=1 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT --rdzv-id=ID``.

Every process records the wall time of ``learn()``, the time inside ``train()`` (the update; the rest of
``learn()`` is collection), and saves its final flat parameters; the launcher hashes them (SHA-256 of the float32
bytes), checks that the ranks agree, and compares runs that should agree (two nodes against one node) or nearly
agree (the two critic modes). Rank 0 also reports the deterministic evaluation return after training (10
episodes) and the communication of one iteration (median over iterations of the all-reduces, all-gathers and
payload bytes per rank logged under ``distributed/``).

Each finished run goes into ``results/distributed.json``, keyed by case, processes, critic mode, launch kind and
budget, with the load average before it; runs already there are skipped, so an interrupted benchmark continues
where it stopped. ``report`` regenerates ``results/distributed.md`` from the JSON, with a model of what the
communication would cost across machines next to the loopback latency measured by ``allreduce_latency.py``.

    python benchmarks/distributed.py                   # all cases, 1 and 2 processes, both critic modes
    python benchmarks/distributed.py --cases pendulum-256 --two-nodes
    python benchmarks/distributed.py report            # results/distributed.json -> results/distributed.md
    python benchmarks/distributed.py --cases cartpole --timesteps 20000
"""

import argparse
import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
OUT_MD = RESULTS / "distributed.md"
OUT_JSON = RESULTS / "distributed.json"
LATENCY_MD = RESULTS / "allreduce_latency.md"
#: final parameters of every run (rank 0), kept between invocations so that a resumed benchmark can still compare
PARAMS_CACHE = Path(tempfile.gettempdir()) / "sb3_trpo_distributed_benchmark"
CRITIC_MODES = ("gather", "gradients")
ONE_NODE, TWO_NODES = "one node", "two nodes"
#: the cost model's network: per-collective latency (s) and bandwidth (bit/s)
LATENCIES = (50e-6, 500e-6)
BANDWIDTHS = (10e9, 100e9)

CASES: dict[str, dict[str, Any]] = {
    # CartPole with the default hyperparameters: a cheap environment, collection is mostly the policy's forward pass
    "cartpole": dict(env="CartPole-v1", n_envs=1, kwargs=dict(n_steps=2048, batch_size=128)),
    # the same task behind a 1 ms step, the case data parallelism is for: environments slower than the update
    "cartpole-slow-env": dict(env="CartPole-v1", n_envs=1, step_delay=1e-3, kwargs=dict(n_steps=2048, batch_size=128)),
    # MuJoCo-sized policy and rl-zoo3's MuJoCo settings on Pendulum (Box actions, 256 x 256 networks):
    # an update-heavy case, where the ranks split the update's arithmetic
    "pendulum-256": dict(
        env="Pendulum-v1",
        n_envs=2,
        kwargs=dict(
            n_steps=1024, batch_size=128, gamma=0.9, cg_max_steps=25, n_critic_updates=20,
            policy_kwargs=dict(net_arch=dict(pi=[256, 256], vf=[256, 256])),
        ),
    ),
}  # fmt: skip


class SlowStep(gym.Wrapper):
    """Adds a fixed delay to every step, standing in for an expensive simulator."""

    def __init__(self, env: gym.Env, delay: float) -> None:
        super().__init__(env)
        self.delay = delay

    def step(self, action: Any) -> Any:
        time.sleep(self.delay)
        return self.env.step(action)


def run_key(case: str, processes: int, critic: str, launch: str, timesteps: int) -> str:
    """The JSON key of one run."""
    return f"{case} | {processes} processes | critic {critic} | {launch} | {timesteps} steps"


def worker(case_name: str, timesteps: int, critic: str, out: Path) -> None:
    """One process of a torchrun launch: train, save the final flat parameters, write the measurements as JSON."""
    import torch as th
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    from sb3_trpo import TRPO

    th.set_num_threads(1)
    case = CASES[case_name]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    kwargs = dict(case["kwargs"])
    kwargs["n_steps"] //= world_size  # the same global rollout and minibatch at every world size
    kwargs["batch_size"] //= world_size
    if world_size > 1:
        kwargs["distributed_critic"] = critic
    delay = case.get("step_delay")
    wrapper = (lambda env: SlowStep(env, delay)) if delay else None
    env = make_vec_env(case["env"], n_envs=case["n_envs"], wrapper_class=wrapper)
    model = TRPO("MlpPolicy", env, seed=0, distributed=True, **kwargs)

    logged: list[dict[str, float]] = []
    update_s: list[float] = []
    train = model.train

    def timed_train() -> None:
        start = time.perf_counter()
        train()
        update_s.append(time.perf_counter() - start)
        logged.append({k: v for k, v in model.logger.name_to_value.items() if k.startswith("distributed/")})

    model.train = timed_train  # type: ignore[method-assign]
    start = time.perf_counter()
    model.learn(timesteps)
    wall = time.perf_counter() - start
    params = th.cat([p.detach().reshape(-1) for p in model.policy.parameters()]).numpy()
    np.save(out / f"params-rank{rank}.npy", params)

    def per_iteration(name: str) -> float:
        return float(np.median([x.get(f"distributed/{name}", 0) for x in logged]))

    result: dict[str, Any] = {
        "rank": rank,
        "processes": world_size,
        "timesteps": model.num_timesteps,
        "updates": model._n_updates,
        "wall_s": wall,
        "update_s": float(np.sum(update_s)),
        "collection_s": wall - float(np.sum(update_s)),
        "update_ms_median": float(np.median(update_s) * 1e3),
        "steps_per_s": model.num_timesteps / wall,
        "all_reduces_per_iteration": per_iteration("all_reduces"),
        "all_gathers_per_iteration": per_iteration("all_gathers"),
        "bytes_per_iteration": per_iteration("bytes_reduced"),
        "actor_parameters": model._actor_view.size,
        "parameters": int(params.size),
    }
    if rank == 0:
        # deterministic evaluation after training, on a fresh environment (without the delay: same dynamics)
        evaluation = evaluate_policy(model, make_vec_env(case["env"], seed=1000), n_eval_episodes=10)
        result["final_return"] = float(evaluation[0])
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def free_port() -> int:
    """:return: a loopback TCP port nothing listens on (for the rendezvous endpoint)"""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch_commands(case: str, processes: int, critic: str, launch: str, timesteps: int, out: Path) -> list[list[str]]:
    """The torchrun command(s) of one run: one for a single node, one per node (started together) for two."""
    script = [__file__, "--worker", case, "--timesteps", str(timesteps), "--critic", critic, "--out", str(out)]
    run = [sys.executable, "-m", "torch.distributed.run"]
    if launch == ONE_NODE:
        return [[*run, "--standalone", f"--nproc_per_node={processes}", *script]]
    rendezvous = [f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={uuid.uuid4().hex}", "--rdzv-backend=c10d"]
    return [[*run, "--nnodes=2", f"--node-rank={node}", "--nproc_per_node=1", *rendezvous, *script] for node in range(2)]


def params_digest(params: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(params, dtype=np.float32).tobytes()).hexdigest()[:16]


def launch(case: str, processes: int, critic: str, launch_kind: str, timesteps: int) -> dict[str, Any]:
    """Run one configuration and return its record (rank 0's measurements, every rank's parameter digest)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        load = os.getloadavg()
        started = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for command in launch_commands(case, processes, critic, launch_kind, timesteps, out)
        ]
        try:
            for process in started:
                stdout, stderr = process.communicate(timeout=1800)
                if process.returncode != 0:
                    raise RuntimeError(f"{' '.join(process.args)} failed ({process.returncode}):\n{stdout}\n{stderr}")
        finally:
            for process in started:  # a failed node's partner would wait for its rendezvous
                if process.poll() is None:
                    process.kill()
                    process.wait()
        ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(processes)]
        record = ranks[0]
        params = [np.load(out / f"params-rank{rank}.npy") for rank in range(processes)]
        PARAMS_CACHE.mkdir(exist_ok=True)
        np.save(PARAMS_CACHE / f"{params_digest(params[0])}.npy", params[0])
        load_after = os.getloadavg()
    record.pop("rank")
    record.update(
        case=case,
        critic=critic if processes > 1 else "-",
        launch=launch_kind,
        budget=timesteps,
        params_sha256=[params_digest(p) for p in params],
        update_s_by_rank=[r["update_s"] for r in ranks],
        ranks_bit_identical=all(np.array_equal(params[0], p) for p in params),
        load_before=list(load),
        load_after=list(load_after),
        **versions(),
    )
    return record


def versions() -> dict[str, str]:
    import stable_baselines3
    import torch

    import sb3_trpo

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return dict(
        commit=commit,
        sb3_trpo=sb3_trpo.__version__,
        stable_baselines3=stable_baselines3.__version__,
        torch=torch.__version__,
        python=platform.python_version(),
        cores=str(os.cpu_count()),
    )


def load_results() -> dict[str, dict[str, Any]]:
    return json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}


def save_results(results: dict[str, dict[str, Any]]) -> None:
    """Write the JSON atomically: an interrupted write never loses the runs already finished."""
    tmp = OUT_JSON.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, OUT_JSON)


def max_abs_difference(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """:return: the largest absolute difference between two runs' final parameters (rank 0), if both are cached"""
    if a["params_sha256"][0] == b["params_sha256"][0]:
        return 0.0
    paths = [PARAMS_CACHE / f"{r['params_sha256'][0]}.npy" for r in (a, b)]
    if not all(p.exists() for p in paths):
        return None
    return float(np.max(np.abs(np.load(paths[0]).astype(np.float64) - np.load(paths[1]))))


def run(cases: list[str], processes: list[int], critics: list[str], two_nodes: bool, timesteps: int) -> None:
    plan = []
    for case in cases:
        for p in processes:
            for critic in critics if p > 1 else ["-"]:
                plan.append((case, p, critic, ONE_NODE))
        if two_nodes:
            plan.append((case, 2, "gather", TWO_NODES))
    for case, p, critic, launch_kind in plan:
        key = run_key(case, p, critic, launch_kind, timesteps)
        results = load_results()
        if key in results:
            print(f"skipped (in {OUT_JSON.name}): {key}", flush=True)
            continue
        print(f"running: {key}", flush=True)
        record = launch(case, p, "gather" if critic == "-" else critic, launch_kind, timesteps)
        results = load_results()  # re-read: nothing else should write it, but do not drop what is there
        results[key] = record
        # comparisons with the runs they should match, while both parameter sets are cached
        for other_critic, other_launch in (("gather", ONE_NODE), ("gradients", ONE_NODE), ("gather", TWO_NODES)):
            other_key = run_key(case, p, other_critic, other_launch, timesteps)
            if p > 1 and other_key in results and other_key != key:
                difference = max_abs_difference(record, results[other_key])
                if difference is not None:
                    record.setdefault("max_abs_param_difference", {})[other_key] = difference
        save_results(results)
        summary = {k: record[k] for k in ("wall_s", "update_s", "collection_s", "all_reduces_per_iteration")}
        print(json.dumps(summary), flush=True)


def loopback_latencies() -> dict[str, float]:
    """Median latencies (ms) of the latest run in results/allreduce_latency.md, by row name."""
    if not LATENCY_MD.exists():
        return {}
    text = LATENCY_MD.read_text(encoding="utf-8")
    last = re.split(r"^## Run \d+", text, flags=re.MULTILINE)[-1]
    rows = {}
    for line in last.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"[\d.]+", cells[2]):
            rows[cells[0]] = float(cells[2])
    return rows


def difference_between(results: dict[str, dict[str, Any]], a: str, b: str) -> float | None:
    """The recorded max |Δ| of the final parameters of runs ``a`` and ``b`` (0 when their digests are equal)."""
    ra, rb = results.get(a), results.get(b)
    if ra is None or rb is None:
        return None
    if ra["params_sha256"][0] == rb["params_sha256"][0]:
        return 0.0
    for x, y in ((ra, b), (rb, a)):
        if y in x.get("max_abs_param_difference", {}):
            return x["max_abs_param_difference"][y]
    return max_abs_difference(ra, rb)


def report(timesteps: int) -> str:
    results = {k: r for k, r in load_results().items() if r["budget"] == timesteps}
    order = {name: i for i, name in enumerate(CASES)}
    records = sorted(
        results.values(),
        key=lambda r: (order.get(r["case"], 99), r["processes"], r["launch"] != ONE_NODE, r["critic"]),
    )
    if not records:
        return "no results\n"
    commits = sorted({r["commit"] for r in records})
    first = records[0]
    lines = [
        f"# commit {', '.join(commits)}, sb3_trpo {first['sb3_trpo']}, stable-baselines3 {first['stable_baselines3']}, "
        f"torch {first['torch']}, python {first['python']}, {first['cores']} cores, gloo on loopback, 1 thread per process",
        "",
        "Generated by `python benchmarks/distributed.py report` from `results/distributed.json` (one run per row, one",
        f"seed; {timesteps:,} global steps, the same global rollout and critic minibatch at 1 and 2 processes). Update:",
        "the time inside `train()` (rank 0); collection: the rest of `learn()`. Communication: median per iteration of",
        "the collectives and their payload per rank (`distributed/*`), rollout agreement included. Load: the 1-minute",
        "load average just before the run (2 cores; another engineer's tests may have run meanwhile).",
        "",
        "| case | processes | critic | launch | wall (s) | update (s) | collection (s) | speed-up vs 1 process "
        "| all-reduces / it | all-gathers / it | bytes / it | final return | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["case"]: r for r in records if r["processes"] == 1}
    for r in records:
        b = base.get(r["case"])
        speed = f"{b['wall_s'] / r['wall_s']:.2f}x" if b else "-"
        lines.append(
            f"| {r['case']} | {r['processes']} | {r['critic']} | {r['launch']} | {r['wall_s']:.1f} | {r['update_s']:.1f} | "
            f"{r['collection_s']:.1f} | {speed} | {r['all_reduces_per_iteration']:g} | "
            f"{r['all_gathers_per_iteration']:g} | {r['bytes_per_iteration']:,.0f} | {r['final_return']:.1f} | "
            f"{r['load_before'][0]:.2f} |"
        )
    lines += ["", "Final parameters (rank 0; ranks within each run: " + _ranks_line(records) + "):", ""]
    for case in CASES:
        gather = run_key(case, 2, "gather", ONE_NODE, timesteps)
        for other, what in (
            (run_key(case, 2, "gather", TWO_NODES, timesteps), "two nodes vs one node, critic gather"),
            (run_key(case, 2, "gradients", ONE_NODE, timesteps), "critic gradients vs gather, one node"),
        ):
            if other in results and gather in results:
                difference = difference_between(results, gather, other)
                identical = results[gather]["params_sha256"][0] == results[other]["params_sha256"][0]
                detail = "" if difference is None else f", max abs difference {difference:.3g}"
                lines.append(f"- {case}, {what}: bit-identical: {'yes' if identical else 'no'}{detail}")
    lines += divergence_by_budget(load_results())
    lines += cost_model(records)
    return "\n".join(lines) + "\n"


def divergence_by_budget(results: dict[str, dict[str, Any]]) -> list[str]:
    """How far apart the two critic modes' final parameters end up, at every budget the JSON holds: the modes' updates
    differ by float rounding, and training feeds the difference back through the rollouts."""
    lines = []
    for case in CASES:
        budgets = sorted({r["budget"] for r in results.values() if r["case"] == case})
        cells = []
        for budget in budgets:
            keys = [run_key(case, 2, critic, ONE_NODE, budget) for critic in CRITIC_MODES]
            if all(key in results for key in keys):
                difference = difference_between(results, *keys)
                if difference is not None:
                    cells.append(f"{results[keys[0]]['updates']} update(s): {difference:.2g}")
        if len(cells) > 1:
            lines.append(f"- {case}: " + ", ".join(cells))
    if not lines:
        return []
    return [
        "",
        "Max abs difference between the final parameters of the two critic modes by number of updates (runs of",
        "every budget in the JSON; after one update they differ by float rounding only, and the difference grows",
        "through the feedback of training: different values, advantages, policy, rollouts):",
        "",
        *lines,
    ]


def _ranks_line(records: list[dict[str, Any]]) -> str:
    multi = [r for r in records if r["processes"] > 1]
    if all(r["ranks_bit_identical"] for r in multi):
        return "bit-identical in every run"
    return "differ in " + ", ".join(f"{r['case']} {r['critic']} {r['launch']}" for r in multi if not r["ranks_bit_identical"])


def cost_model(records: list[dict[str, Any]]) -> list[str]:
    """The section "What a multi-node user pays"."""
    loopback = loopback_latencies()
    scalar = next((ms for name, ms in loopback.items() if "2 scalars" in name), None)
    gathers = {name: ms for name, ms in loopback.items() if name.startswith("all-gather")}
    columns = [(lat, bw) for lat in LATENCIES for bw in BANDWIDTHS]
    lines = [
        "",
        "## What a multi-node user pays",
        "",
        "Communication per iteration modelled as `count × latency + 2 × bytes ÷ bandwidth`, in ms: count is the",
        "all-reduces plus all-gathers and bytes their payload per rank, from the 2-process counters above (a ring",
        "all-reduce sends and receives about twice its payload per rank as W grows; exactly once at W = 2). The",
        "loopback floor is `count ×` the median latency of the smallest all-reduce (2 floats) in the latest run of",
        "`allreduce_latency.py` on this machine"
        + (f" ({scalar:.3f} ms)" if scalar is not None else " (not measured yet)")
        + ": larger payloads take longer, and its medians have varied",
        "tenfold between runs on this VM. The last column is the measured `train()` time per iteration (median, ms).",
        "",
        "| case | critic | collectives / it | MB / it | "
        + " | ".join(f"{lat * 1e6:.0f} µs, {bw / 1e9:.0f} Gbit/s" for lat, bw in columns)
        + " | loopback floor (measured) | update / it (measured) |",
        "|---|---|---|---|" + "---|" * len(columns) + "---|---|",
    ]
    for r in records:
        if r["processes"] != 2 or r["launch"] != ONE_NODE:
            continue
        count = r["all_reduces_per_iteration"] + r["all_gathers_per_iteration"]
        payload = r["bytes_per_iteration"]
        modelled = [(count * lat + 2 * payload * 8 / bw) * 1e3 for lat, bw in columns]
        floor = f"{count * scalar:.1f}" if scalar is not None else "-"
        lines.append(
            f"| {r['case']} | {r['critic']} | {count:g} | {payload / 1e6:.2f} | "
            + " | ".join(f"{m:.1f}" for m in modelled)
            + f" | {floor} | {r['update_ms_median']:.0f} |"
        )
    if gathers:
        lines += ["", "The critic-gather collectives on loopback (latest run of `allreduce_latency.py`, median):", ""]
        lines += [f"- {name}: {ms:.3f} ms" for name, ms in gathers.items()]
    lines += [
        "",
        "At W = 2 the `2 × bytes` term is pessimistic by up to 2× (a rank sends its payload once); it is the large-W",
        "limit of a ring all-reduce. An all-gather's traffic per rank grows as (W − 1) × the rank's share instead, but",
        "the gathered critic data is small: on Pendulum 16,384 bytes of inputs and returns per rank plus 163,840 bytes",
        "of int64 minibatch orders (20 epochs × 1024), against about 6 MB of all-reduced vectors per iteration.",
    ]
    return lines


def main() -> None:
    global OUT_JSON, OUT_MD
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=["run", "report"], default="run")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--timesteps", type=int, default=49_152, help="global sample budget of every run")
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--critic", nargs="+", default=list(CRITIC_MODES), choices=CRITIC_MODES)
    parser.add_argument("--two-nodes", action="store_true", help="also run each case as two one-process nodes (gather)")
    parser.add_argument("--json", type=Path, default=OUT_JSON, help="results file (default: %(default)s)")
    parser.add_argument("--md", type=Path, default=OUT_MD, help="report file (default: %(default)s)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.timesteps, args.critic[0], args.out)
        return
    OUT_JSON, OUT_MD = args.json, args.md
    if args.command == "run":
        run(args.cases, args.processes, args.critic, args.two_nodes, args.timesteps)
    text = report(args.timesteps)
    OUT_MD.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
