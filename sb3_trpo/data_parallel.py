"""What data-parallel training changes around SB3's on-policy loop, kept out of the update itself.

:class:`DataParallelAlgorithm` is the base of :class:`~sb3_trpo.TRPO`: SB3's ``OnPolicyAlgorithm`` with the
orchestration that lets several processes (launched by torchrun) train one model. It joins the process group
and picks each process's GPU, seeds every rank differently, makes the ranks agree after each rollout (global
sample count, whether to go on, VecNormalize's statistics), starts ``learn()`` from rank 0's parameters and
statistics, and leaves logging, the progress bar and saving to rank 0. The update's own reductions are in
:mod:`sb3_trpo.distributed` and are called by the policy and critic steps. A single process has a world of size 1
and every method here reduces to SB3's.
"""

import warnings

import numpy as np
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, ConvertCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.type_aliases import MaybeCallback
from stable_baselines3.common.vec_env import VecEnv

from sb3_trpo.collection import vec_normalize_running_stats
from sb3_trpo.distributed import (
    Distributed,
    GlobalProgressBarCallback,
    Replica,
    broadcast_running_stats,
    gpu_for_process,
    join_process_group,
    launched_by_torchrun,
    local_rank,
    local_world_size,
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

    def _join_process_group(self) -> None:
        """Join the process group ``distributed`` asks for, on this process's GPU when the device is plain CUDA."""
        # `distributed` may come from load()'s keyword arguments, which skip the constructor's checks
        check_arguments({"distributed": self.distributed})
        backend = None
        if (
            self.distributed is not False
            and self.device.type == "cuda"
            and self.device.index is None
            and launched_by_torchrun()
        ):
            # the processes of a machine spread over its GPUs; with more processes than GPUs they share them
            self.device, backend = gpu_for_process(local_rank(), local_world_size(), th.cuda.device_count())
            if backend != "nccl":
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
        return [*super()._excluded_save_params(), "distributed", "_replica", "_agreed_running_stats"]

    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        """This rank's rollout (:meth:`_collect_rollouts_locally`); in data-parallel training the ranks then agree:
        ``num_timesteps`` counts the samples of all ranks, training goes on only if every rank's callbacks let it,
        and VecNormalize's statistics are merged."""
        timesteps_before = self.num_timesteps
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
            rollout_size = self.n_steps * self.env.num_envs
            if not replica.all_agree(rollout_size, self.device):
                raise ValueError(
                    f"Every rank must collect rollouts of the same size, but this rank's n_steps * n_envs = "
                    f"{self.n_steps} * {self.env.num_envs} = {rollout_size} differs from another rank's: give every "
                    "rank the same n_steps and number of environments."
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
