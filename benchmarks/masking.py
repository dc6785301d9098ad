"""Masking benchmark: MaskableTRPO against sb3-contrib's MaskablePPO and against TRPO without masks.

The task is sb3-contrib's ``InvalidActionEnvDiscrete(dim=100, n_invalid_actions=95)``: each step shows one of 100
states and pays 1 for the action equal to it; only 5 of the 100 actions are legal in a state (the rewarded one
and 4 others, drawn anew at each step), so a policy that knows the masks chooses among 5, one that does not among
100. An episode has 100 steps, so the optimal return is 100. Illegal actions are not punished (they pay 0), so
TRPO without masks can still learn the task, only from far fewer rewarded samples.

Every algorithm gets the same rollout size (``n_steps=256`` on 2 environments) and otherwise its library's
defaults. The policies are evaluated deterministically every 2,048 steps on 5 episodes (with masks for the
maskable algorithms) and at the end on 20 episodes. Each run writes ``OUT/ALGORITHM/seedN/result.json`` and
``evaluations.npz``; a run whose result exists is skipped, so the benchmark resumes where it stopped.

    python benchmarks/masking.py run --seeds 0 1 2
    python benchmarks/masking.py report      # results/masking.md and results/masking.png
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "masking"
ALGORITHMS = ("MaskableTRPO", "MaskablePPO", "TRPO")
DIM, N_INVALID = 100, 95
N_ENVS, N_STEPS = 2, 256
TIMESTEPS = 60_000
EVAL_EVERY = 2_048


def _make_env() -> Any:
    from sb3_contrib.common.envs import InvalidActionEnvDiscrete

    return InvalidActionEnvDiscrete(dim=DIM, n_invalid_actions=N_INVALID)


def run_one(algorithm: str, seed: int, out: Path) -> dict[str, Any]:
    """Train and evaluate one (algorithm, seed), unless its result exists."""
    run_dir = out / algorithm / f"seed{seed}"
    result_file = run_dir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    import torch as th
    from sb3_contrib import MaskablePPO
    from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback
    from sb3_contrib.common.maskable.evaluation import evaluate_policy
    from stable_baselines3.common.env_util import make_vec_env

    from sb3_trpo import TRPO, MaskableTRPO

    th.set_num_threads(1)
    masked = algorithm != "TRPO"
    cls = {"MaskableTRPO": MaskableTRPO, "MaskablePPO": MaskablePPO, "TRPO": TRPO}[algorithm]
    env = make_vec_env(_make_env, n_envs=N_ENVS, seed=seed)
    eval_env = make_vec_env(_make_env, n_envs=1, seed=seed + 1000)
    model = cls("MlpPolicy", env, n_steps=N_STEPS, seed=seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    callback = MaskableEvalCallback(
        eval_env,
        eval_freq=EVAL_EVERY // N_ENVS,
        n_eval_episodes=5,
        log_path=str(run_dir),
        deterministic=True,
        use_masking=masked,
        verbose=0,
    )
    start = time.perf_counter()
    model.learn(TIMESTEPS, callback=callback)
    seconds = time.perf_counter() - start  # with the periodic evaluations, the same for every algorithm
    final, final_std = evaluate_policy(model, eval_env, n_eval_episodes=20, deterministic=True, use_masking=masked)
    curve = np.load(run_dir / "evaluations.npz")
    returns = curve["results"].mean(axis=1)
    reached = [int(t) for t, r in zip(curve["timesteps"], returns, strict=True) if r >= 99.0]
    result = {
        "algorithm": algorithm,
        "seed": seed,
        "timesteps": TIMESTEPS,
        "final_return_mean": float(final),
        "final_return_std": float(final_std),
        "first_step_at_99": reached[0] if reached else None,
        "learn_seconds_with_eval": seconds,
        "steps_per_second": TIMESTEPS / seconds,
        "settings": {
            "env": f"InvalidActionEnvDiscrete(dim={DIM}, n_invalid_actions={N_INVALID})",
            "n_envs": N_ENVS,
            "n_steps": N_STEPS,
            "other": "the library's defaults",
        },
    }
    result_file.write_text(json.dumps(result, indent=2))
    return result


def report(out: Path) -> None:
    """Write ``results/masking.md`` (table) and ``results/masking.png`` (curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        f"InvalidActionEnvDiscrete(dim={DIM}, n_invalid_actions={N_INVALID}), {TIMESTEPS:,} steps, {N_ENVS} envs x "
        f"n_steps={N_STEPS}; deterministic evaluation (20 episodes at the end; optimum 100). `python benchmarks/masking.py`.",
        "",
        "| algorithm | seeds | final return (mean ± std over seeds) | steps to reach 99 (mean; never = not counted) "
        "| wall time with evaluations (s, mean) | steps/s (mean) |",
        "|---|---|---|---|---|---|",
    ]
    figure, axes = plt.subplots(figsize=(6, 4))
    for algorithm, color in zip(ALGORITHMS, ("tab:blue", "tab:orange", "tab:green"), strict=True):
        runs = [json.loads(p.read_text()) for p in sorted((out / algorithm).glob("seed*/result.json"))]
        if not runs:
            continue
        finals = np.array([r["final_return_mean"] for r in runs])
        reached = [r["first_step_at_99"] for r in runs if r["first_step_at_99"] is not None]
        reach = f"{np.mean(reached):,.0f} ({len(reached)} of {len(runs)} seeds)" if reached else f"never (0 of {len(runs)})"
        lines.append(
            f"| {algorithm} | {len(runs)} | {finals.mean():.1f} ± {finals.std():.1f} | {reach} "
            f"| {np.mean([r['learn_seconds_with_eval'] for r in runs]):.0f} "
            f"| {np.mean([r['steps_per_second'] for r in runs]):.0f} |"
        )
        curves = [np.load(out / algorithm / f"seed{r['seed']}" / "evaluations.npz") for r in runs]
        length = min(len(c["timesteps"]) for c in curves)
        returns = np.stack([c["results"][:length].mean(axis=1) for c in curves])
        steps = curves[0]["timesteps"][:length]
        axes.plot(steps, returns.mean(axis=0), color=color, label=f"{algorithm} ({len(runs)} seeds)")
        axes.fill_between(steps, returns.min(axis=0), returns.max(axis=0), color=color, alpha=0.2)
    axes.set_title(f"{DIM} actions, {DIM - N_INVALID} legal per state")
    axes.set_xlabel("environment steps")
    axes.set_ylabel("deterministic return (mean, min-max band)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out.parent / "masking.png", dpi=100)
    plt.close(figure)
    (out.parent / "masking.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    run_parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    run_parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    report_parser = sub.add_parser("report")
    report_parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.command == "run":
        for seed in args.seeds:
            for algorithm in args.algorithms:
                result = run_one(algorithm, seed, args.out)
                print(
                    f"{algorithm} seed {seed}: final {result['final_return_mean']:.1f}, "
                    f"{result['learn_seconds_with_eval']:.0f} s",
                    flush=True,
                )
    else:
        report(args.out)


if __name__ == "__main__":
    main()
