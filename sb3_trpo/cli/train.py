"""``sb3-trpo train ENV_ID``: train with a tuned preset, evaluate periodically, keep the best and the final model."""

import argparse
import importlib.util
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import stable_baselines3
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.vec_env import VecEnv, VecNormalize, sync_envs_normalization

import sb3_trpo
from sb3_trpo.cli import runs
from sb3_trpo.cli.presets import CliError, algorithm_for, apply_overrides, model_kwargs, preset_for
from sb3_trpo.trpo import TRPO
from sb3_trpo.validation import check_spaces


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "env_id",
        metavar="ENV_ID",
        help="Gymnasium environment id, e.g. CartPole-v1, or MODULE:ENV_ID to import the module that registers it",
    )
    runs.add_gym_packages_argument(parser)
    parser.add_argument(
        "--hyperparams",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override preset values: TRPO keywords or n_envs, normalize, n_timesteps, policy, env_kwargs "
        "(values as Python literals)",
    )
    parser.add_argument("--timesteps", type=int, help="training budget (default: the preset's, else 1,000,000)")
    parser.add_argument("--seed", type=int, help="random seed (default: drawn at random and recorded in config.json)")
    parser.add_argument("--n-envs", type=int, help="parallel environments (default: the preset's, else 1)")
    parser.add_argument("--device", default="auto", help='torch device: "auto" (default), "cpu", "cuda", ...')
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest for TRPO's small networks, see benchmarks/README.md)",
    )
    parser.add_argument("--tensorboard-log", type=Path, help="also write TensorBoard logs into this folder")
    parser.add_argument("--output", type=Path, help="run folder (default: runs/ENV_ID_N, N the next free number)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run the --output folder already holds (its files are removed before training)",
    )
    parser.add_argument("--eval-freq", type=int, default=10_000, help="evaluate every this many timesteps (0: never)")
    parser.add_argument("--eval-episodes", type=int, default=5, help="episodes per periodic evaluation")
    parser.add_argument("--no-progress-bar", action="store_true", help="do not show the progress bar")
    parser.add_argument("--verbose", type=int, default=0, choices=[0, 1, 2], help="SB3's log verbosity")


def run(args: argparse.Namespace) -> int:
    # before the id is looked up: these modules register it (the module of MODULE:ENV_ID is imported by check_env_id)
    runs.import_gym_packages(args.gym_packages)
    env_name = runs.check_env_id(args.env_id)
    preset = preset_for(env_name)
    settings = apply_overrides(preset, args.hyperparams)
    n_envs = args.n_envs if args.n_envs is not None else settings.n_envs
    timesteps = args.timesteps if args.timesteps is not None else settings.n_timesteps
    for flag, value in (("--n-envs", n_envs), ("--timesteps", timesteps), ("--eval-episodes", args.eval_episodes)):
        if value < 1:
            raise CliError(f"{flag} {value}: must be >= 1.")
    if args.threads < 1:
        raise CliError(f"--threads {args.threads}: must be >= 1.")
    if args.eval_freq < 0:
        raise CliError(f"--eval-freq {args.eval_freq}: must be >= 0 (0 turns periodic evaluation off).")
    if args.seed is not None:
        runs.check_seed(args.seed)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    output = args.output if args.output is not None else _next_free(Path("runs"), env_name)
    # one run per folder: files of an earlier run would be read as this run's (its best evaluation in the summary,
    # its VecNormalize statistics by eval)
    old_run = runs.files_of_a_run(output)
    if old_run and not args.overwrite:
        raise CliError(
            f"{output} already holds a run ({', '.join(old_run)}): choose another --output folder, or pass --overwrite "
            "to replace that run."
        )

    # a process-wide setting: the CLI owns its process, the library never changes it
    th.set_num_threads(args.threads)
    env_kwargs = settings.env_kwargs or None
    env = runs.make_env(args.env_id, n_envs, seed, env_kwargs=env_kwargs)
    eval_env = runs.make_env(args.env_id, 1, seed + 1_000_000, env_kwargs=env_kwargs)
    try:  # the environment's own mistake, not the hyperparameters' (TRPO's constructor would say the same later)
        check_spaces(env.observation_space, env.action_space)
    except ValueError as error:
        raise CliError(f"environment {args.env_id}: {error}") from None
    _check_policy_fits(settings.policy, env.observation_space, settings.hyperparams.get("policy_kwargs"), args.env_id)
    algorithm = algorithm_for(settings.policy)  # RecurrentTRPO for an LSTM policy
    if settings.normalize:
        gamma = settings.hyperparams.get("gamma", 0.99)
        env = VecNormalize(env, gamma=gamma)
        # evaluation sees normalized observations (statistics synchronized by EvalCallback) and the true rewards
        eval_env = VecNormalize(eval_env, gamma=gamma, training=False, norm_reward=False)
    try:
        model = algorithm(
            settings.policy,
            env,
            seed=seed,
            device=args.device,
            verbose=args.verbose,
            tensorboard_log=None if args.tensorboard_log is None else str(args.tensorboard_log),
            **model_kwargs(settings.hyperparams),
        )
    except (ValueError, TypeError) as error:
        raise CliError(f"bad hyperparameters for {args.env_id}: {error}") from None

    # only now that everything is valid: a refused --overwrite leaves the earlier run as it was
    for name in old_run:
        (output / name).unlink()
    if old_run:
        print(f"Replacing the run in {output} (--overwrite): removed {', '.join(old_run)}")
    output.mkdir(parents=True, exist_ok=True)
    runs.write_config(
        output,
        {
            "env_id": args.env_id,  # as given: eval of the run imports the module of a MODULE:ENV_ID again
            "gym_packages": args.gym_packages,  # imported again by eval of the run
            "seed": seed,
            "n_envs": n_envs,
            "threads": args.threads,
            "normalize": settings.normalize,
            "env_kwargs": settings.env_kwargs,
            "timesteps": timesteps,
            "algorithm": algorithm.__name__,  # eval loads the model with it
            "policy": settings.policy,
            "hyperparams": settings.hyperparams,
            "preset": settings.source,
            "versions": _versions(),
        },
    )
    print(
        f"Training {algorithm.__name__} on {args.env_id} for {timesteps:,} timesteps, seed {seed}, {n_envs} env(s) -> {output}"
    )
    print(f"Preset: {settings.source or 'none for this environment: TRPO defaults'}")
    if settings.env_kwargs:
        print(f"Environment keywords: {settings.env_kwargs}")

    callbacks: list[BaseCallback] = []
    if args.eval_freq > 0:
        callbacks.append(
            EvalCallback(
                eval_env,
                n_eval_episodes=args.eval_episodes,
                eval_freq=max(args.eval_freq // n_envs, 1),  # counted in calls, one call = n_envs steps
                best_model_save_path=str(output),
                # the statistics the best model was evaluated with, saved beside it (a later best overwrites both)
                callback_on_new_best=SaveVecNormalize(output / runs.BEST_VEC_NORMALIZE) if settings.normalize else None,
                log_path=str(output),
                deterministic=True,
                verbose=0,
            )
        )
    progress_bar = not args.no_progress_bar and _rich_progress_bar_available()
    if not args.no_progress_bar and not progress_bar:
        callbacks.append(TextProgress(timesteps))

    start = time.perf_counter()
    model.learn(timesteps, callback=CallbackList(callbacks), progress_bar=progress_bar)
    wall = time.perf_counter() - start
    model.save(output / runs.MODEL)
    if isinstance(env, VecNormalize):
        env.save(str(output / runs.VEC_NORMALIZE))

    _summary(model, eval_env, output, wall)
    return 0


def _check_policy_fits(policy: str, observation_space: spaces.Space, policy_kwargs: Any, env_id: str) -> None:
    """Refuse a policy that cannot read the environment's observations, which SB3 finds out only by failing to build
    it (an assertion in its CNN, an ``AttributeError`` in its Dict extractor).

    :param policy: the policy alias (an LSTM policy reads observations as its feed-forward counterpart does)
    :param observation_space: the environment's observation space
    :param policy_kwargs: the ``policy_kwargs`` hyperparameter, if any
    :param env_id: the environment, for the message
    :raises CliError: for ``MultiInputPolicy`` without Dict observations, or ``CnnPolicy`` without images
    """
    observes = f"{env_id} observes {runs.describe_space(observation_space)}"
    kind = policy.replace("Lstm", "")  # what the policy reads: MlpLstmPolicy as MlpPolicy, and so on
    mlp = policy.replace("MultiInput", "Mlp").replace("Cnn", "Mlp")
    is_dict = isinstance(observation_space, spaces.Dict)
    if kind == "MultiInputPolicy" and not is_dict:
        raise CliError(f"--hyperparams policy={policy} is for Dict observations; {observes}: use {mlp}.")
    kwargs = policy_kwargs if isinstance(policy_kwargs, dict) else {}
    if kind != "CnnPolicy" or is_dict or "features_extractor_class" in kwargs:
        return  # SB3 itself refuses CnnPolicy on Dict observations (ValueError); a custom extractor reads what it reads
    # SB3's CNN skips its check of dtype and bounds for images said to be normalized already, as SB3 decides it
    extractor_kwargs = kwargs.get("features_extractor_kwargs")
    normalized = kwargs.get("normalize_images", True) is False or (
        isinstance(extractor_kwargs, dict) and bool(extractor_kwargs.get("normalized_image", False))
    )
    if not is_image_space(observation_space, check_channels=False, normalized_image=normalized):
        raise CliError(
            f"--hyperparams policy={policy} is for image observations (a Box of shape (height, width, channels) or "
            f"(channels, height, width), uint8 in [0, 255] unless policy_kwargs has normalize_images=False); {observes}: "
            f"use {mlp}."
        )


class SaveVecNormalize(BaseCallback):
    """Save the training environment's VecNormalize statistics; run by ``EvalCallback`` at each new best model.

    ``EvalCallback`` evaluates with the training statistics synchronized into the evaluation environment, so the
    statistics saved at that moment are the ones that go with the best model, not those at the end of training.

    :param path: file the statistics are written to
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def _on_step(self) -> bool:
        vec_normalize = self.model.get_vec_normalize_env()
        if vec_normalize is not None:
            vec_normalize.save(str(self.path))
        return True


class TextProgress(BaseCallback):
    """A plain progress line every 10% of the budget, for when SB3's progress bar (tqdm, rich) is not installed."""

    def __init__(self, total: int) -> None:
        super().__init__()
        self.total = total
        self.next_report = 0.1

    def _on_step(self) -> bool:
        done = self.num_timesteps / self.total
        if done >= self.next_report:
            print(f"  {min(done, 1.0):4.0%}  {self.num_timesteps:,} / {self.total:,} timesteps", flush=True)
            self.next_report = (int(done * 10) + 1) / 10
        return True


def _summary(model: TRPO, eval_env: VecEnv, output: Path, wall: float) -> None:
    env = model.get_env()
    assert env is not None
    sync_envs_normalization(env, eval_env)  # the final observation statistics, as the saved VecNormalize holds them
    episodes = 10
    returns, _ = evaluate_policy(model, eval_env, n_eval_episodes=episodes, deterministic=True, return_episode_rewards=True)
    mean, std = float(np.mean(returns)), float(np.std(returns))
    lines = [
        "",
        "Summary",
        f"  timesteps        {model.num_timesteps:,} in {wall:.1f} s ({model.num_timesteps / max(wall, 1e-9):.0f} steps/s)",
        f"  final return     {mean:.1f} +/- {std:.1f} over {episodes} episodes (deterministic)",
    ]
    evaluations = output / runs.EVALUATIONS
    if evaluations.is_file():
        data = np.load(evaluations)
        best = int(np.argmax(data["results"].mean(axis=1)))
        lines.append(
            f"  best evaluation  {data['results'][best].mean():.1f} at {int(data['timesteps'][best]):,} timesteps "
            f"({output / runs.BEST_MODEL})"
        )
    lines.append(f"  final model      {output / runs.MODEL}")
    if (output / runs.VEC_NORMALIZE).is_file():
        lines.append(f"  VecNormalize     {output / runs.VEC_NORMALIZE}")
    if (output / runs.BEST_VEC_NORMALIZE).is_file():
        lines.append(f"  best's VecNorm.  {output / runs.BEST_VEC_NORMALIZE}")
    lines.append(f"  next             sb3-trpo eval {output}  |  sb3-trpo plot {output}")
    print("\n".join(lines))


def _rich_progress_bar_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("tqdm", "rich"))


def _next_free(root: Path, env_id: str) -> Path:
    number = 1
    while (root / f"{env_id}_{number}").exists():
        number += 1
    return root / f"{env_id}_{number}"


def _versions() -> dict[str, Any]:
    return {
        "sb3_trpo": sb3_trpo.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "torch": th.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
    }
