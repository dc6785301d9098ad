"""Data-parallel scaling: the same global sample budget with 1 and with 2 processes (torchrun, gloo, loopback).

For each case, the same training is launched with ``torchrun --nproc_per_node=P`` for P = 1 and 2. Each process
runs ``n_envs`` environments with ``n_steps / P`` steps each per rollout and a critic minibatch of
``batch_size / P``, so the global rollout, the global minibatch and the number of updates are the same at every
P: the runs do the same algorithm on the same amount of experience, and only the collection and the per-rank
share of the update are split. Every process uses one thread (``torch.set_num_threads(1)``) on this 2-core
machine. Rank 0 reports the wall time of ``learn()``, the global steps per second, the deterministic evaluation
return after training (10 episodes), and the all-reduces of one iteration (count and payload bytes, as logged
under ``distributed/``).

    python benchmarks/distributed.py                  # all cases, prints and writes results/distributed.md
    python benchmarks/distributed.py --cases cartpole --timesteps 20000
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.md"

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


def worker(case_name: str, timesteps: int, out: Path) -> None:
    """One process of a torchrun launch: train, and on rank 0 write the measurements as JSON."""
    import torch as th
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    from sb3_trpo import TRPO

    th.set_num_threads(1)
    case = CASES[case_name]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    kwargs = dict(case["kwargs"])
    kwargs["n_steps"] //= world_size  # the same global rollout and minibatch at every world size
    kwargs["batch_size"] //= world_size
    delay = case.get("step_delay")
    wrapper = (lambda env: SlowStep(env, delay)) if delay else None
    env = make_vec_env(case["env"], n_envs=case["n_envs"], wrapper_class=wrapper)
    model = TRPO("MlpPolicy", env, seed=0, distributed=True, **kwargs)

    logged: list[dict[str, float]] = []
    train = model.train

    def train_and_record() -> None:
        train()
        logged.append({k: v for k, v in model.logger.name_to_value.items() if k.startswith("distributed/")})

    model.train = train_and_record  # type: ignore[method-assign]
    start = time.perf_counter()
    model.learn(timesteps)
    wall = time.perf_counter() - start
    if model._replica.is_main:
        result = {
            "case": case_name,
            "processes": world_size,
            "timesteps": model.num_timesteps,
            "updates": model._n_updates,
            "wall_s": wall,
            "steps_per_s": model.num_timesteps / wall,
            # deterministic evaluation after training, on a fresh environment (without the delay: same dynamics)
            "final_return": float(evaluate_policy(model, make_vec_env(case["env"], seed=1000), n_eval_episodes=10)[0]),
            "all_reduces_per_iteration": float(np.median([x.get("distributed/all_reduces", 0) for x in logged])),
            "bytes_per_iteration": float(np.median([x.get("distributed/bytes_reduced", 0) for x in logged])),
            "actor_parameters": model._actor_view.size,
            "parameters": sum(p.numel() for p in model.policy.parameters()),
        }
        (out / f"{case_name}-{world_size}.json").write_text(json.dumps(result))


def launch(case: str, processes: int, timesteps: int, out: Path) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        __file__, "--worker", case, "--timesteps", str(timesteps), "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads((out / f"{case}-{processes}.json").read_text())


def report(results: list[dict[str, Any]]) -> str:
    import torch

    import sb3_trpo

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"# commit {commit}, sb3_trpo {sb3_trpo.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} cores, gloo on loopback, 1 thread per process",
        "",
        "| case | processes | global steps | updates | wall time (s) | steps/s | speed-up | final return (10 episodes) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {r["case"]: r["wall_s"] for r in results if r["processes"] == 1}
    for r in results:
        lines.append(
            f"| {r['case']} | {r['processes']} | {r['timesteps']:,} | {r['updates']} | {r['wall_s']:.1f} | "
            f"{r['steps_per_s']:.0f} | {base[r['case']] / r['wall_s']:.2f}x | {r['final_return']:.1f} |"
        )
    lines += [
        "",
        "Communication of one iteration with 2 processes (rollout agreement + update), measured by the all-reduce counter:",
        "",
        "| case | actor / all parameters | all-reduces | payload per rank (bytes) | ring all-reduce traffic per rank |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if r["processes"] == 2:
            payload = r["bytes_per_iteration"]
            # a ring all-reduce over W ranks sends (and receives) 2 (W - 1) / W times the payload per rank
            lines.append(
                f"| {r['case']} | {r['actor_parameters']:,} / {r['parameters']:,} | {r['all_reduces_per_iteration']:.0f} | "
                f"{payload:,.0f} | {payload / 1e6:.2f} MB at W=2, {2 * payload / 1e6:.2f} MB as W grows |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--timesteps", type=int, default=49_152, help="global sample budget of every run")
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.timesteps, args.out)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            for processes in args.processes:
                results.append(launch(case, processes, args.timesteps, Path(tmp)))
                print(json.dumps(results[-1]), flush=True)
    text = report(results)
    print(text)
    if args.cases == list(CASES) and args.processes == [1, 2]:
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
