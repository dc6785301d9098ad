"""Train TRPO on CartPole-v1 with default hyperparameters, then print its deterministic evaluation.

    python examples/cartpole.py [--seed 0] [--timesteps 100000] [--log-dir runs/]

This is the README's quick start; tests/test_learning.py runs this same function.
"""

import argparse
import importlib.util
import tempfile
from pathlib import Path

import torch as th
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_trpo import TRPO
from sb3_trpo.cli.train import TextProgress


def train_and_evaluate(
    seed: int = 0, timesteps: int = 100_000, log_dir: str | None = None, progress_bar: bool = False, verbose: int = 0
) -> tuple[float, float]:
    """Train on CartPole-v1, save and reload the model, and evaluate it on 10 episodes.

    :param seed: seed of the model and of the environments
    :param timesteps: training budget
    :param log_dir: where TensorBoard logs and the saved model go (a temporary folder if None)
    :param progress_bar: show SB3's progress bar (a plain progress line if tqdm and rich are not installed)
    :param verbose: verbosity of the model
    :return: mean and standard deviation of the deterministic evaluation return
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(log_dir) if log_dir is not None else Path(tmp)
        model = TRPO("MlpPolicy", "CartPole-v1", tensorboard_log=str(out), verbose=verbose, seed=seed)
        eval_callback = EvalCallback(make_vec_env("CartPole-v1", n_envs=1, seed=seed + 1000), eval_freq=10_000, verbose=0)
        callbacks: list[BaseCallback] = [eval_callback]
        # SB3's progress bar needs the optional tqdm and rich (pip install "stable-baselines3[extra]")
        rich_bar = progress_bar and all(importlib.util.find_spec(name) is not None for name in ("tqdm", "rich"))
        if progress_bar and not rich_bar:
            callbacks.append(TextProgress(timesteps))
        model.learn(timesteps, callback=CallbackList(callbacks), progress_bar=rich_bar)
        model.save(out / "trpo_cartpole")
        model = TRPO.load(out / "trpo_cartpole")
        eval_env = make_vec_env("CartPole-v1", n_envs=1, seed=seed + 2000)
        mean, std = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
    return float(mean), float(std)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timesteps", type=int, default=100_000)
    parser.add_argument("--log-dir", default=None, help="TensorBoard logs and the saved model (default: a temporary folder)")
    args = parser.parse_args()
    th.set_num_threads(1)  # TRPO's networks are small: one thread is fastest (benchmarks/README.md, "Threads")
    mean, std = train_and_evaluate(args.seed, args.timesteps, args.log_dir, progress_bar=True)
    print(f"CartPole-v1, seed {args.seed}, {args.timesteps} steps: evaluation return {mean:.1f} +/- {std:.1f} (10 episodes)")


if __name__ == "__main__":
    main()
