"""The latest checkpoint of a killed library script, as SB3's ``CheckpointCallback`` wrote it."""

import glob
import os
import pathlib
import pickle
import re
import warnings
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

from sb3_trpo.model_files import check_model_file
from sb3_trpo.trpo import TRPO


def load_latest_checkpoint(
    folder: str | os.PathLike,
    env: VecEnv | None = None,
    algorithm: type[BaseAlgorithm] | None = None,
    name_prefix: str = "rl_model",
    **load_kwargs: Any,
) -> BaseAlgorithm | None:
    """Load the latest checkpoint SB3's ``CheckpointCallback`` wrote into ``folder``, with the VecNormalize statistics
    saved with it (``save_vecnormalize=True``) wrapped around ``env``: the step a killed script resumes from.

    A checkpoint whose model or statistics file is damaged or missing (a kill while SB3 wrote it: the callback
    writes the model, then the statistics, each in place) is skipped with a warning, for the one before it.

    :param folder: the callback's ``save_path``
    :param env: the environment to train on, not wrapped in ``VecNormalize`` (the saved statistics are wrapped
        around it when the checkpoints have them)
    :param algorithm: the class that loads the model (default :class:`~sb3_trpo.TRPO`)
    :param name_prefix: the callback's ``name_prefix``
    :param load_kwargs: passed to ``algorithm.load`` (``device=...``, settings to override)
    :return: the model, ``num_timesteps`` at its checkpoint, with ``env`` set (``None`` if ``folder`` has no
        checkpoint yet: start a new model)
    :raises ValueError: if every checkpoint is damaged, or the checkpoints have statistics but ``env`` is ``None``
    """
    if algorithm is None:
        algorithm = TRPO
    root = pathlib.Path(folder)
    pattern = re.compile(rf"{re.escape(name_prefix)}_(\d+)_steps\.zip")
    found = [int(match.group(1)) for path in root.glob("*.zip") if (match := pattern.fullmatch(path.name))]
    normalized = any(root.glob(f"{glob.escape(name_prefix)}_vecnormalize_*_steps.pkl"))
    if normalized and env is None:
        raise ValueError(
            f"The checkpoints in {root} have VecNormalize statistics: pass the environment to train on (not wrapped in "
            "VecNormalize), which the statistics are wrapped around."
        )
    skipped: list[str] = []
    for steps in sorted(found, reverse=True):
        model_path = root / f"{name_prefix}_{steps}_steps.zip"
        try:
            check_model_file(model_path)
        except ValueError as error:
            skipped.append(f"{model_path.name} ({error})")
            continue
        venv = env
        if normalized:
            assert env is not None
            stats_path = root / f"{name_prefix}_vecnormalize_{steps}_steps.pkl"
            try:
                venv = VecNormalize.load(str(stats_path), env)
            except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as error:
                skipped.append(f"{stats_path.name} ({type(error).__name__}: {error})")
                continue
        if skipped:
            warnings.warn(f"Skipped damaged or incomplete checkpoints: {'; '.join(skipped)}.", stacklevel=2)
        return algorithm.load(model_path, env=venv, **load_kwargs)
    if skipped:
        raise ValueError(f"Every checkpoint in {root} is damaged or incomplete: {'; '.join(skipped)}.")
    return None
