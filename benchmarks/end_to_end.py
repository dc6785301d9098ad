"""End-to-end speed: ``learn()`` of sb3_trpo.TRPO and sb3_contrib.TRPO with the same settings and seeds.

Each run trains one (case, implementation, seed) in its own process with 1 torch thread, and reports the wall time
of ``learn()``, split into rollout collection (``collect_rollouts``) and updates (``train()``), plus the final
mean training-episode return (the last 100 episodes). The two implementations of one (case, seed) run at the same
time on the two cores, so both see the same load. Beside them, the environment's own step rate under random
actions (the same vectorized, possibly normalized env, no policy) is the ceiling no collection can pass.

Results go to ``benchmarks/results/end_to_end.json`` (one entry per run, with commit and versions); a run already
there is skipped, so an interrupted benchmark resumes. ``report`` writes the markdown table.

    python benchmarks/end_to_end.py run                 # every case, seeds 0 1 2
    python benchmarks/end_to_end.py run --cases hopper-zoo --seeds 0
    python benchmarks/end_to_end.py report              # -> benchmarks/results/end_to_end.md
    python benchmarks/end_to_end.py profile             # where a collected sample's time goes -> collection_profile.md
"""

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import CONTRIB_SEARCH, SETTINGS  # rl-zoo3's settings, shared with the learning benchmark)
from timing import Section

RESULTS = Path(__file__).resolve().parent / "results"
OUT_JSON = RESULTS / "end_to_end.json"
IMPLEMENTATIONS = ("sb3_trpo", "sb3_contrib")

# sb3-contrib's defaults, given to both explicitly (sb3_trpo's own CG / line-search defaults differ)
CASES: dict[str, dict[str, Any]] = {
    "cartpole-defaults": dict(env_id="CartPole-v1", n_envs=1, normalize=False, timesteps=100_000, kwargs=CONTRIB_SEARCH),
    "cartpole-zoo": {**SETTINGS["CartPole-v1"], "env_id": "CartPole-v1"},
    "pendulum-zoo": {**SETTINGS["Pendulum-v1"], "env_id": "Pendulum-v1"},
    "hopper-zoo": {**SETTINGS["Hopper-v5"], "env_id": "Hopper-v5", "timesteps": 200_000},
}


def _versions() -> dict[str, str]:
    import gymnasium
    import sb3_contrib
    import stable_baselines3
    import torch

    import sb3_trpo

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    return {
        "commit": commit.stdout.strip(),
        "sb3_trpo": sb3_trpo.__version__,
        "sb3_contrib": sb3_contrib.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "torch": torch.__version__,
        "gymnasium": gymnasium.__version__,
        "python": platform.python_version(),
    }


def _make_env(case: dict[str, Any], seed: int) -> Any:
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    env = make_vec_env(case["env_id"], n_envs=case["n_envs"], seed=seed)
    return VecNormalize(env, gamma=case["kwargs"].get("gamma", 0.99)) if case["normalize"] else env


def run_one(job: tuple[str, str, int]) -> dict[str, Any]:
    """Train one (case, implementation, seed) and time its parts."""
    name, implementation, seed = job
    import torch as th

    th.set_num_threads(1)
    if implementation == "sb3_trpo":
        from sb3_trpo import TRPO
    else:
        from sb3_contrib import TRPO  # type: ignore[assignment]

    case = CASES[name]
    model = TRPO("MlpPolicy", _make_env(case, seed), seed=seed, **case["kwargs"])
    sections = Section()
    with sections.patched(model, "collect_rollouts", "collect"), sections.patched(model, "train", "train"):
        start = time.perf_counter()
        model.learn(case["timesteps"])
        wall = time.perf_counter() - start
    seconds, calls = sections.seconds, sections.calls
    returns = [e["r"] for e in model.ep_info_buffer]
    return {
        "case": name,
        "implementation": implementation,
        "seed": seed,
        "timesteps": model.num_timesteps,
        "learn_s": wall,
        "collect_s": seconds["collect"],
        "train_s": seconds["train"],
        "train_calls": calls["train"],
        "collect_steps_per_s": model.num_timesteps / seconds["collect"],
        "train_ms": 1e3 * seconds["train"] / max(calls["train"], 1),
        "final_return": float(np.mean(returns)) if returns else float("nan"),
        **_versions(),
    }


def env_ceiling(name: str, samples: int = 40_000) -> float:
    """Samples per second of the case's vectorized env stepped with random actions (no policy at all)."""
    case = CASES[name]
    env = _make_env(case, seed=0)
    env.reset()
    env.action_space.seed(0)
    actions = [np.stack([env.action_space.sample() for _ in range(env.num_envs)]) for _ in range(samples // env.num_envs)]
    start = time.perf_counter()
    for action in actions:
        env.step(action)
    return samples / (time.perf_counter() - start)


def profile_step(name: str, implementation: str, steps: int = 4096) -> dict[str, float]:
    """Microseconds per collected sample in each part of one rollout's steps (after a warm-up rollout), 1 thread.

    The parts: the observation's conversion to a tensor, the policy's forward pass (with the action sampled and
    made a numpy array for sb3_trpo's lean loop; SB3's ``policy(obs)`` with its ``torch.distributions`` object for
    sb3-contrib, whose ``.cpu().numpy()`` of the actions is in "rest"), the vectorized env's ``step``, the buffer
    write, the callbacks' ``on_step``, and the rest of the loop (its bookkeeping, clipping, the episode-info
    buffer, GAE at the end).
    """
    import stable_baselines3.common.on_policy_algorithm as sb3_loop
    import torch as th

    import sb3_trpo.collection as lean_loop
    from sb3_trpo.lean_forward import LeanForward

    th.set_num_threads(1)
    if implementation == "sb3_trpo":
        from sb3_trpo import TRPO
    else:
        from sb3_contrib import TRPO  # type: ignore[assignment]
    case = CASES[name]
    n_steps = max(steps // case["n_envs"], 1)
    model = TRPO("MlpPolicy", _make_env(case, seed=0), seed=0, **{**case["kwargs"], "n_steps": n_steps})
    _, callback = model._setup_learn(10 * n_steps * case["n_envs"], callback=None)
    callback.init_callback(model)
    callback.on_training_start(locals(), globals())
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_steps)  # warm-up
    sections = Section()
    ours = implementation == "sb3_trpo"
    patches = [
        (lean_loop if ours else sb3_loop, "obs_as_tensor", "obs to tensor"),
        (LeanForward, "__call__", "forward") if ours else (model.policy, "forward", "forward"),
        (model.env, "step", "env.step"),
        (lean_loop, "_store", "buffer write") if ours else (model.rollout_buffer, "add", "buffer write"),
        (callback, "on_step", "callbacks"),
        (model, "collect_rollouts", "total"),
    ]
    with contextlib.ExitStack() as stack:
        for target, attribute, label in patches:
            stack.enter_context(sections.patched(target, attribute, label))
        model.collect_rollouts(model.env, callback, model.rollout_buffer, n_steps)
    samples = n_steps * case["n_envs"]
    parts = {label: 1e6 * sections.seconds[label] / samples for _, _, label in patches}
    parts["rest"] = parts["total"] - sum(v for k, v in parts.items() if k != "total")
    return parts


def profile(cases: list[str]) -> str:
    labels = ["obs to tensor", "forward", "env.step", "buffer write", "callbacks", "rest", "total"]
    lines = [
        f"# commit {_versions()['commit']}; microseconds per collected sample, one rollout after a warm-up, 1 thread, "
        "one implementation at a time",
        "",
        f"| case | implementation | {' | '.join(labels)} |",
        "|---|---|" + "---|" * len(labels),
    ]
    for name in cases:
        for implementation in IMPLEMENTATIONS:
            with ProcessPoolExecutor(max_workers=1) as pool:  # a fresh process: nothing of the other's state
                parts = pool.submit(profile_step, name, implementation).result()
            lines.append(f"| {name} | {implementation} | " + " | ".join(f"{parts[k]:.0f}" for k in labels) + " |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    (RESULTS / "collection_profile.md").write_text(text)
    return text


def _load() -> list[dict[str, Any]]:
    return json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else []


def run(cases: list[str], seeds: list[int]) -> None:
    for name in cases:
        for seed in seeds:
            done = {(r["case"], r["implementation"], r["seed"]) for r in _load() if r.get("case") == name}
            if all((name, impl, seed) in done for impl in IMPLEMENTATIONS):
                continue
            jobs = [(name, impl, seed) for impl in IMPLEMENTATIONS]
            with ProcessPoolExecutor(max_workers=2) as pool:  # the pair at the same time: the same load for both
                results = list(pool.map(run_one, jobs))
            records = [r for r in _load() if (r.get("case"), r.get("implementation"), r.get("seed")) not in set(jobs)]
            OUT_JSON.write_text(json.dumps([*records, *results], indent=1))
            for r in results:
                print(
                    f"{name} seed {seed} {r['implementation']}: learn {r['learn_s']:.1f} s, collect "
                    f"{r['collect_steps_per_s']:.0f} steps/s, train {r['train_ms']:.1f} ms, return {r['final_return']:.1f}",
                    flush=True,
                )
        ceilings = [r for r in _load() if r.get("ceiling_case") == name]
        if not ceilings:
            import torch as th

            th.set_num_threads(1)
            rate = env_ceiling(name)
            OUT_JSON.write_text(json.dumps([*_load(), {"ceiling_case": name, "samples_per_s": rate, **_versions()}], indent=1))
            print(f"{name}: environment alone {rate:.0f} samples/s", flush=True)


def report() -> str:
    records = _load()
    commits = sorted({r["commit"] for r in records})
    versions = next((r for r in records if "sb3_contrib" in r), {})
    lines = [
        f"# commit(s) {', '.join(commits)}; sb3_trpo {versions.get('sb3_trpo')}, sb3_contrib {versions.get('sb3_contrib')}, "
        f"torch {versions.get('torch')}, python {versions.get('python')}; 1 thread per process, both implementations "
        "of a (case, seed) run at the same time; medians over seeds",
        "",
        "| case | seeds | `learn()` s: sb3_trpo / sb3_contrib | speed-up | collection steps/s: sb3_trpo / sb3_contrib "
        "| speed-up | env alone (random actions), steps/s | `train()` ms: sb3_trpo / sb3_contrib | speed-up "
        "| final return: sb3_trpo / sb3_contrib |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, case in CASES.items():
        mine = [r for r in records if r.get("case") == name]
        runs = {impl: [r for r in mine if r["implementation"] == impl] for impl in IMPLEMENTATIONS}
        seeds = sorted({r["seed"] for r in runs["sb3_trpo"]} & {r["seed"] for r in runs["sb3_contrib"]})
        if not seeds:
            continue

        def median(impl: str, key: str, runs: dict[str, list[dict[str, Any]]] = runs, seeds: list[int] = seeds) -> float:
            return statistics.median(r[key] for r in runs[impl] if r["seed"] in seeds)

        ceiling = next((r["samples_per_s"] for r in records if r.get("ceiling_case") == name), float("nan"))
        ours, theirs = "sb3_trpo", "sb3_contrib"
        lines.append(
            f"| {name} ({case['env_id']}, {case['n_envs']} env, {case['timesteps'] // 1000}k steps) | {len(seeds)} "
            f"| {median(ours, 'learn_s'):.1f} / {median(theirs, 'learn_s'):.1f} "
            f"| **{median(theirs, 'learn_s') / median(ours, 'learn_s'):.2f}x** "
            f"| {median(ours, 'collect_steps_per_s'):.0f} / {median(theirs, 'collect_steps_per_s'):.0f} "
            f"| {median(ours, 'collect_steps_per_s') / median(theirs, 'collect_steps_per_s'):.2f}x | {ceiling:.0f} "
            f"| {median(ours, 'train_ms'):.1f} / {median(theirs, 'train_ms'):.1f} "
            f"| {median(theirs, 'train_ms') / median(ours, 'train_ms'):.2f}x "
            f"| {median(ours, 'final_return'):.1f} / {median(theirs, 'final_return'):.1f} |"
        )
    text = "\n".join(lines) + "\n"
    (RESULTS / "end_to_end.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    run_parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    sub.add_parser("report")
    profile_parser = sub.add_parser("profile")
    profile_parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    if args.command == "profile":
        print(profile(args.cases))
        return
    if args.command == "run":
        run(args.cases, args.seeds)
    print(report())


if __name__ == "__main__":
    main()
