"""What a training run leaves in its folder, and making its environments, shared by the subcommands."""

import argparse
import importlib
import io
import json
import os
import pickle
import sys
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecNormalize

from sb3_trpo.cli.presets import ALGORITHMS, CliError, algorithm_named
from sb3_trpo.envpool_env import EnvPoolVecEnv, check_same_spaces
from sb3_trpo.masks import INFO_KEY, METHOD, mask_sizes
from sb3_trpo.masks import evaluate_policy as evaluate_with_masks
from sb3_trpo.model_files import save_atomically
from sb3_trpo.trpo import TRPO

CONFIG = "config.json"  # environment, seed, run settings and hyperparameters of the run
MODEL = "model.zip"  # the model at the end of training
BEST_MODEL = "best_model.zip"  # the model with the best periodic evaluation (SB3's EvalCallback)
VEC_NORMALIZE = "vecnormalize.pkl"  # VecNormalize statistics at the end of training, when normalized
BEST_VEC_NORMALIZE = "best_vecnormalize.pkl"  # VecNormalize statistics when the best model was saved, when normalized
EVALUATIONS = "evaluations.npz"  # periodic evaluations: timesteps, returns, episode lengths (SB3's EvalCallback)
#: the seeds `--seed` takes: those numpy's global generator takes (SB3 seeds it with the run's seed)
SEED_RANGE = range(2**32)
#: every file `train` writes into a run folder: one of them makes the folder hold a run, and --overwrite removes them
RUN_FILES = (CONFIG, MODEL, BEST_MODEL, VEC_NORMALIZE, BEST_VEC_NORMALIZE, EVALUATIONS)
#: the folders `train` writes into a run folder (its checkpoints), removed by --overwrite too
RUN_FOLDERS = ("checkpoints",)
#: the member of a run's model.zip and best_model.zip holding the VecNormalize statistics that go with the model (SB3
#: reads only "data" and the .pth members, so the file loads everywhere as an ordinary model)
STATISTICS_MEMBER = "sb3_trpo_vecnormalize.pkl"


def save_model(model: BaseAlgorithm, path: Path, vec_normalize: VecNormalize | None) -> None:
    """Save a run's model with the statistics it goes with inside (see :data:`STATISTICS_MEMBER`), in one atomic write:
    a kill between writing the model and its ``.pkl`` beside it can then never pair the model with another model's
    statistics, since the model file carries its own.

    :param model: the model
    :param path: the model file
    :param vec_normalize: the training environment's statistics (``None``: not normalized)
    """
    buffer = io.BytesIO()
    model.save(buffer)
    if vec_normalize is not None:
        with zipfile.ZipFile(buffer, "a") as archive:
            archive.writestr(STATISTICS_MEMBER, pickle.dumps(vec_normalize))

    def write(file: io.BufferedWriter) -> None:
        file.write(buffer.getvalue())

    save_atomically(path, write)


def save_statistics(vec_normalize: VecNormalize, path: Path) -> None:
    """``VecNormalize.save``, atomically (SB3 writes the file in place, which a kill leaves truncated)."""
    save_atomically(path, lambda file: pickle.dump(vec_normalize, file))


def embedded_statistics(model_file: Path) -> bytes | None:
    """:return: the pickled VecNormalize statistics a run's model file carries (``None``: none, e.g. a model saved
    before they were embedded, by a library script, or of a run without normalization)"""
    try:
        with zipfile.ZipFile(model_file) as archive:
            return archive.read(STATISTICS_MEMBER) if STATISTICS_MEMBER in archive.namelist() else None
    except (OSError, zipfile.BadZipFile):
        return None  # TRPO.load says what is wrong with the file


def files_of_a_run(folder: Path) -> list[str]:
    """:return: the names of the files of a run that ``folder`` holds (none if it does not exist)

    :param folder: a run folder
    :raises CliError: if ``folder`` is a file
    """
    if folder.exists() and not folder.is_dir():
        raise CliError(f"--output {folder} is a file: give a folder for the run.")
    return [name for name in RUN_FILES if (folder / name).is_file()] + [
        name for name in RUN_FOLDERS if (folder / name).is_dir()
    ]


def split_env_id(env_id: str) -> tuple[str | None, str]:
    """Gymnasium's ``MODULE:ENV_ID`` form, as ``gymnasium.make`` reads it: the module to import, which registers the
    environment, and the registered id.

    :param env_id: ``ENV_ID`` or ``MODULE:ENV_ID``
    :return: the module (``None`` without one) and the id
    :raises CliError: for more than one colon or an empty part, which ``gymnasium.make`` cannot read either
    """
    if ":" not in env_id:
        return None, env_id
    module, _, name = env_id.partition(":")
    if not module or not name or ":" in name:
        raise CliError(f"environment {env_id!r}: expected ENV_ID or MODULE:ENV_ID, e.g. my_package.envs:MyEnv-v0.")
    return module, name


def import_gym_packages(modules: Iterable[str]) -> None:
    """Import modules that register environments with Gymnasium when imported (rl-zoo3's ``--gym-packages``).

    Only a module that cannot be found or imported is the user's mistake (one line); any other exception is raised
    by the module's own code, whose traceback its author needs.

    :param modules: module names, e.g. ``my_package.envs``
    :raises CliError: for a module that cannot be imported
    """
    # `python -m sb3_trpo` searches the working directory first, the `sb3-trpo` console script does not (its own
    # folder is first on sys.path): a user's module beside them is found either way, as their own scripts find it
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise CliError(
                f"cannot import {module!r} ({error}): give a module that is installed, in the working directory or on "
                "PYTHONPATH, and registers its environments with gymnasium.register when imported."
            ) from None


def add_gym_packages_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--gym-packages MODULE ...`` (rl-zoo3's option) to a subcommand that takes an environment id.

    :param parser: the subcommand's parser
    """
    parser.add_argument(
        "--gym-packages",
        nargs="+",
        action="extend",
        default=[],
        metavar="MODULE",
        # nargs="+" would also take ENV_ID if the option came first: hence after ENV_ID, or closed by --
        help="modules to import before ENV_ID is looked up, for packages that register environments when imported "
        "(give it after ENV_ID, or last as --gym-packages MODULE ... -- ENV_ID)",
    )


def recorded_gym_packages(config: dict[str, Any], folder: Path) -> list[str]:
    """:return: the ``--gym-packages`` a run was trained with, as its ``config.json`` records them (none before they
    were recorded)

    :param config: the run's settings
    :param folder: the run folder, for the message
    :raises CliError: if ``gym_packages`` is not a list of module names
    """
    packages = config.get("gym_packages", [])
    if not isinstance(packages, list) or not all(isinstance(module, str) for module in packages):
        raise CliError(f"{folder / CONFIG}: gym_packages must be a list of module names, not {packages!r}.")
    return packages


def check_env_id(env_id: str) -> str:
    """Import the module of a ``MODULE:ENV_ID`` (as ``gymnasium.make`` does), then refuse an environment id Gymnasium
    does not know, saying what it knows.

    :param env_id: ``ENV_ID`` or ``MODULE:ENV_ID``
    :return: the registered id, which ``gymnasium.make`` takes once the module is imported
    :raises CliError: for a module that cannot be imported or an unknown id
    """
    module, name = split_env_id(env_id)
    if module is not None:
        import_gym_packages([module])
    try:
        gym.spec(name)
    except gym.error.Error as error:
        raise CliError(
            f"unknown environment {env_id!r} ({error}). Use a registered Gymnasium id such as CartPole-v1 or "
            "Pendulum-v1; MuJoCo and Box2D tasks need `pip install gymnasium[mujoco]` or `gymnasium[box2d]`; "
            "an environment your own package registers is MODULE:ENV_ID or ENV_ID --gym-packages MODULE."
        ) from None
    return name


def make_env(
    env_id: str,
    n_envs: int,
    seed: int | None,
    env_kwargs: dict[str, Any] | None = None,
    wrapper_class: Callable[[gym.Env], gym.Env] | None = None,
    vec_env_cls: type[DummyVecEnv] | type[SubprocVecEnv] = DummyVecEnv,
    gym_packages: Sequence[str] = (),
) -> VecEnv:
    """SB3's ``make_vec_env`` (with ``Monitor``), turning a missing optional dependency or a keyword the environment
    does not take into a clear error.

    :param env_id: ``ENV_ID`` or ``MODULE:ENV_ID`` (the module is imported first)
    :param n_envs: number of environments
    :param seed: seed of the first environment (the others take the next seeds)
    :param env_kwargs: keywords of ``gymnasium.make``
    :param wrapper_class: wrapper applied to each environment
    :param vec_env_cls: ``DummyVecEnv`` (step the environments in this process) or ``SubprocVecEnv`` (one process
        each)
    :param gym_packages: modules that register the environment, imported again by each ``SubprocVecEnv`` process
    """
    name = check_env_id(env_id)
    try:
        if vec_env_cls is DummyVecEnv:
            return make_vec_env(name, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs, wrapper_class=wrapper_class)
        # made once here first, so that what is wrong with the environment is said here, not in a worker's traceback
        make_vec_env(name, n_envs=1, env_kwargs=env_kwargs).close()
        # a worker process starts without the registrations this process made: it makes its environment anew
        maker = MakeRegistered(name, [*gym_packages, *filter(None, [split_env_id(env_id)[0]])])
        return make_vec_env(
            maker, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs, wrapper_class=wrapper_class, vec_env_cls=vec_env_cls
        )
    except gym.error.DependencyNotInstalled as error:
        raise CliError(f"environment {env_id!r} cannot be created here: {error}") from None
    except TypeError as error:
        if not env_kwargs:
            raise
        raise CliError(
            f"environment {env_id!r} does not take env_kwargs {env_kwargs!r} ({error}); use the keywords its "
            "constructor lists (gymnasium.make(env_id, **env_kwargs))."
        ) from None


def make_envpool_env(
    env_id: str, n_envs: int, seed: int | None, env_kwargs: dict[str, Any] | None, threads: int, gymnasium_env: VecEnv
) -> VecEnv:
    """An :class:`~sb3_trpo.envpool_env.EnvPoolVecEnv` of the task, refused with a clear error where EnvPool cannot
    stand in for gymnasium's environment (not installed, no such task, other spaces).

    :param env_id: a gymnasium id EnvPool also has (``MODULE:ENV_ID`` forms are gymnasium's own registrations)
    :param n_envs: number of environments
    :param seed: the pool's seed
    :param env_kwargs: keywords of ``gymnasium.make`` (EnvPool's spelling is used where it differs)
    :param threads: EnvPool's worker threads
    :param gymnasium_env: gymnasium's environment of the same id (the evaluation's), whose spaces must be EnvPool's
    """
    if split_env_id(env_id)[0] is not None:
        raise CliError(f"--vec-env envpool runs EnvPool's own tasks, not {env_id!r} (a module's registration).")
    try:
        env = EnvPoolVecEnv(env_id, n_envs, seed=seed, num_threads=threads, env_kwargs=env_kwargs)
        check_same_spaces(env, gymnasium_env, env_id)
    except ImportError as error:
        raise CliError(f"--vec-env envpool: {error}") from None
    except ValueError as error:
        raise CliError(f"--vec-env envpool: {error}") from None
    return env


def envpool_threads(requested: int | None, processes_here: int) -> int:
    """:return: EnvPool's threads per process: ``requested``, else this machine's cores shared by its processes"""
    if requested is not None:
        if requested < 1:
            raise CliError(f"--envpool-threads {requested}: must be at least 1.")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(cores // max(processes_here, 1), 1)


class MakeRegistered:
    """``gymnasium.make`` of a registered id, as SB3's ``make_vec_env`` makes it, in a process that first imports
    the modules registering it (a ``SubprocVecEnv`` worker, which starts without them).

    :param name: the registered id
    :param modules: modules to import first
    """

    def __init__(self, name: str, modules: Sequence[str]) -> None:
        self.name = name
        self.modules = list(modules)

    def __call__(self, **env_kwargs: Any) -> gym.Env:
        for module in self.modules:
            importlib.import_module(module)
        try:  # make_vec_env asks for rgb_array rendering, unless the environment does not take render_mode
            return gym.make(self.name, **{"render_mode": "rgb_array", **env_kwargs})
        except TypeError:
            return gym.make(self.name, **env_kwargs)


def check_seed(seed: int) -> None:
    """Refuse a seed that seeding would fail on with a traceback (Gymnasium refuses a negative one, numpy one of
    2**32 or more).

    :raises CliError: for a seed out of :data:`SEED_RANGE`
    """
    if seed not in SEED_RANGE:
        raise CliError(f"--seed {seed}: must be an integer from 0 to {SEED_RANGE[-1]}.")


def describe_space(space: spaces.Space) -> str:
    """A space in one short line: shape and dtype of a ``Box`` without its bounds (whose arrays numpy prints over
    several lines for larger spaces).

    :param space: an observation or action space
    """
    if isinstance(space, spaces.Box):
        return f"Box{space.shape} {space.dtype}"
    if isinstance(space, spaces.Discrete):
        return f"Discrete({int(space.n)})" if int(space.start) == 0 else f"Discrete({int(space.n)}, start={int(space.start)})"
    if isinstance(space, spaces.MultiDiscrete):
        return f"MultiDiscrete({space.nvec.tolist()})"
    if isinstance(space, spaces.MultiBinary):
        return f"MultiBinary({space.n})"
    if isinstance(space, spaces.Dict):
        return "Dict(" + ", ".join(f"{key}: {describe_space(sub)}" for key, sub in space.spaces.items()) + ")"
    return type(space).__name__


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """Write the run's settings as JSON (values JSON cannot hold are written as their text)."""
    (folder / CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")


def read_config(folder: Path) -> dict[str, Any] | None:
    """:return: the settings of the run in ``folder``, or ``None`` if it has none"""
    path = folder / CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CliError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(config, dict):
        raise CliError(f"{path} does not hold a run's settings.")
    return config


def algorithm_of(model_file: Path, config: dict[str, Any]) -> type[TRPO]:
    """The class that loads a saved model: the run's ``algorithm`` in ``config.json``, else the one its policy class
    says (sb3-contrib's recurrent policies: ``RecurrentTRPO``; maskable ones: ``MaskableTRPO``; both:
    ``MaskableRecurrentTRPO``), else ``TRPO``.

    :param model_file: a model ``.zip``
    :param config: the run's ``config.json`` (empty for a model outside a run folder)
    :raises CliError: for a class that needs sb3-contrib when it is not installed
    """
    name = config.get("algorithm")
    if name is None:
        try:
            with zipfile.ZipFile(model_file) as archive:
                policy_class = json.loads(archive.read("data"))["policy_class"]
            # SB3 writes a class as its module and the names in its own namespace
            module = str(policy_class.get("__module__", ""))
            recurrent = "_process_sequence" in policy_class or "recurrent" in module
            masked = "maskable" in module
        except (OSError, KeyError, ValueError, TypeError, AttributeError, zipfile.BadZipFile):
            recurrent = masked = False  # a damaged file: TRPO.load's own check says what is wrong with it
        name = next(name for name, kind in ALGORITHMS.items() if kind == (recurrent, masked))
    return algorithm_named(str(name))


def offers_action_masks(env_id: str, env_kwargs: dict[str, Any] | None = None) -> bool:
    """Whether the environment offers invalid-action masks in a way the maskable classes read (:mod:`sb3_trpo.masks`):
    an ``action_masks()`` method (its own or a wrapper's), or ``info["action_mask"]`` at reset. Asked of one
    environment made for the purpose, so the run's environments and their seeds are untouched.

    :param env_id: ``ENV_ID`` or ``MODULE:ENV_ID`` (its module already imported)
    :param env_kwargs: keywords of ``gymnasium.make``
    """
    try:
        env = gym.make(split_env_id(env_id)[1], **(env_kwargs or {}))
    except (TypeError, ImportError, gym.error.Error):
        return False  # an environment that cannot be made: make_env says why, in one line
    try:
        try:
            mask_sizes(env.action_space)
        except ValueError:
            return False  # actions that cannot be masked
        try:
            env.get_wrapper_attr(METHOD)
            return True
        except AttributeError:
            pass
        _, info = env.reset(seed=0)
        return INFO_KEY in info
    finally:
        env.close()


def evaluate(model: BaseAlgorithm, env: VecEnv, episodes: int, deterministic: bool, masked: bool) -> tuple[list, list]:
    """The returns and lengths of ``episodes`` episodes, with the environment's invalid-action masks when ``masked``
    (:func:`sb3_trpo.masks.evaluate_policy`), else SB3's ``evaluate_policy``.

    :param model: the model
    :param env: the evaluation environment (for ``masked``, one that offers masks: :func:`sb3_trpo.masks.with_action_masks`)
    :param episodes: the number of episodes
    :param deterministic: the most likely actions instead of samples
    :param masked: evaluate with masks
    """
    if masked:
        returns, lengths = evaluate_with_masks(
            model, env, n_eval_episodes=episodes, deterministic=deterministic, return_episode_rewards=True
        )
    else:
        returns, lengths = evaluate_policy(
            model, env, n_eval_episodes=episodes, deterministic=deterministic, return_episode_rewards=True
        )
    return list(returns), list(lengths)
