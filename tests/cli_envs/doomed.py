"""Registers ``CliDoomed-v0`` (``CliTiny-v0`` that kills its process once) on import, for the tests of resuming.

The process kills itself with SIGKILL, as a pre-empted job or the kernel's OOM killer would, the first time the
condition set by environment variables is met, and never again once the marker file exists (so a restarted or
resumed process runs on):

- ``DOOMED_MARKER``: the marker file (required; nothing is killed without it);
- ``DOOMED_STEP``: kill at this step of this process's environments (counted over all of them, evaluation ones too);
- ``DOOMED_UPDATE``: kill at the start of this process's update number N (1-based), i.e. during ``train()``;
- ``DOOMED_FINAL_SAVE``: kill as the run's final ``model.zip`` is saved, after training and its last checkpoint;
- ``DOOMED_RANK``: only in the data-parallel process of this rank (default: any process).
"""

import os
import signal
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch as th

from sb3_trpo import TRPO
from sb3_trpo.cli import runs
from tests.cli_envs.tiny import EPISODE_STEPS, TinyEnv

ENV_ID = "CliDoomed-v0"
_steps = 0
_updates = 0


def _doomed() -> bool:
    marker = os.environ.get("DOOMED_MARKER")
    if marker is None or Path(marker).exists():
        return False
    rank = os.environ.get("DOOMED_RANK")
    return rank is None or rank == os.environ.get("RANK", "0")


def _die() -> None:
    Path(os.environ["DOOMED_MARKER"]).write_text(f"killed pid {os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


class DoomedEnv(TinyEnv):
    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        global _steps
        _steps += 1
        if "DOOMED_STEP" in os.environ and _steps == int(os.environ["DOOMED_STEP"]) and _doomed():
            _die()
        return super().step(action)


_train = TRPO.train


def _doomed_train(self: TRPO) -> None:
    global _updates
    _updates += 1
    if "DOOMED_UPDATE" in os.environ and _updates == int(os.environ["DOOMED_UPDATE"]) and _doomed():
        _die()
    _train(self)


TRPO.train = _doomed_train  # type: ignore[method-assign]
_save_model = runs.save_model


def _doomed_save_model(model: Any, path: Path, *args: Any, **kwargs: Any) -> None:
    if "DOOMED_FINAL_SAVE" in os.environ and path.name == runs.MODEL and _doomed():
        _die()
    _save_model(model, path, *args, **kwargs)


runs.save_model = _doomed_save_model
gym.register(id=ENV_ID, entry_point=DoomedEnv, max_episode_steps=EPISODE_STEPS)


_learn = TRPO.learn


def _learn_and_dump(self: TRPO, *args: Any, **kwargs: Any) -> TRPO:
    """``learn``, then (with ``DOOMED_DUMP=FOLDER``) this process's parameters to ``FOLDER/rank{RANK}.pt``."""
    model = _learn(self, *args, **kwargs)
    folder = os.environ.get("DOOMED_DUMP")
    if folder is not None:
        parameters = th.cat([t.detach().reshape(-1).cpu() for t in self.policy.state_dict().values()])
        th.save(
            {"parameters": parameters, "num_timesteps": self.num_timesteps},
            Path(folder) / f"rank{os.environ.get('RANK', '0')}.pt",
        )
    return model


TRPO.learn = _learn_and_dump  # type: ignore[method-assign]
