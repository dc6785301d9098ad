"""What data-parallel training changes around SB3's on-policy loop, kept out of the update itself.

:class:`DataParallelAlgorithm` is the base of :class:`~sb3_trpo.TRPO`: SB3's ``OnPolicyAlgorithm`` with the
orchestration that lets several processes (launched by torchrun) train one model. It joins the process group
and picks each process's GPU, seeds every rank differently, makes the ranks agree after each rollout (global
sample count, whether to go on, VecNormalize's statistics), shows the callbacks of a rollout the run as a whole
(:class:`RolloutView`), starts ``learn()`` from rank 0's parameters and statistics, and leaves logging, the progress
bar and saving to rank 0. The update's own reductions are in
:mod:`sb3_trpo.distributed` and are called by the policy and critic steps. A single process has a world of size 1
and every method here reduces to SB3's.
"""

import contextlib
import copy
import io
import pathlib
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, ConvertCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.type_aliases import MaybeCallback
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

from sb3_trpo.collection import ordered_running_stats, vec_normalize_running_stats
from sb3_trpo.distributed import (
    Distributed,
    GlobalProgressBarCallback,
    Replica,
    broadcast_running_stats,
    cuda_device_for_process,
    join_process_group,
    launched_by_torchrun,
    local_rank,
    local_world_size,
    set_from_raw_moments,
    synchronize_running_stats,
)
from sb3_trpo.validation import check_arguments


class DataParallelAlgorithm(OnPolicyAlgorithm):
    """SB3's on-policy algorithm, trained by one process or by the ranks of a ``torch.distributed`` process group.

    Subclasses set ``distributed``, ``_replica`` (``Replica.alone()``) and ``_agreed_running_stats`` (``[]``) in their
    constructor, call :meth:`_join_process_group` from their ``_setup_model``, and collect their own rollout in
    :meth:`_collect_rollouts_locally`.
    """

    distributed: Distributed
    #: this process's place in data-parallel training (world size 1 until a process group is joined)
    _replica: Replica
    #: VecNormalize's statistics as all ranks last agreed on them (see :meth:`_synchronize_running_stats`)
    _agreed_running_stats: list[np.ndarray]
    #: while the callbacks of a data-parallel rollout run, what they are shown of the run (see :class:`RolloutView`)
    _rollout_view: "RolloutView | None" = None

    def _join_process_group(self) -> None:
        """Join the process group ``distributed`` asks for, on this process's GPU when the device is plain CUDA."""
        # `distributed` may come from load()'s keyword arguments, which skip the constructor's checks
        check_arguments({"distributed": self.distributed})
        backend = None
        if self.distributed is not False and self.device.type == "cuda" and launched_by_torchrun():
            # the processes of a machine spread over its GPUs; with more processes than GPUs they share them
            self.device, backend = cuda_device_for_process(
                self.device, local_rank(), local_world_size(), th.cuda.device_count()
            )
            if backend == "gloo":
                warnings.warn(
                    f"{local_world_size()} processes share {th.cuda.device_count()} GPU(s) on this machine, so the "
                    f"process group uses {backend} (nccl allows one process per GPU), which is slower. Launch with "
                    "torchrun --nproc_per_node equal to the number of GPUs for nccl.",
                    stacklevel=3,
                )
            th.cuda.set_device(self.device)
        self._replica = join_process_group(self.distributed, self.device, backend)

    def set_random_seed(self, seed: int | None = None) -> None:
        """Seed the random generators as SB3 does; in data-parallel training, each rank differently.

        Rank ``r`` uses ``seed + r * n_envs``, so its environments get seeds disjoint from every other rank's (SB3
        seeds environment ``i`` with ``seed + i``), and its exploration noise differs too. The parameters are the
        same on every rank regardless: rank 0's are broadcast.

        :param seed: the seed (``None``: leave the generators as they are)
        """
        if seed is not None and self._replica.is_distributed:
            seed = (seed + self._replica.rank * self.n_envs) % 2**32
        super().set_random_seed(seed)

    def _excluded_save_params(self) -> list[str]:
        # a checkpoint is an ordinary single-process model: the process-group context and the flag that joins one
        # are not saved (pass distributed=... to load() to train the loaded model in parallel)
        return [*super()._excluded_save_params(), "distributed", "_replica", "_agreed_running_stats", "_rollout_view"]

    def save(
        self,
        path: str | pathlib.Path | io.BufferedIOBase,
        exclude: Iterable[str] | None = None,
        include: Iterable[str] | None = None,
    ) -> None:
        """SB3's ``save``; in data-parallel training, on rank 0 only, and by a callback during a rollout, as the model
        was at the rollout's start (see :class:`RolloutView`).

        :param path: where to save, or a binary file object
        :param exclude: names of attributes not to save, in addition to the default ones
        :param include: names of attributes to save even if excluded by default
        """
        if not self._replica.is_main:
            return
        view = self._rollout_view
        if view is None:
            super().save(path, exclude=exclude, include=include)
            return
        shown, self.num_timesteps = self.num_timesteps, view.start
        try:
            super().save(path, exclude=exclude, include=include)
        finally:
            self.num_timesteps = shown

    def get_vec_normalize_env(self) -> VecNormalize | None:
        """SB3's ``get_vec_normalize_env``; ``None`` on every rank but 0 while the callbacks of a data-parallel rollout
        run, so that a callback saving the statistics (``CheckpointCallback(save_vecnormalize=True)``) writes them
        once, from rank 0, which then holds the statistics all ranks agreed on (see :class:`RolloutView`)."""
        if self._rollout_view is not None and not self._replica.is_main:
            return None
        return super().get_vec_normalize_env()

    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        """This rank's rollout (:meth:`_collect_rollouts_locally`); in data-parallel training the ranks then agree:
        ``num_timesteps`` counts the samples of all ranks, training goes on only if every rank's callbacks let it,
        and VecNormalize's statistics are merged. Meanwhile the callbacks see the run as a whole (:class:`RolloutView`).
        """
        timesteps_before = self.num_timesteps
        if self._replica.is_distributed:
            callback = RolloutView(callback, self, timesteps_before)
        continue_training = self._collect_rollouts_locally(env, callback, rollout_buffer, n_rollout_steps)
        if not self._replica.is_distributed:
            return continue_training
        # one all-reduce: the global sample count, and how many ranks want to go on (a callback such as
        # StopTrainingOnRewardThreshold may stop one rank; all must stop together or the others would wait forever)
        steps, continuing = self._replica.sum_of_floats(
            [self.num_timesteps - timesteps_before, float(continue_training)], self.device
        )
        self.num_timesteps = timesteps_before + int(steps)
        if continuing < self._replica.world_size:
            return False
        self._synchronize_running_stats()
        return True

    def _collect_rollouts_locally(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        """This process's rollout (SB3's loop unless a subclass has a better one)."""
        return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)

    def _synchronize_running_stats(self) -> None:
        """Merge every rank's VecNormalize updates of the last rollout, so all ranks normalize alike."""
        stats = vec_normalize_running_stats(self.env)
        if stats and len(stats) == len(self._agreed_running_stats):
            synchronize_running_stats(self._replica, stats, self._agreed_running_stats, self.device)

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        """SB3's set-up, and in data-parallel training: identical rollout sizes, rank 0's parameters and
        VecNormalize statistics on every rank, and logs written by rank 0 only."""
        replica = self._replica
        if replica.is_distributed:
            assert self.env is not None
            # the same number of environments, not only the same rollout size: every rank's k-th step is then the
            # k-th step of all (callbacks count num_envs * world_size samples per step), and ranks seeded
            # seed + rank * n_envs draw disjoint environment seeds
            n_steps_agree = replica.all_agree(self.n_steps, self.device)
            if not (replica.all_agree(self.env.num_envs, self.device) and n_steps_agree):
                raise ValueError(
                    f"Every rank must have the same n_steps and number of environments, but this rank's n_steps="
                    f"{self.n_steps} and {self.env.num_envs} environment(s) differ from another rank's: give every "
                    "rank the same n_steps and the same number of environments."
                )
            # a loaded model, or parameters set by the user: rank 0's win, so every rank takes identical steps
            replica.broadcast_tensors(self.policy.state_dict().values())
            # before SB3 resets the env, which updates VecNormalize's statistics with this rank's first observations
            self._agreed_running_stats = broadcast_running_stats(replica, vec_normalize_running_stats(self.env), self.device)
        quiet = not replica.is_main and not self._custom_logger
        if quiet:  # a logger without outputs: rank 0 alone writes stdout, CSV and TensorBoard
            self.set_logger(Logger(folder=None, output_formats=[]))
        try:
            return super()._setup_learn(
                total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar and replica.is_main
            )
        finally:
            if quiet:  # the next learn() configures the logger again, as SB3 does
                self._custom_logger = False

    def _init_callback(self, callback: MaybeCallback, progress_bar: bool = False) -> BaseCallback:
        """SB3's callback set-up; in data-parallel training the progress bar counts the samples of all ranks."""
        if not (progress_bar and self._replica.is_distributed):
            return super()._init_callback(callback, progress_bar)
        if isinstance(callback, list):
            callback = CallbackList(callback)
        if not isinstance(callback, BaseCallback):
            callback = ConvertCallback(callback)
        return super()._init_callback(CallbackList([callback, GlobalProgressBarCallback(self._replica.world_size)]))

    def _record_communication(self) -> None:
        """Log and reset this iteration's all-reduce counters (rollout agreement and update): what multi-node
        scaling depends on."""
        if self._replica.is_distributed:
            self.logger.record("distributed/bytes_reduced", self._replica.bytes_reduced)
            self.logger.record("distributed/all_reduces", self._replica.all_reduces)
            self.logger.record("distributed/all_gathers", self._replica.all_gathers)
            self._replica.bytes_reduced = self._replica.all_reduces = self._replica.all_gathers = 0


class RolloutView(BaseCallback):
    """The callbacks of one data-parallel rollout, shown the run as a whole and kept from writing twice.

    Every rank runs its callbacks at each of its own steps, while the ranks agree on the sample count and on
    VecNormalize's statistics only after the rollout. Around each call of the callbacks, this view shows them:

    - ``model.num_timesteps`` as the global count: the rollout's start plus ``world_size`` times this rank's samples
      (every rank has as many environments and steps, so this rank's step ``k`` is the ``k``-th step of all);
    - on rank 0, VecNormalize's statistics as all ranks agreed on them at the rollout's start (its own updates since
      are put back after the call), so that what a callback saves or synchronizes into an evaluation environment
      counts the samples of all ranks; on the other ranks, ``model.get_vec_normalize_env()`` is ``None``, so the
      statistics are saved once;
    - ``model.save`` writes (on rank 0) the model as it was at the rollout's start: its parameters, which a rollout
      does not change, with the global ``num_timesteps`` of that moment, which goes with those statistics.

    A checkpoint written by ``CheckpointCallback`` during a rollout is therefore the exact state at the rollout's
    start, named by the global count when it was written; resuming from it collects that rollout again.

    :param callback: the callbacks of this rank
    :param model: the algorithm
    :param start: the global ``num_timesteps`` at the rollout's start
    """

    def __init__(self, callback: BaseCallback, model: DataParallelAlgorithm, start: int) -> None:
        super().__init__()
        self.callback = callback
        self.algorithm = model
        self.start = start
        self.world_size = model._replica.world_size
        self._vec_normalize = model._vec_normalize_env if model._replica.is_main else None
        # the statistics all ranks agreed on after the last rollout (or at the start of learn()), rebuilt from their
        # raw moments: this rank's own may already hold its first observations
        self._agreed_statistics: dict[str, Any] | None = None
        if self._vec_normalize is not None and model._agreed_running_stats:
            agreed = self._statistics_of(self._vec_normalize, copy.deepcopy)
            ordered = ordered_running_stats(agreed.get("obs_rms"), agreed["ret_rms"])
            if len(ordered) == len(model._agreed_running_stats):  # else not training: no rank changes them
                for statistic, moments in zip(ordered, model._agreed_running_stats, strict=True):
                    set_from_raw_moments(statistic, moments)
                self._agreed_statistics = agreed

    @staticmethod
    def _statistics_of(vec_normalize: VecNormalize, copied: Any = lambda x: x) -> dict[str, Any]:
        return {name: copied(getattr(vec_normalize, name)) for name in ("obs_rms", "ret_rms") if hasattr(vec_normalize, name)}

    @contextlib.contextmanager
    def _shown(self) -> Iterator[None]:
        model, vec_normalize = self.algorithm, self._vec_normalize
        local = model.num_timesteps
        model.num_timesteps = self.start + self.world_size * (local - self.start)
        model._rollout_view = self
        own = None
        if vec_normalize is not None and self._agreed_statistics is not None:
            own = self._statistics_of(vec_normalize)
            for name, value in self._agreed_statistics.items():
                setattr(vec_normalize, name, value)
        try:
            yield
        finally:
            model.num_timesteps = local
            model._rollout_view = None
            if vec_normalize is not None and own is not None:
                for name, value in own.items():
                    setattr(vec_normalize, name, value)

    def on_rollout_start(self) -> None:
        with self._shown():
            self.callback.on_rollout_start()

    def on_step(self) -> bool:
        with self._shown():
            return self.callback.on_step()

    def on_rollout_end(self) -> None:
        with self._shown():
            self.callback.on_rollout_end()

    def update_locals(self, locals_: dict[str, Any]) -> None:
        self.callback.update_locals(locals_)

    def _on_step(self) -> bool:  # pragma: no cover - on_step is the one called
        return True
