"""``sb3-trpo eval MODEL_PATH [ENV_ID]``: mean and standard deviation of the return over N episodes."""

import argparse
import importlib.util
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.wrappers import RecordVideo
from stable_baselines3.common.preprocessing import is_image_space, is_image_space_channels_first
from stable_baselines3.common.vec_env import VecEnv, VecNormalize, VecTransposeImage

from sb3_trpo.cli import runs
from sb3_trpo.cli.presets import CliError
from sb3_trpo.masks import with_action_masks
from sb3_trpo.trpo import TRPO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_path", metavar="MODEL_PATH", type=Path, help="a run folder (from `train`) or a model .zip")
    parser.add_argument(
        "env_id",
        metavar="ENV_ID",
        nargs="?",
        help="environment, ENV_ID or MODULE:ENV_ID (default: the run's, from config.json)",
    )
    runs.add_gym_packages_argument(parser)
    parser.add_argument("--episodes", type=int, default=10, help="number of episodes (default 10)")
    parser.add_argument("--best", action="store_true", help="in a run folder, evaluate the best model instead of the final")
    parser.add_argument("--stochastic", action="store_true", help="sample actions instead of taking the most likely")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation environment (default 0)")
    parser.add_argument("--video", type=Path, metavar="DIR", help="record every episode as a video into DIR (needs moviepy)")
    parser.add_argument("--device", default="auto", help='torch device: "auto" (default), "cpu", "cuda", ...')


def run(args: argparse.Namespace) -> int:
    if args.episodes < 1:
        raise CliError(f"--episodes {args.episodes}: must be >= 1.")
    runs.check_seed(args.seed)
    model_file, run_folder = _locate(args.model_path, args.best)
    config = runs.read_config(run_folder) or {}
    statistics, note = _statistics_for(model_file, run_folder, _normalized(config, run_folder))
    # the run's packages (which its environment needed), then eval's own, each once, before the id is looked up
    runs.import_gym_packages(dict.fromkeys([*runs.recorded_gym_packages(config, run_folder), *args.gym_packages]))
    env_id = args.env_id or config.get("env_id")
    if env_id is None:
        raise CliError(
            f"ENV_ID is needed: {run_folder / runs.CONFIG} does not exist to say which environment {model_file} is for."
        )
    runs.check_env_id(env_id)  # imports the module of a MODULE:ENV_ID: a mistake in the id before loading the model
    if args.video is not None and importlib.util.find_spec("moviepy") is None:
        raise CliError("--video needs moviepy, which gymnasium's RecordVideo writes videos with: pip install moviepy")
    try:
        # without an environment: evaluate_policy is given one, and its spaces are checked below with a clearer message
        model = runs.algorithm_of(model_file, config).load(model_file, device=args.device)
    except ValueError as error:
        raise CliError(str(error)) from None

    # the keywords the run's environment was made with (a preset's env_kwargs), when evaluating on that environment
    same_env = "env_id" in config and runs.split_env_id(env_id)[1] == runs.split_env_id(str(config["env_id"]))[1]
    env_kwargs = dict(config.get("env_kwargs") or {}) if same_env else {}
    env = runs.make_env(env_id, 1, args.seed, env_kwargs=env_kwargs or None)
    try:
        _check_spaces(model, env, env_id, config.get("env_id"))
    except CliError:
        env.close()
        raise
    if args.video is not None:  # only once the environment fits: RecordVideo creates the video folder
        env.close()
        env = _video_env(env_id, args.seed, args.video, args.episodes, env_kwargs)
    if statistics is not None:  # the model was trained on normalized observations: evaluate with the same statistics
        env = _normalized_env(statistics, env, env_id, model_file)
    # a maskable model acts with the environment's masks, wherever it keeps them; without any, its predict warns once
    masked = type(model).__name__.startswith("Maskable") and runs.offers_action_masks(env_id, env_kwargs)
    if masked:
        env = with_action_masks(env)
    returns, lengths = runs.evaluate(model, env, args.episodes, deterministic=not args.stochastic, masked=masked)
    env.close()
    if note is not None:
        print(f"sb3-trpo eval: note: {note}", file=sys.stderr)
    returns_array, lengths_array = np.asarray(returns, dtype=float), np.asarray(lengths, dtype=float)
    mode = "stochastic" if args.stochastic else "deterministic"
    print(
        f"{env_id}: return {returns_array.mean():.2f} +/- {returns_array.std():.2f} over {args.episodes} episodes ({mode}), "
        f"episode length {lengths_array.mean():.1f}, model {model_file}"
    )
    if args.video is not None:
        print(f"videos in {args.video}")
    return 0


def _check_spaces(model: TRPO, env: VecEnv, env_id: str, trained_on: Any) -> None:
    """Refuse an environment whose observations or actions are not the model's, as SB3's ``load(env=...)`` would,
    but in one line: SB3's message prints the bounds of both spaces, over several lines for larger ones.

    :param model: the loaded model
    :param env: the evaluation environment, before normalization (which keeps its spaces)
    :param env_id: the environment, for the message
    :param trained_on: the run's environment from ``config.json``, if known
    :raises CliError: if the spaces differ
    """
    observation_space = _as_the_model_sees(env.observation_space)
    if observation_space == model.observation_space and env.action_space == model.action_space:
        return
    ours = (runs.describe_space(model.observation_space), runs.describe_space(model.action_space))
    theirs = (runs.describe_space(observation_space), runs.describe_space(env.action_space))
    bounds = " (same shapes, other bounds)" if ours == theirs else ""
    origin = f"the model was trained on {trained_on}" if trained_on else "give the environment the model was trained on"
    raise CliError(
        f"{env_id} does not fit the model: the model observes {ours[0]} and acts in {ours[1]}, {env_id} observes "
        f"{theirs[0]} and acts in {theirs[1]}{bounds}; {origin}."
    )


def _as_the_model_sees(space: spaces.Space) -> spaces.Space:
    """The observation space as SB3 hands it to a policy: images channel-first (SB3 wraps an environment of
    channel-last images in ``VecTransposeImage``, also when loading a model), other spaces as they are."""
    if isinstance(space, spaces.Dict):
        return spaces.Dict({key: _as_the_model_sees(sub) for key, sub in space.spaces.items()})
    if isinstance(space, spaces.Box) and is_image_space(space) and not is_image_space_channels_first(space):
        return VecTransposeImage.transpose_space(space)
    return space


def _locate(path: Path, best: bool) -> tuple[Path, Path]:
    """:return: the model file, and the run folder whose config and VecNormalize statistics go with it"""
    if path.is_dir():
        model_file = path / (runs.BEST_MODEL if best else runs.MODEL)
        if not model_file.is_file():
            raise CliError(f"no model in {path}: {model_file.name} does not exist (is it a run folder made by `train`?).")
        return model_file, path
    if path.is_file():
        return path, path.parent
    with_suffix = path.with_name(path.name + ".zip")
    if with_suffix.is_file():
        return with_suffix, path.parent
    raise CliError(f"{path} does not exist: give a run folder made by `sb3-trpo train` or a model .zip file.")


def _normalized(config: dict[str, Any], run_folder: Path) -> bool | None:
    """:return: whether the run was trained on normalized observations, as its ``config.json`` says (``None``
        without one, e.g. for a model file on its own)

    :raises CliError: for a ``normalize`` that is not true or false
    """
    normalized = config.get("normalize")
    if normalized is not None and not isinstance(normalized, bool):
        raise CliError(f"{run_folder / runs.CONFIG}: normalize must be true or false, not {normalized!r}.")
    return normalized


def _statistics_for(model_file: Path, run_folder: Path, normalized: bool | None) -> tuple[Path | bytes | None, str | None]:
    """:return: the VecNormalize statistics the model was trained and selected with (a file, or the pickled statistics
        the model file carries; ``None`` if not normalized), and a note for the user when a statistics file is in the
        folder but not applied

    The best model goes with the statistics saved when it was selected; the final model with those at the end. A
    run's model file carries them inside (:data:`~sb3_trpo.cli.runs.STATISTICS_MEMBER`), which always go with it:
    those are used first (a kill between writing a model and the ``.pkl`` beside it can leave the file of the model
    before). Otherwise ``config.json``'s ``normalize`` decides whether there must be statistics: a run folder reused
    before ``train`` refused it can hold another run's. Without it (a model file on its own), the statistics beside
    the model are used if there are any.

    :param model_file: the evaluated model
    :param run_folder: the folder of its run
    :param normalized: ``config.json``'s ``normalize``, ``None`` without one
    :raises CliError: for a normalized run without the model's statistics, including a best model of a run that
        has only the final statistics (runs made before they were saved), which would normalize its observations
        differently from how it was trained
    """
    embedded = runs.embedded_statistics(model_file)
    if embedded is not None:
        return embedded, None
    final = run_folder / runs.VEC_NORMALIZE
    best = run_folder / runs.BEST_VEC_NORMALIZE
    wanted = best if model_file.name == runs.BEST_MODEL else final
    if normalized is False:
        if not wanted.is_file():
            return None, None
        # not the model's: evaluating with it would feed the model observations it never saw
        return None, (
            f"not applying {wanted}: {run_folder / runs.CONFIG} says the run was not normalized (normalize: false), "
            "so the file is left from another run in this folder."
        )
    if wanted.is_file():
        return wanted, None
    if wanted == best and final.is_file():
        raise CliError(
            f"{run_folder} has no {runs.BEST_VEC_NORMALIZE}: the best model's normalization statistics were not saved "
            f"(the run predates sb3-trpo saving them), and the final {runs.VEC_NORMALIZE} would normalize its "
            "observations differently. Evaluate the final model (without --best), or train the run again."
        )
    if normalized:
        raise CliError(
            f"{wanted} does not exist, and {run_folder / runs.CONFIG} says the run was normalized (normalize: true): "
            "without the statistics it was trained with, the model would see observations it never saw. Restore the "
            "file, or train the run again."
        )
    return None, None


def _video_env(env_id: str, seed: int, video: Path, episodes: int, env_kwargs: dict[str, Any]) -> VecEnv:
    """:return: the evaluation environment, recording each of the ``episodes`` evaluated into ``video``"""
    return runs.make_env(
        env_id,
        1,
        seed,
        env_kwargs={**env_kwargs, "render_mode": "rgb_array"},
        # the evaluated episodes only, not the one the vectorized env starts by itself after the last
        wrapper_class=lambda e: RecordVideo(e, str(video), episode_trigger=lambda i: i < episodes, disable_logger=True),
    )


def _normalized_env(statistics: Path | bytes, env: VecEnv, env_id: str, model_file: Path) -> VecNormalize:
    """:return: ``env`` normalized with the run's statistics, frozen, and with the true rewards

    :param statistics: a statistics file, or the pickled statistics ``model_file`` carries
    :raises CliError: for statistics that cannot be read or are not of ``env``'s observations
    """
    try:
        if isinstance(statistics, bytes):
            normalized = pickle.loads(statistics)
            normalized.set_venv(env)
        else:
            normalized = VecNormalize.load(str(statistics), env)
    except (AssertionError, ValueError, EOFError, pickle.UnpicklingError) as error:
        env.close()
        source = f"the statistics inside {model_file}" if isinstance(statistics, bytes) else str(statistics)
        raise CliError(f"{source} cannot normalize {env_id}'s observations ({error}).") from None
    normalized.training, normalized.norm_reward = False, False
    return normalized
