"""Checkpoints of a command-line run, from which ``sb3-trpo train --resume RUN_DIR`` continues it.

A checkpoint is a folder ``RUN_DIR/checkpoints/<timesteps>/`` holding what the run needs to go on from that
iteration: the model (with the critic's optimizer state and ``num_timesteps``), the VecNormalize statistics, the
evaluation history and the best model so far (with its statistics), and ``state.json``. It is written into a
hidden folder that is renamed into place once complete, so a kill while writing leaves the previous checkpoint as
the latest one; the older checkpoint is removed only after that.

Checkpoints are written at the start of a rollout, when the parameters are those of the last update and
``num_timesteps`` counts whole rollouts: a resumed run redoes at most the rollouts since then. The environments'
own state (positions, episode progress, random generators) is not saved, so a resumed run is not bit-identical to
an uninterrupted one; the model, its optimizer state, the statistics, the timestep count and the evaluation history
are.
"""

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback

from sb3_trpo.cli import runs
from sb3_trpo.cli.presets import CliError

CHECKPOINTS = runs.RUN_FOLDERS[0]  # the folder of a run's checkpoints
STATE = "state.json"  # timesteps and evaluation bookkeeping of a checkpoint
#: the run's files a checkpoint holds a copy of, to put back on resume (absent ones are absent in the run too)
RESTORED_FILES = (runs.EVALUATIONS, runs.BEST_MODEL, runs.BEST_VEC_NORMALIZE)


def checkpoint_frequency(requested: int | None, budget: int) -> int:
    """:return: timesteps between checkpoints: as requested, else every 10% of the budget

    :param requested: ``--checkpoint-freq`` (``None``: the default; 0: no checkpoints)
    :param budget: the run's budget in timesteps
    """
    return max(budget // 10, 1) if requested is None else requested


def latest_checkpoint(run_dir: Path) -> Path | None:
    """:return: the folder of the run's latest complete checkpoint, or ``None`` if it has none

    :param run_dir: the run folder
    """
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return None
    complete = [path for path in folder.iterdir() if path.name.isdigit() and (path / STATE).is_file()]
    return max(complete, key=lambda path: int(path.name), default=None)


def read_state(checkpoint: Path) -> dict[str, Any]:
    """:return: the bookkeeping of a checkpoint (``timesteps``, ``best_mean_reward``, ``last_mean_reward``,
    ``tensorboard_dir``)"""
    try:
        state = json.loads((checkpoint / STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CliError(f"{checkpoint / STATE} cannot be read ({error}): resume from an intact copy of the run.") from None
    return state


def restore_run_files(checkpoint: Path, run_dir: Path) -> None:
    """Put the run folder's evaluation history and best model back as they were at the checkpoint: evaluations
    made after it (before the run was killed) are made again when the run resumes, and a best model saved after
    it belongs to them.

    :param checkpoint: the checkpoint folder
    :param run_dir: the run folder
    """
    for name in RESTORED_FILES:
        source, target = checkpoint / name, run_dir / name
        if source.is_file():
            partial = target.with_name(f".{name}.partial")
            shutil.copyfile(source, partial)
            partial.replace(target)
        else:
            target.unlink(missing_ok=True)


def restore_evaluations(callback: EvalCallback, checkpoint: Path, timesteps: int, n_envs: int) -> None:
    """Give a new ``EvalCallback`` the history of the run at the checkpoint, so that ``evaluations.npz`` goes on
    without duplicated or lost rows, a new best model needs a better evaluation than the best so far, and the
    evaluations fall at the same timesteps as in an uninterrupted run.

    :param callback: the resumed run's evaluation callback
    :param checkpoint: the checkpoint folder
    :param timesteps: the checkpoint's timestep count
    :param n_envs: environments (of all processes): one call of the callback is this many timesteps
    """
    state = read_state(checkpoint)
    callback.best_mean_reward = float(state.get("best_mean_reward", -np.inf))
    callback.last_mean_reward = float(state.get("last_mean_reward", -np.inf))
    callback.n_calls = timesteps // n_envs
    history = checkpoint / runs.EVALUATIONS
    if not history.is_file():
        return
    with np.load(history) as data:
        callback.evaluations_timesteps = [int(t) for t in data["timesteps"]]
        callback.evaluations_results = [list(row) for row in data["results"]]
        callback.evaluations_length = [list(row) for row in data["ep_lengths"]]
        if "successes" in data:
            callback.evaluations_successes = [list(row) for row in data["successes"]]


def _excluded(formats: Any) -> list[str] | None:
    """The output formats a logged value is excluded from, as JSON can hold them."""
    if formats is None:
        return None
    return [formats] if isinstance(formats, str) else list(formats)


class RunCheckpoint(BaseCallback):
    """Write a checkpoint of the run every ``frequency`` timesteps (at the start of a rollout) and at the end of
    training, keeping the latest only.

    :param run_dir: the run folder
    :param frequency: timesteps between checkpoints
    :param eval_callback: the run's evaluation callback, whose bookkeeping goes into the checkpoint
    :param last: timestep count of the checkpoint the run resumed from (0 for a new run)
    """

    def __init__(self, run_dir: Path, frequency: int, eval_callback: EvalCallback | None, last: int = 0) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.frequency = frequency
        self.eval_callback = eval_callback
        self.last = last

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        if self.model.num_timesteps - self.last >= self.frequency:
            self.write()

    def _on_training_end(self) -> None:
        if self.model.num_timesteps > self.last:
            self.write()

    def write(self) -> Path:
        """Write a checkpoint of the run as it is now.

        :return: its folder
        """
        timesteps = self.model.num_timesteps
        folder = self.run_dir / CHECKPOINTS
        target = folder / str(timesteps)
        partial = folder / f".{timesteps}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        self.model.save(partial / runs.MODEL)
        vec_normalize = self.model.get_vec_normalize_env()
        if vec_normalize is not None:
            vec_normalize.save(str(partial / runs.VEC_NORMALIZE))
        for name in RESTORED_FILES:
            if (self.run_dir / name).is_file():
                shutil.copyfile(self.run_dir / name, partial / name)
        evaluation = self.eval_callback
        state = {
            "timesteps": timesteps,
            "best_mean_reward": None if evaluation is None else float(evaluation.best_mean_reward),
            "last_mean_reward": None if evaluation is None else float(evaluation.last_mean_reward),
            "tensorboard_dir": self.model.logger.get_dir() if self.model.tensorboard_log is not None else None,
            # the last update's train/* values, which SB3 logs after the next rollout: the resumed run logs them
            "pending_logs": {
                key: [float(value), _excluded(self.model.logger.name_to_excluded.get(key))]
                for key, value in self.model.logger.name_to_value.items()
                if isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            },
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (partial / STATE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        if target.exists():  # a checkpoint at this count from before a resume: this one replaces it
            shutil.rmtree(target)
        partial.rename(target)  # the checkpoint exists, complete, from here on
        for old in folder.iterdir():  # earlier checkpoints, and what a kill while writing one left
            if old != target and (old.name.isdigit() or old.name.endswith(".partial")):
                shutil.rmtree(old, ignore_errors=True)
        self.last = timesteps
        return target
