"""What a training run leaves in its folder, and making its environments, shared by the subcommands."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecEnv

from sb3_trpo.cli.presets import CliError

CONFIG = "config.json"  # environment, seed, run settings and hyperparameters of the run
MODEL = "model.zip"  # the model at the end of training
BEST_MODEL = "best_model.zip"  # the model with the best periodic evaluation (SB3's EvalCallback)
VEC_NORMALIZE = "vecnormalize.pkl"  # VecNormalize statistics at the end of training, when normalized
BEST_VEC_NORMALIZE = "best_vecnormalize.pkl"  # VecNormalize statistics when the best model was saved, when normalized
EVALUATIONS = "evaluations.npz"  # periodic evaluations: timesteps, returns, episode lengths (SB3's EvalCallback)


def check_env_id(env_id: str) -> None:
    """Refuse an environment id Gymnasium does not know, saying what it knows.

    :raises CliError: for an unknown id
    """
    try:
        gym.spec(env_id)
    except gym.error.Error as error:
        raise CliError(
            f"unknown environment {env_id!r} ({error}). Use a registered Gymnasium id such as CartPole-v1 or "
            "Pendulum-v1; MuJoCo and Box2D tasks need `pip install gymnasium[mujoco]` or `gymnasium[box2d]`."
        ) from None


def make_env(
    env_id: str,
    n_envs: int,
    seed: int | None,
    env_kwargs: dict[str, Any] | None = None,
    wrapper_class: Callable[[gym.Env], gym.Env] | None = None,
) -> VecEnv:
    """SB3's ``make_vec_env`` (with ``Monitor``), turning a missing optional dependency or a keyword the environment
    does not take into a clear error."""
    check_env_id(env_id)
    try:
        return make_vec_env(env_id, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs, wrapper_class=wrapper_class)
    except gym.error.DependencyNotInstalled as error:
        raise CliError(f"environment {env_id!r} cannot be created here: {error}") from None
    except TypeError as error:
        if not env_kwargs:
            raise
        raise CliError(
            f"environment {env_id!r} does not take env_kwargs {env_kwargs!r} ({error}); use the keywords its "
            "constructor lists (gymnasium.make(env_id, **env_kwargs))."
        ) from None


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
