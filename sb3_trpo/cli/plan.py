"""What ``sb3-trpo train`` is asked to do, decided once (by rank 0 under torchrun) before anything is built: a new
run, ``--resume RUN_DIR``, or, for workers torchrun restarted, the run their launch began."""

import argparse
import inspect
import json
import platform
import random
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import stable_baselines3
import torch as th

import sb3_trpo
from sb3_trpo.cli import checkpointing, parallel, runs
from sb3_trpo.cli.presets import CliError, Preset, algorithm_for, apply_overrides, preset_for
from sb3_trpo.trpo import TRPO

DEFAULT_EVAL_FREQ = 10_000
DEFAULT_EVAL_EPISODES = 5
#: TRPO's critic minibatch when the preset does not set one
BATCH_SIZE_DEFAULT = int(inspect.signature(TRPO.__init__).parameters["batch_size"].default)
#: how the environments step unless --vec-env says otherwise: in this process, measured faster than one process per
#: environment on Hopper-v5 (1.65x) and CartPole-v1 (2.15x) with 2 environments (benchmarks/results/vec_env.md)
DEFAULT_VEC_ENV = "dummy"


class Resume(NamedTuple):
    """Where a resumed run starts: its latest checkpoint, read by rank 0 for every rank.

    :param checkpoint: the checkpoint folder
    :param timesteps: its timestep count
    :param model: the saved model's bytes
    :param vec_normalize: the pickled VecNormalize's bytes, if the run normalizes
    :param tensorboard_dir: the TensorBoard folder the run logs into, if any
    :param seed: the seed of this part of the run (see :func:`segment_seed`)
    """

    checkpoint: Path
    timesteps: int
    model: bytes
    vec_normalize: bytes | None
    tensorboard_dir: str | None
    seed: int


class Plan(NamedTuple):
    """Everything a rank needs to train its part of the run, decided once by rank 0.

    :param config: the run's settings, as ``config.json`` records them (``n_envs`` counts all processes)
    :param settings: the preset with the overrides applied
    :param output: the run folder
    :param old_run: files of an earlier run in the folder, removed once the new run starts (``--overwrite``)
    :param resume: where a resumed run starts (``None``: from scratch)
    """

    config: dict[str, Any]
    settings: Preset
    output: Path
    old_run: list[str]
    resume: Resume | None


def decide(args: argparse.Namespace, world_size: int) -> Plan:
    """The run ``args`` asks for: a new run, ``--resume``, or (a restarted torchrun worker) the run this launch
    began.

    :raises CliError: for a request that cannot be carried out
    """
    restart = parallel.elastic_restart()
    if args.resume is None and restart is not None:
        # torchrun restarted the workers after a failure: carry on with the run this same launch began, if it has
        # begun (another launch's run in --output is refused as usual)
        config = runs.read_config(args.output) if args.output is not None else None
        if config is not None and config.get("launch") == restart:
            if checkpointing.latest_checkpoint(args.output) is not None:
                print(f"Restarted by torchrun: resuming {args.output} from its latest checkpoint")
                return _resume_plan(args, args.output, world_size, elastic=True)
            print(f"Restarted by torchrun before the first checkpoint: training {args.output} from the start")
            return _new_plan(args, world_size, seed=int(config["seed"]), overwrite=True)
    if args.resume is not None:
        return _resume_plan(args, args.resume, world_size, elastic=False)
    return _new_plan(args, world_size)


def _new_plan(args: argparse.Namespace, world_size: int, seed: int | None = None, overwrite: bool = False) -> Plan:
    if args.env_id is None:
        raise CliError("give ENV_ID to train a new run, or --resume RUN_DIR to continue one.")
    env_name = runs.check_env_id(args.env_id)
    settings = apply_overrides(preset_for(env_name), args.hyperparams)
    n_envs = args.n_envs if args.n_envs is not None else settings.n_envs
    timesteps = args.timesteps if args.timesteps is not None else settings.n_timesteps
    eval_freq = args.eval_freq if args.eval_freq is not None else DEFAULT_EVAL_FREQ
    eval_episodes = args.eval_episodes if args.eval_episodes is not None else DEFAULT_EVAL_EPISODES
    _check_numbers(args, n_envs, timesteps, eval_freq, eval_episodes)
    if args.seed is not None:
        runs.check_seed(args.seed)
    seed = seed if seed is not None else args.seed if args.seed is not None else random.randrange(2**31)
    output = args.output if args.output is not None else _next_free(Path("runs"), env_name)
    if parallel.max_restarts() > 0 and args.output is None:
        raise CliError(
            "torchrun --max-restarts restarts the workers with the same command line: give --output RUN_DIR, so that "
            "they resume the run in it."
        )
    # one run per folder: files of an earlier run would be read as this run's (its best evaluation in the summary,
    # its VecNormalize statistics by eval)
    old_run = runs.files_of_a_run(output)
    if old_run and not (args.overwrite or overwrite):
        raise CliError(
            f"{output} already holds a run ({', '.join(old_run)}): choose another --output folder, pass --overwrite "
            "to replace that run, or --resume it."
        )
    _check_split(n_envs, settings.hyperparams, world_size)
    masked = _learns_with_masks(args.action_masks, args.env_id, settings)
    config = {
        "env_id": args.env_id,  # as given: eval of the run imports the module of a MODULE:ENV_ID again
        "gym_packages": args.gym_packages,  # imported again by eval of the run
        "seed": seed,
        "n_envs": n_envs,  # of all processes together
        "processes": world_size,
        "threads": args.threads,
        "vec_env": args.vec_env or DEFAULT_VEC_ENV,
        "normalize": settings.normalize,
        "env_kwargs": settings.env_kwargs,
        "timesteps": timesteps,
        "eval_freq": eval_freq,
        "eval_episodes": eval_episodes,
        "checkpoint_freq": checkpointing.checkpoint_frequency(args.checkpoint_freq, timesteps),
        "tensorboard_log": None if args.tensorboard_log is None else str(args.tensorboard_log),
        "algorithm": algorithm_for(settings.policy, masked).__name__,  # eval loads the model with it
        "action_masks": masked,
        "policy": settings.policy,
        "hyperparams": settings.hyperparams,
        "preset": settings.source,
        "launch": parallel.elastic_launch_id(),
        "resumes": [],
        "versions": _versions(),
    }
    return Plan(config=config, settings=settings, output=output, old_run=old_run, resume=None)


def _resume_plan(args: argparse.Namespace, run_dir: Path, world_size: int, elastic: bool) -> Plan:
    config = runs.read_config(run_dir)
    if config is None:
        raise CliError(f"--resume {run_dir}: no run there (no {runs.CONFIG}); give the folder of a run of sb3-trpo train.")
    checkpoint = checkpointing.latest_checkpoint(run_dir)
    if checkpoint is None or "eval_freq" not in config:
        raise CliError(
            f"--resume {run_dir}: the run has no checkpoint to resume from (train writes one every --checkpoint-freq "
            "timesteps, since sb3-trpo 0.1.0's resumable runs); start it again with --overwrite."
        )
    runs.import_gym_packages(runs.recorded_gym_packages(config, run_dir))
    env_name = runs.check_env_id(str(config["env_id"]))
    recorded = Preset(
        n_envs=int(config["n_envs"]),
        normalize=bool(config["normalize"]),
        n_timesteps=int(config["timesteps"]),
        policy=str(config["policy"]),
        hyperparams=dict(config["hyperparams"]),
        source=config.get("preset"),
        env_kwargs=dict(config.get("env_kwargs") or {}),
    )
    if not elastic:  # a restarted worker runs the very command line that began the run
        _refuse_changes(args, run_dir, config, env_name)
    state = checkpointing.read_state(checkpoint)
    done = int(state["timesteps"])
    timesteps = args.timesteps if args.timesteps is not None else int(config["timesteps"])
    # a run killed after its last checkpoint (while it saved its final model or printed its summary) is finished by
    # writing them from the checkpoint: what a restarted worker does, and --resume where the final files are missing
    final_files = [runs.MODEL, *([runs.VEC_NORMALIZE] if recorded.normalize else [])]
    unfinished = elastic or not all((run_dir / name).is_file() for name in final_files)
    if timesteps < done or (timesteps == done and not unfinished):
        raise CliError(
            f"--resume {run_dir}: the run has trained {done:,} timesteps, its budget is {timesteps:,}: pass "
            f"--timesteps N with N > {done:,} to train it further."
        )
    _check_split(recorded.n_envs, recorded.hyperparams, world_size, resumed=True)
    model = (checkpoint / runs.MODEL).read_bytes()
    vec_normalize = checkpoint / runs.VEC_NORMALIZE
    seed = segment_seed(int(config["seed"]), done)
    resume = Resume(
        checkpoint=checkpoint,
        timesteps=done,
        model=model,
        vec_normalize=vec_normalize.read_bytes() if recorded.normalize else None,
        tensorboard_dir=state.get("tensorboard_dir"),
        seed=seed,
    )
    config = {
        **config,
        "timesteps": timesteps,
        "processes": world_size,
        "threads": args.threads,
        "vec_env": args.vec_env or config.get("vec_env", DEFAULT_VEC_ENV),
        "checkpoint_freq": checkpointing.checkpoint_frequency(args.checkpoint_freq, timesteps)
        if args.checkpoint_freq is not None
        else config["checkpoint_freq"],
        "launch": parallel.elastic_launch_id() or config.get("launch"),  # the launch that trains it now
        "resumes": [
            *config.get("resumes", []),
            {"from_timesteps": done, "seed": seed, "processes": world_size, "command": " ".join(sys.argv)},
        ],
    }
    return Plan(config=config, settings=recorded, output=run_dir, old_run=[], resume=resume)


def _learns_with_masks(requested: str | None, env_id: str, settings: Preset) -> bool:
    """Whether a new run learns with invalid-action masks (a maskable class): ``--action-masks on`` or ``off`` says so;
    by default (``auto``), when the environment offers them (:func:`~sb3_trpo.cli.runs.offers_action_masks`)."""
    if requested == "off":
        return False
    offered = runs.offers_action_masks(env_id, settings.env_kwargs)
    if requested == "on" and not offered:
        raise CliError(
            f"--action-masks on, but {env_id} offers no masks: give its environments an action_masks() method (or "
            "sb3_contrib's ActionMasker), or put the mask in info['action_mask'] of each step and reset; or drop the "
            "option (masks are used when the environment offers them)."
        )
    return offered


def segment_seed(seed: int, timesteps: int) -> int:
    """The seed of a run's part that resumes at ``timesteps``: derived from the run's seed and the resume point, so
    a resumed run does not replay the environment seeds its start used, and resuming twice from one checkpoint
    draws the same.

    :param seed: the run's seed
    :param timesteps: the checkpoint's timestep count
    """
    return int(np.random.SeedSequence([seed, timesteps]).generate_state(1)[0]) % 2**31


def _refuse_changes(args: argparse.Namespace, run_dir: Path, config: dict[str, Any], env_name: str) -> None:
    """Refuse a ``--resume`` whose options would change what the run trains or how it is evaluated."""
    changes: list[str] = []

    def compare(option: str, given: Any, recorded: Any) -> None:
        if given is not None and _as_json(given) != _as_json(recorded):
            changes.append(f"{option} {given} (the run's: {recorded})")

    compare("ENV_ID", args.env_id, config["env_id"])
    compare("--seed", args.seed, config["seed"])
    compare("--n-envs", args.n_envs, config["n_envs"])
    compare("--eval-freq", args.eval_freq, config["eval_freq"])
    compare("--eval-episodes", args.eval_episodes, config["eval_episodes"])
    compare(
        "--tensorboard-log", None if args.tensorboard_log is None else str(args.tensorboard_log), config["tensorboard_log"]
    )
    compare("--output", None if args.output is None else str(args.output), str(run_dir))
    if args.gym_packages and args.gym_packages != config.get("gym_packages", []):
        changes.append(f"--gym-packages {' '.join(args.gym_packages)} (the run's: {config.get('gym_packages', [])})")
    if args.hyperparams:
        settings = apply_overrides(preset_for(env_name), args.hyperparams)
        given = {"policy": settings.policy, "normalize": settings.normalize, "env_kwargs": settings.env_kwargs}
        recorded = {key: config[key] for key in given}
        if _as_json({**given, **settings.hyperparams}) != _as_json({**recorded, **config["hyperparams"]}):
            changes.append(f"--hyperparams {' '.join(args.hyperparams)} (the run's: {config['hyperparams']})")
    if args.action_masks in ("on", "off") and (args.action_masks == "on") != bool(config.get("action_masks", False)):
        changes.append(f"--action-masks {args.action_masks} (the run's: {'on' if config.get('action_masks') else 'off'})")
    if args.overwrite:
        changes.append("--overwrite (a resumed run keeps its folder)")
    if changes:
        raise CliError(
            f"--resume {run_dir} keeps the run's settings, but {'; '.join(changes)}: drop these options (only "
            "--timesteps, --threads, --device, --vec-env, --checkpoint-freq and output options may change), or "
            "train a new run."
        )


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _check_numbers(args: argparse.Namespace, n_envs: int, timesteps: int, eval_freq: int, eval_episodes: int) -> None:
    for flag, value in (("--n-envs", n_envs), ("--timesteps", timesteps), ("--eval-episodes", eval_episodes)):
        if value < 1:
            raise CliError(f"{flag} {value}: must be >= 1.")
    if args.threads < 1:
        raise CliError(f"--threads {args.threads}: must be >= 1.")
    if eval_freq < 0:
        raise CliError(f"--eval-freq {eval_freq}: must be >= 0 (0 turns periodic evaluation off).")
    if args.checkpoint_freq is not None and args.checkpoint_freq < 0:
        raise CliError(f"--checkpoint-freq {args.checkpoint_freq}: must be >= 0 (0 writes no checkpoints).")


def _check_split(n_envs: int, hyperparams: dict[str, Any], world_size: int, resumed: bool = False) -> None:
    """Refuse a data-parallel run whose environments or critic minibatch do not split evenly over the processes.

    The preset is the run's, whatever the number of processes: its ``n_envs`` environments and critic
    ``batch_size`` are divided among them, so the global rollout and minibatch are the preset's.
    """
    if world_size == 1:
        return
    batch_size = hyperparams.get("batch_size", BATCH_SIZE_DEFAULT)
    for name, value in (("n_envs", n_envs), ("batch_size", batch_size)):
        if value % world_size:
            change = "" if resumed else f", or set --n-envs / --hyperparams batch_size=... to a multiple of {world_size}"
            raise CliError(
                f"{world_size} processes share the run's {name}={value}, which they cannot split evenly: launch a "
                f"number of processes that divides it{change}."
            )


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
