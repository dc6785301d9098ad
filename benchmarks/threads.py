"""Torch's thread count and ``learn()`` wall time for sb3_trpo's small networks.

Each run is its own process (the thread count is a process-wide setting) training ``sb3_trpo.TRPO`` with rl-zoo3's
settings of the learning benchmark, with ``torch.set_num_threads(N)`` for each N asked, or torch's default
(``default``: as many threads as cores). Runs of one (env, n_envs) alternate between the thread counts, one at a
time, so they see the same load.

    python benchmarks/threads.py                        # CartPole-v1 and Hopper-v5 with 1, 2 and 8 envs
    python benchmarks/threads.py --envs Hopper-v5 --n-envs 2 --repeats 3
"""

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import SETTINGS  # rl-zoo3's settings, shared with the learning benchmark)

TIMESTEPS = {"CartPole-v1": 30_000, "Hopper-v5": 40_000}


def run_one(env_id: str, n_envs: int, threads: str, timesteps: int) -> float:
    """``learn()`` wall time in a fresh process with the given thread count."""
    code = f"""
import time, torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize
from sb3_trpo import TRPO
threads = {threads!r}
if threads != "default":
    th.set_num_threads(int(threads))
setting = {SETTINGS[env_id]!r}
kwargs = dict(setting["kwargs"])
kwargs["n_steps"] = max(kwargs["n_steps"] * setting["n_envs"] // {n_envs}, 8)  # the same samples per update
env = make_vec_env({env_id!r}, n_envs={n_envs}, seed=0)
env = VecNormalize(env) if setting["normalize"] else env
model = TRPO("MlpPolicy", env, seed=0, **kwargs)
start = time.perf_counter()
model.learn({timesteps})
print(time.perf_counter() - start)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(TIMESTEPS))
    parser.add_argument("--n-envs", nargs="+", type=int, default=[1, 2, 8])
    parser.add_argument("--threads", nargs="+", default=["1", "2", "default"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import torch as th

    import sb3_trpo

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(
        f"# commit {commit}, sb3_trpo {sb3_trpo.__version__}, torch {th.__version__}, python "
        f"{platform.python_version()}, torch's default here: {th.get_num_threads()} threads; "
        f"median of {args.repeats} runs each\n"
    )
    print("| env | n_envs | steps | " + " | ".join(f"{t} thread(s), s" for t in args.threads) + " | fastest |")
    print("|---|---|---|" + "---|" * (len(args.threads) + 1))
    for env_id in args.envs:
        for n_envs in args.n_envs:
            times: dict[str, list[float]] = {t: [] for t in args.threads}
            for _ in range(args.repeats):
                for threads in args.threads:
                    times[threads].append(run_one(env_id, n_envs, threads, TIMESTEPS.get(env_id, 40_000)))
            medians: dict[str, Any] = {t: statistics.median(v) for t, v in times.items()}
            best = min(medians, key=medians.get)
            cells = " | ".join(f"{medians[t]:.1f}" for t in args.threads)
            print(f"| {env_id} | {n_envs} | {TIMESTEPS.get(env_id, 40_000)} | {cells} | {best} |", flush=True)
        time.sleep(0)


if __name__ == "__main__":
    main()
