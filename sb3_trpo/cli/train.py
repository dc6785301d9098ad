"""``sb3-trpo train ENV_ID``: train with a tuned preset, evaluate periodically, keep the best and the final model."""

import argparse
import importlib.util
import io
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback
from stable_baselines3.common.logger import KVWriter, Logger, make_output_format
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecNormalize, sync_envs_normalization

from sb3_trpo.cli import checkpointing, parallel, runs
from sb3_trpo.cli import plan as plan_module
from sb3_trpo.cli.callbacks import (
    MaskedRunEvaluation,
    ResumedTensorBoard,
    RunEvaluation,
    RunProgressBar,
    SaveBestModel,
    TextProgress,
)
from sb3_trpo.cli.plan import (
    BATCH_SIZE_DEFAULT,
    DEFAULT_EVAL_EPISODES,
    DEFAULT_EVAL_FREQ,
    Plan,
    Resume,
)
from sb3_trpo.cli.presets import CliError, algorithm_named, model_kwargs
from sb3_trpo.distributed import Replica
from sb3_trpo.masks import with_action_masks
from sb3_trpo.trpo import TRPO
from sb3_trpo.validation import check_spaces


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "env_id",
        metavar="ENV_ID",
        nargs="?",
        help="Gymnasium environment id, e.g. CartPole-v1, or MODULE:ENV_ID to import the module that registers it "
        "(not needed with --resume)",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint, with its settings, to its budget (or --timesteps)",
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
    parser.add_argument(
        "--n-envs",
        type=int,
        help="parallel environments, of all processes together under torchrun (default: the preset's, else 1)",
    )
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
    parser.add_argument(
        "--eval-freq", type=int, help=f"evaluate every this many timesteps (default {DEFAULT_EVAL_FREQ:,}; 0: never)"
    )
    parser.add_argument(
        "--eval-episodes", type=int, help=f"episodes per periodic evaluation (default {DEFAULT_EVAL_EPISODES})"
    )
    parser.add_argument(
        "--checkpoint-freq",
        type=int,
        help="write a checkpoint (the latest is kept, in RUN_DIR/checkpoints) every this many timesteps, from which "
        "--resume continues (default: every 10%% of the budget; 0: never)",
    )
    parser.add_argument(
        "--vec-env",
        choices=["dummy", "subproc", "envpool"],
        help="step the environments in this process (dummy, the default: measured faster here on MuJoCo and classic "
        "control tasks with 2 environments), in one process each (subproc: for environments slower than the pipe "
        "round trip, ~0.2 ms), or in EnvPool's C++ threads (envpool: its MuJoCo and classic-control tasks, `pip "
        'install "sb3-trpo[envpool]"`; pays with many environments per step, e.g. --n-envs 8; evaluation stays on '
        "gymnasium's environment)",
    )
    parser.add_argument(
        "--envpool-threads",
        type=int,
        help="EnvPool's threads per process with --vec-env envpool (default: the machine's cores, shared by its processes)",
    )
    parser.add_argument(
        "--action-masks",
        choices=["auto", "on", "off"],
        help="learn with invalid-action masks (MaskableTRPO, or MaskableRecurrentTRPO with an LSTM policy): auto "
        "(the default) when the environment offers them, as an action_masks() method or info['action_mask']",
    )
    parser.add_argument("--no-progress-bar", action="store_true", help="do not show the progress bar")
    parser.add_argument("--verbose", type=int, default=0, choices=[0, 1, 2], help="SB3's log verbosity")


def run(args: argparse.Namespace) -> int:
    # before the id is looked up: these modules register it (the module of MODULE:ENV_ID is imported by check_env_id)
    runs.import_gym_packages(args.gym_packages)
    device, backend = parallel.device_for_process(args.device)
    replica = parallel.join_if_launched(device, backend)
    # rank 0 decides (a drawn seed, the next free folder, the checkpoint's bytes) and every rank follows
    plan = parallel.decided_by_rank_0(replica, lambda: plan_module.decide(args, replica.world_size))
    _train(plan, args, replica, device)
    parallel.leave(replica)  # after an error, torchrun stops the other processes
    return 0


def _train(plan: Plan, args: argparse.Namespace, replica: Replica, device: th.device) -> None:
    """Train this rank's part of the run the plan describes; rank 0 writes the run folder."""
    config, settings, output, resume = plan.config, plan.settings, plan.output, plan.resume
    world_size, main = replica.world_size, replica.is_main
    # a process-wide setting: the CLI owns its process, the library never changes it
    th.set_num_threads(args.threads)
    env_id = str(config["env_id"])
    # rank 0 imported them while deciding; every rank needs the registrations (a resumed run's, or an elastic restart
    # of one, are on record only, not on the command line)
    gym_packages = runs.recorded_gym_packages(config, output)
    runs.import_gym_packages(gym_packages)
    n_envs = int(config["n_envs"])
    per_process = n_envs // world_size
    seed = resume.seed if resume is not None else int(config["seed"])
    env_kwargs = settings.env_kwargs or None
    vec_env_cls = SubprocVecEnv if config["vec_env"] == "subproc" else DummyVecEnv
    eval_env = runs.make_env(env_id, 1, seed + 1_000_000, env_kwargs=env_kwargs) if main else None
    # rank r's environments take the seeds after those of ranks 0..r-1, as TRPO seeds them (seed + r * n_envs)
    if config["vec_env"] == "envpool":
        threads = runs.envpool_threads(args.envpool_threads, parallel.processes_on_this_machine(world_size))
        # every rank checks EnvPool's spaces against gymnasium's (rank 0's evaluation environment, or one made for it)
        gymnasium_env = eval_env if eval_env is not None else runs.make_env(env_id, 1, None, env_kwargs=env_kwargs)
        env = runs.make_envpool_env(env_id, per_process, seed + replica.rank * per_process, env_kwargs, threads, gymnasium_env)
        if gymnasium_env is not eval_env:
            gymnasium_env.close()
    else:
        env = runs.make_env(
            env_id,
            per_process,
            seed + replica.rank * per_process,
            env_kwargs,
            vec_env_cls=vec_env_cls,
            gym_packages=gym_packages,
        )
    try:  # the environment's own mistake, not the hyperparameters' (TRPO's constructor would say the same later)
        check_spaces(env.observation_space, env.action_space)
    except ValueError as error:
        raise CliError(f"environment {env_id}: {error}") from None
    _check_policy_fits(settings.policy, env.observation_space, settings.hyperparams.get("policy_kwargs"), env_id)
    algorithm = algorithm_named(str(config["algorithm"]))  # RecurrentTRPO for an LSTM policy, Maskable... with masks
    gamma = settings.hyperparams.get("gamma", 0.99)
    if resume is not None and resume.vec_normalize is not None:
        env = _unpickled(resume.vec_normalize, env)
    elif settings.normalize:
        env = VecNormalize(env, gamma=gamma)
    if settings.normalize and eval_env is not None:
        # evaluation sees normalized observations (statistics synchronized by EvalCallback) and the true rewards
        eval_env = VecNormalize(eval_env, gamma=gamma, training=False, norm_reward=False)
    masked = bool(config.get("action_masks", False))
    if masked and eval_env is not None:
        # wrapped as the model wraps the training environment: the same layers, which EvalCallback synchronizes
        eval_env = with_action_masks(eval_env)
    tensorboard_log = config["tensorboard_log"]
    # each process's share of the critic minibatch: the global minibatch is the preset's
    batch_size = int(settings.hyperparams.get("batch_size", BATCH_SIZE_DEFAULT)) // world_size
    distributed = world_size > 1
    try:
        if resume is None:
            kwargs = {**model_kwargs(settings.hyperparams), "batch_size": batch_size}
            model = algorithm(
                settings.policy,
                env,
                seed=seed,
                device=device,
                verbose=args.verbose,
                tensorboard_log=tensorboard_log,
                distributed=distributed,
                **kwargs,
            )
        else:
            model = algorithm.load(
                io.BytesIO(resume.model),
                env=env,
                device=device,
                verbose=args.verbose,
                tensorboard_log=tensorboard_log,
                distributed=distributed,
                batch_size=batch_size,
            )
            model.set_random_seed(seed)
    except (ValueError, TypeError) as error:
        raise CliError(f"bad hyperparameters for {env_id}: {error}") from None

    start = resume.timesteps if resume is not None else 0
    timesteps = int(config["timesteps"])
    callbacks: list[BaseCallback] = []
    if main:
        _write_run_folder(plan)
        what = "Resuming" if resume is not None else "Training"
        processes = f" on {world_size} processes" if distributed else ""
        print(
            f"{what} {algorithm.__name__} on {env_id} for {timesteps:,} timesteps, seed {config['seed']}, {n_envs} "
            f"env(s){processes} -> {output}"
        )
        if resume is not None:
            print(f"From the checkpoint at {start:,} timesteps ({resume.checkpoint}); this part's seed {seed}")
        print(f"Preset: {settings.source or 'none for this environment: TRPO defaults'}")
        if settings.env_kwargs:
            print(f"Environment keywords: {settings.env_kwargs}")
        if resume is not None and resume.tensorboard_dir is not None:
            _continue_tensorboard(model, resume, args.verbose)
        callbacks = _callbacks(plan, args, model, eval_env, world_size)

    begun = time.perf_counter()
    if start < timesteps:
        model.learn(
            timesteps - start,
            callback=CallbackList(callbacks),
            tb_log_name=algorithm.__name__,
            reset_num_timesteps=resume is None,
        )
    elif main:  # killed after its last checkpoint, which holds the trained model (see plan._resume_plan)
        print(f"The run finished training: writing its final model from the checkpoint at {start:,} timesteps")
    wall = time.perf_counter() - begun
    if not main:
        return
    vec_normalize = env if isinstance(env, VecNormalize) else None
    runs.save_model(model, output / runs.MODEL, vec_normalize)
    if vec_normalize is not None:
        runs.save_statistics(vec_normalize, output / runs.VEC_NORMALIZE)
    assert eval_env is not None
    _summary(model, eval_env, output, wall, start, masked)


def _unpickled(vec_normalize: bytes, env: VecEnv) -> VecNormalize:
    """VecNormalize's statistics as saved (what ``VecNormalize.load`` reads from a file), around ``env``."""
    loaded = pickle.loads(vec_normalize)
    loaded.set_venv(env)
    return loaded


def _write_run_folder(plan: Plan) -> None:
    """Rank 0, once every rank has built its model: replace an earlier run (``--overwrite``), record the settings,
    and on resume put the evaluation history and best model back as they were at the checkpoint."""
    output = plan.output
    # only now that everything is valid: a refused --overwrite leaves the earlier run as it was
    for name in plan.old_run:
        path = output / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if plan.old_run:
        print(f"Replacing the run in {output} (--overwrite): removed {', '.join(plan.old_run)}")
    output.mkdir(parents=True, exist_ok=True)
    if plan.resume is not None:
        checkpointing.restore_run_files(plan.resume.checkpoint, output)
    runs.write_config(output, plan.config)


def _continue_tensorboard(model: TRPO, resume: Resume, verbose: int) -> None:
    """Log into the run's TensorBoard folder after the checkpoint: what the killed run logged after it is purged
    from the curves (TensorBoard's ``purge_step``), as those iterations are done again, and the values of the
    update before the checkpoint (which SB3 logs after the next rollout) are logged then."""
    assert resume.tensorboard_dir is not None
    folder = resume.tensorboard_dir
    output_formats: list[KVWriter] = [ResumedTensorBoard(folder, purge_step=resume.timesteps + 1)]
    if verbose >= 1:
        output_formats.insert(0, make_output_format("stdout", folder))
    logger = Logger(folder=folder, output_formats=output_formats)
    for key, (value, excluded) in checkpointing.read_state(resume.checkpoint).get("pending_logs", {}).items():
        logger.record(key, value, exclude=None if excluded is None else tuple(excluded))
    model.set_logger(logger)


def _callbacks(
    plan: Plan, args: argparse.Namespace, model: TRPO, eval_env: VecEnv | None, world_size: int
) -> list[BaseCallback]:
    """Rank 0's callbacks: periodic evaluation, checkpoints and progress."""
    config, output, resume = plan.config, plan.output, plan.resume
    n_envs, timesteps = int(config["n_envs"]), int(config["timesteps"])
    callbacks: list[BaseCallback] = []
    evaluation = None
    if config["eval_freq"] > 0:
        assert eval_env is not None
        masked = bool(config.get("action_masks", False))
        evaluation_class: type[EvalCallback] = MaskedRunEvaluation if masked else RunEvaluation
        evaluation = evaluation_class(
            eval_env,
            n_eval_episodes=int(config["eval_episodes"]),
            eval_freq=max(int(config["eval_freq"]) // n_envs, 1),  # counted in calls, one call = n_envs steps
            # the best model with the statistics it was evaluated with, inside it and beside it (a later best
            # overwrites both)
            callback_on_new_best=SaveBestModel(output),
            log_path=str(output),
            deterministic=True,
            verbose=0,
        )
        if resume is not None:
            checkpointing.restore_evaluations(evaluation, resume.checkpoint, resume.timesteps, n_envs)
        callbacks.append(evaluation)
    if config["checkpoint_freq"] > 0:
        last = resume.timesteps if resume is not None else 0
        callbacks.append(checkpointing.RunCheckpoint(output, int(config["checkpoint_freq"]), evaluation, last))
    if not args.no_progress_bar:
        if _rich_progress_bar_available():
            callbacks.append(RunProgressBar(world_size))
        else:
            callbacks.append(TextProgress(timesteps))
    return callbacks


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


def _summary(model: TRPO, eval_env: VecEnv, output: Path, wall: float, start: int, masked: bool) -> None:
    env = model.get_env()
    assert env is not None
    sync_envs_normalization(env, eval_env)  # the final observation statistics, as the saved VecNormalize holds them
    episodes = 10
    returns, _ = runs.evaluate(model, eval_env, episodes, deterministic=True, masked=masked)
    mean, std = float(np.mean(returns)), float(np.std(returns))
    lines = [
        "",
        "Summary",
        f"  timesteps        {model.num_timesteps:,}"
        + (f" ({start:,} before resuming)" if start else "")
        + f", {model.num_timesteps - start:,} in {wall:.1f} s ({(model.num_timesteps - start) / max(wall, 1e-9):.0f} steps/s)",
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
