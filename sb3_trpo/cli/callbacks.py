"""The callbacks of ``sb3-trpo train``: evaluation, progress and statistics of a run that may be resumed and may
run on several processes, and its TensorBoard output when it resumes."""

import warnings
from pathlib import Path

from stable_baselines3.common import callbacks as sb3_callbacks
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback, ProgressBarCallback
from stable_baselines3.common.logger import TensorBoardOutputFormat
from torch.utils.tensorboard import SummaryWriter

from sb3_trpo.cli import runs
from sb3_trpo.masks import MaskedEvalCallback


class SaveBestModel(BaseCallback):
    """Save the best model, with the training environment's VecNormalize statistics inside it and beside it; run by
    ``EvalCallback`` at each new best model.

    ``EvalCallback`` evaluates with the training statistics synchronized into the evaluation environment, so the
    statistics saved at that moment are the ones that go with the best model, not those at the end of training.

    :param run_dir: the run folder (``best_model.zip``, ``best_vecnormalize.pkl``)
    """

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = run_dir

    def _on_step(self) -> bool:
        vec_normalize = self.model.get_vec_normalize_env()
        runs.save_model(self.model, self.run_dir / runs.BEST_MODEL, vec_normalize)
        if vec_normalize is not None:
            runs.save_statistics(vec_normalize, self.run_dir / runs.BEST_VEC_NORMALIZE)
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


class OneEvaluationEnvironment(BaseCallback):
    """The set-up of a run's evaluation callback: with ``--vec-env subproc`` its one evaluation environment still
    steps in this process, on purpose (a subprocess would only add its round trip), and SB3 warns that the types
    differ, which is harmless."""

    def _init_callback(self) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Training and eval env are not of the same type")
            super()._init_callback()


class RunEvaluation(OneEvaluationEnvironment, EvalCallback):
    """SB3's ``EvalCallback`` for the one evaluation environment of a run (in a data-parallel run, rank 0's, which
    records the global timesteps: TRPO shows its callbacks the samples of all processes).

    :param eval_env: the evaluation environment
    :param kwargs: ``EvalCallback``'s other arguments
    """


class MaskedRunEvaluation(OneEvaluationEnvironment, MaskedEvalCallback):
    """:class:`RunEvaluation` acting with the evaluation environment's masks (:class:`sb3_trpo.masks.MaskedEvalCallback`).

    :param eval_env: the evaluation environment, offering masks
    :param kwargs: ``EvalCallback``'s other arguments
    """


class RunProgressBar(ProgressBarCallback):
    """SB3's progress bar over the run's whole budget: a resumed run's starts at its checkpoint, and it counts the
    samples of all processes of a data-parallel run (each collects ``num_envs`` per step, the same number).

    :param world_size: number of processes
    """

    def __init__(self, world_size: int) -> None:
        super().__init__()
        self.world_size = world_size

    def _on_training_start(self) -> None:
        self.pbar = sb3_callbacks.tqdm(total=self.locals["total_timesteps"], initial=self.model.num_timesteps)

    def _on_step(self) -> bool:
        self.pbar.update(self.training_env.num_envs * self.world_size)
        return True


class ResumedTensorBoard(TensorBoardOutputFormat):
    """SB3's TensorBoard output, continuing a run's curves at ``purge_step``.

    :param folder: the run's TensorBoard folder
    :param purge_step: events the run logged at this step or later are hidden (they are logged again)
    """

    def __init__(self, folder: str, purge_step: int) -> None:
        self.writer = SummaryWriter(log_dir=folder, purge_step=purge_step)
        self._is_closed = False
