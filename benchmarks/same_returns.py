"""Do the written-out update paths change what is learned? sb3_trpo trained with and without them, same seeds.

The lean collection is bit-identical to SB3's loop (tests/test_collection.py), so a seeded run collects the same
data with or without it. The written-out MLP critic step and Fisher-vector product equal autograd's to float
rounding (tests/test_critic.py, tests/test_fisher.py): a seeded run then follows a trajectory that differs at
rounding level, and a chaotic one may drift apart. This runs rl-zoo3's settings (the learning benchmark's) with
every fast path ("fast", the default) and with the general paths ("general": SB3's collection, autograd's
Fisher product, autograd + torch.optim.Adam for the critic), and compares the final deterministic returns over
10 evaluation episodes, seed by seed.

    python benchmarks/same_returns.py --envs CartPole-v1 Pendulum-v1 --seeds 0 1 2 3 4 5
"""

import argparse
import json
import statistics
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from learning import SETTINGS  # rl-zoo3's settings, shared with the learning benchmark

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(job: tuple[str, str, int]) -> float:
    """:return: the final mean deterministic return of one (mode, env, seed) run"""
    mode, env_id, seed = job
    import torch as th
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import VecNormalize

    import sb3_trpo.trpo
    from sb3_trpo import TRPO

    th.set_num_threads(1)
    setting = SETTINGS[env_id]
    kwargs = dict(setting["kwargs"])
    if mode == "general":
        # no public switch turns the written-out update paths off (they decline by themselves for what they do
        # not cover); declining here makes TRPO take its general paths
        sb3_trpo.trpo.mlp_fisher_product = lambda *args, **kw: None  # type: ignore[assignment]
        sb3_trpo.trpo.MlpCriticRegression.for_policy = classmethod(lambda cls, *args, **kw: None)  # type: ignore[assignment]
        kwargs["fast_collection"] = False
    env = make_vec_env(env_id, n_envs=setting["n_envs"], seed=seed)
    eval_env = make_vec_env(env_id, n_envs=1, seed=seed + 10_000)
    if setting["normalize"]:
        env = VecNormalize(env, gamma=kwargs.get("gamma", 0.99))
    model = TRPO("MlpPolicy", env, seed=seed, **kwargs)
    model.learn(setting["timesteps"])
    if setting["normalize"]:
        eval_env = VecNormalize(eval_env, training=False, norm_reward=False)
        eval_env.obs_rms = env.obs_rms
    mean, _ = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
    return float(mean)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "Pendulum-v1"], choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5])
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"# commit {commit}; final deterministic return (10 episodes), rl-zoo3 settings, 1 thread per process",
        "",
        "| env | seed | fast paths (default) | general paths |",
        "|---|---|---|---|",
    ]
    summary = []
    for env_id in args.envs:
        jobs = [(mode, env_id, seed) for seed in args.seeds for mode in ("fast", "general")]
        # both modes of a seed at the same time; a fresh process per run, since "general" patches sb3_trpo
        with ProcessPoolExecutor(max_workers=2, max_tasks_per_child=1) as pool:
            returns = dict(zip(jobs, pool.map(run_one, jobs), strict=True))
        for seed in args.seeds:
            fast_return, general_return = returns[("fast", env_id, seed)], returns[("general", env_id, seed)]
            lines.append(f"| {env_id} | {seed} | {fast_return:.1f} | {general_return:.1f} |")
            print(lines[-1], flush=True)
        fast = [returns[("fast", env_id, s)] for s in args.seeds]
        general = [returns[("general", env_id, s)] for s in args.seeds]
        summary.append(
            f"| {env_id} | mean ± std over {len(args.seeds)} seeds "
            f"| {statistics.mean(fast):.1f} ± {statistics.pstdev(fast):.1f} "
            f"| {statistics.mean(general):.1f} ± {statistics.pstdev(general):.1f} |"
        )
    text = "\n".join([*lines, *summary]) + "\n"
    (RESULTS / "same_returns.md").write_text(text)
    print(json.dumps({"written": str(RESULTS / "same_returns.md")}))
    print(text)


if __name__ == "__main__":
    main()
