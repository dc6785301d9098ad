"""Trust Region Policy Optimization as an SB3 on-policy algorithm."""

import io
import math
import os
import pathlib
import warnings
from collections.abc import Iterable
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, ConvertCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import (
    DictRolloutBufferSamples,
    GymEnv,
    MaybeCallback,
    PyTorchObs,
    RolloutBufferSamples,
    Schedule,
)
from stable_baselines3.common.utils import explained_variance
from stable_baselines3.common.vec_env import VecEnv
from torch.nn import functional as F

from sb3_trpo.actor import ActorView, RecurrentContext
from sb3_trpo.checkpoints import check_model_file, resolve_save_path, save_atomically
from sb3_trpo.collection import (
    NonFiniteRolloutError,
    count_non_finite,
    lean_collect_rollouts,
    non_finite_counts,
    non_finite_parameters_error,
    non_finite_rollout_error,
    vec_normalize_running_stats,
)
from sb3_trpo.critic import (
    CriticSnapshot,
    MlpCriticRegression,
    critic_parameters,
    fused_adam_available,
    index_obs,
    regress_values,
    set_adam_kernel,
    value_inputs,
)
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
from sb3_trpo.lean_forward import lean_collection_gap
from sb3_trpo.policies import CnnPolicy, MlpPolicy, MultiInputPolicy
from sb3_trpo.policy_step import FeedForwardEvaluator, PolicyStepResult, StepSettings, trust_region_step, weighted_mean
from sb3_trpo.validation import check_against_spaces, check_arguments, check_spaces

SelfTRPO = TypeVar("SelfTRPO", bound="TRPO")

__all__ = ["TRPO", "NonFiniteRolloutError"]


class RolloutBatch(NamedTuple):
    """The whole rollout buffer as tensors on the device, ready for one update.

    :param observations: observations (tensor or dict of tensors)
    :param actions: actions in the shape the distribution's ``log_prob`` expects
    :param old_log_prob: log-probabilities of the actions under the policy that collected them
    :param advantages: GAE advantages, normalized if requested
    :param returns: regression targets of the critic
    :param old_values: the critic's predictions at collection time, for the same states as ``returns``
    :param action_masks: the valid actions of each state when the rollout was collected with masks
        (:class:`~sb3_trpo.maskable.MaskableTRPO`), ``None`` otherwise
    :param context: for a recurrent policy (:class:`~sb3_trpo.recurrent.RecurrentTRPO`), the LSTM states at the start
        of each sequence and the episode starts; ``None`` otherwise
    :param weights: 1 for a real step, 0 for padding (sequences of a recurrent policy); ``None``: no padding
    """

    observations: PyTorchObs
    actions: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    old_values: th.Tensor
    action_masks: th.Tensor | None = None
    context: RecurrentContext | None = None
    weights: th.Tensor | None = None


class TRPO(OnPolicyAlgorithm):
    """
    Trust Region Policy Optimization (TRPO).

    Paper: Schulman et al. 2015, https://arxiv.org/abs/1502.05477. Each update takes one natural-gradient step
    on the surrogate ``mean(ratio · A)`` over the whole rollout, sized by the trust region ``KL ≤ target_kl``
    and checked by a backtracking line search, then fits the critic by minibatch regression.

    The constructor accepts every keyword of ``sb3_contrib.TRPO`` with the same meaning. Defaults that differ
    from sb3-contrib follow the reference notebook: ``cg_max_steps=10`` (15 there),
    ``line_search_shrinking_factor=0.5`` (0.8 there), ``line_search_max_iter=15`` (10 there). The KL of one
    state is summed over action dimensions (sb3-contrib averages them for Box actions).

    :param policy: The policy model to use (``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"``, or an
        ``ActorCriticPolicy`` subclass)
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param learning_rate: Learning rate of the critic's optimizer (the actor has no learning rate: its step is
        set by the trust region), >= 0. Can be a function of the remaining progress (from 1 to 0). Default ``1e-3``.
    :param n_steps: Number of steps to run for each environment per update (the rollout holds
        ``n_steps * n_envs`` samples). Default ``2048``.
    :param batch_size: Minibatch size of the critic regression. Default ``128``.
    :param gamma: Discount factor, in [0, 1]. Default ``0.99``.
    :param cg_max_steps: Maximum number of conjugate gradient steps (Fisher-vector products) to solve
        ``F x = g``; must be >= 1. Default ``10``.
    :param cg_damping: Damping ``λ`` added to the Fisher matrix (``F + λI``), >= 0. Default ``0.1``.
    :param line_search_shrinking_factor: Factor in (0, 1) by which the step shrinks at each backtrack
        (``θ_new = θ + β · factor^k · x``). Default ``0.5``.
    :param line_search_max_iter: Maximum number of steps tried by the line search, >= 1. Default ``15``.
    :param n_critic_updates: Number of epochs of critic regression per update, >= 0. Default ``10``.
    :param gae_lambda: Factor for trade-off of bias vs variance for Generalized Advantage Estimator, in [0, 1].
        Default ``0.95``.
    :param use_sde: Whether to use generalized State Dependent Exploration (gSDE). Default ``False``.
    :param sde_sample_freq: Sample a new noise matrix every n steps when using gSDE; -1 samples only at the
        beginning of the rollout. Default ``-1``.
    :param rollout_buffer_class: Rollout buffer class to use. If ``None``, it will be automatically selected.
    :param rollout_buffer_kwargs: Keyword arguments to pass to the rollout buffer on creation.
    :param normalize_advantage: Whether to normalize the advantages over the rollout. Default ``True``.
    :param target_kl: Trust-region radius ``δ``: the largest mean KL(old || new) an accepted step may have,
        > 0. Default ``0.01``. It can be a function of the current progress remaining (from 1 to 0), as
        ``learning_rate`` can, e.g. ``stable_baselines3.common.utils.LinearSchedule(0.05, 0.01, 1.0)`` to shrink
        the radius as training goes (Engstrom et al. 2020 anneal it for TRPO+); a value of 0 leaves the policy
        unchanged at that update.
    :param sub_sampling_factor: Compute the Fisher-vector products on every k-th sample only (the gradient and
        the line search still use the whole rollout), >= 1; see Schulman's thesis, pp. 40-42. Default ``1``.
    :param stats_window_size: Window size for the rollout logging, specifying the number of episodes to average
        the reported success rate, mean episode length, and mean reward over. Default ``100``.
    :param tensorboard_log: The log location for TensorBoard (if None, no logging).
    :param policy_kwargs: Additional arguments to be passed to the policy on creation.
    :param verbose: Verbosity level: 0 no output, 1 info, 2 (or more) debug.
    :param seed: Seed for the pseudo random generators.
    :param device: Device (cpu, cuda, ...) on which the code should be run; ``"auto"`` uses the GPU if any.
    :param _init_setup_model: Whether or not to build the network at the creation of the instance.
    :param distributed: (keyword only) Data-parallel training over ``torch.distributed`` (launch the script with ``torchrun``):
        every rank collects its own rollouts and all ranks take the same update, computed from the means over
        ranks of the gradient, Fisher products, line-search values, advantage statistics and critic gradients.
        ``True`` requires a launcher environment or an initialized process group; ``"auto"`` uses one if present
        and runs as a single process otherwise; ``False`` (default) never does. ``learn(total_timesteps)`` then
        counts the samples of all ranks; only rank 0 logs and saves. See the README's "Distributed training".
    :param fast_collection: (keyword only) Collect rollouts with the lean loop of ``sb3_trpo.collection``, which
        stores exactly what SB3's ``collect_rollouts`` would (same buffer contents, random numbers and callbacks)
        in a fraction of the time. Policies it does not cover (a custom ``forward``, forward hooks, a custom
        rollout buffer, ...) use SB3's loop automatically; ``False`` always uses SB3's loop. Default ``True``.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }
    policy: ActorCriticPolicy

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 1e-3,
        n_steps: int = 2048,
        batch_size: int = 128,
        gamma: float = 0.99,
        cg_max_steps: int = 10,
        cg_damping: float = 0.1,
        line_search_shrinking_factor: float = 0.5,
        line_search_max_iter: int = 15,
        n_critic_updates: int = 10,
        gae_lambda: float = 0.95,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        normalize_advantage: bool = True,
        target_kl: float | Schedule = 0.01,
        sub_sampling_factor: int = 1,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
        *,
        distributed: Distributed = False,
        fast_collection: bool = True,
    ):
        # every keyword is checked before SB3 uses any of them (locals() holds exactly the arguments here)
        check_arguments(locals())
        # numpy scalars pass the checks; SB3's schedule and seeding want plain Python numbers
        learning_rate = learning_rate if callable(learning_rate) else float(learning_rate)
        seed = None if seed is None else int(seed)
        if not isinstance(env, str) and env is not None:
            # checked before SB3 wraps the env, which fails on some unsupported spaces with a less helpful message
            check_spaces(env.observation_space, env.action_space)
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=0.0,  # TRPO has no entropy bonus: exploration is kept by the trust region itself
            vf_coef=0.0,  # the critic has its own regression step, never mixed into the policy objective
            max_grad_norm=0.0,  # unused: the actor step is sized by the trust region, the critic is not clipped
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            device=device,
            seed=seed,
            _init_setup_model=False,
            supported_action_spaces=None,  # checked below, with a ValueError naming the allowed spaces
        )
        self.batch_size = batch_size
        self.cg_max_steps = cg_max_steps
        self.cg_damping = cg_damping
        self.line_search_shrinking_factor = line_search_shrinking_factor
        self.line_search_max_iter = line_search_max_iter
        self.n_critic_updates = n_critic_updates
        self.normalize_advantage = normalize_advantage
        self.target_kl = target_kl if callable(target_kl) else float(target_kl)
        self.sub_sampling_factor = sub_sampling_factor
        self.distributed = distributed
        self.fast_collection = fast_collection
        # why the last rollout used SB3's loop instead of the lean one (None: it did not), reported once at verbose >= 1
        self._collection_gap: str | None = None
        # this process's place in data-parallel training (world size 1 until _setup_model joins a process group)
        self._replica = Replica.alone()
        # VecNormalize's statistics as all ranks last agreed on them (see _synchronize_running_stats)
        self._agreed_running_stats: list[np.ndarray] = []
        self._actor_view: ActorView | None = None
        # updates whose policy or critic step a numerical fault made TRPO skip (saved with the model)
        self._skipped_policy_steps = 0
        self._skipped_critic_steps = 0
        if isinstance(env, str):  # an env made by SB3 from its id: its spaces are known only now
            check_spaces(self.observation_space, self.action_space)
        if self.env is not None:
            check_against_spaces(self.observation_space, rollout_buffer_class)
            if _init_setup_model:  # TRPO.load checks after restoring the saved settings, not these defaults
                self._check_rollout_size()
        if _init_setup_model:
            self._setup_model()

    def _check_rollout_size(self, stacklevel: int = 3) -> None:
        """Refuse a rollout too small to normalize, and warn about a truncated last minibatch.

        :param stacklevel: of the warning, so that it points at the user's call
        """
        assert self.env is not None
        buffer_size = self.env.num_envs * self.n_steps
        if self.normalize_advantage and buffer_size <= 1:
            raise ValueError(
                f"n_steps * n_envs = {self.n_steps} * {self.env.num_envs} = {buffer_size}: with "
                "normalize_advantage=True the rollout must hold at least 2 samples (the std of one is undefined)."
            )
        if buffer_size % self.batch_size > 0:
            warnings.warn(
                f"The critic's minibatch size {self.batch_size} does not divide the rollout size "
                f"n_steps * n_envs = {buffer_size}: every epoch ends with a truncated minibatch of "
                f"{buffer_size % self.batch_size} samples. A batch_size that divides {buffer_size} avoids it.",
                stacklevel=stacklevel,
            )

    def _setup_model(self) -> None:
        # `distributed` may come from TRPO.load's keyword arguments, which skip the constructor's checks
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
                    stacklevel=2,
                )
            th.cuda.set_device(self.device)
        self._replica = join_process_group(self.distributed, self.device, backend)
        self._setup_policy_and_buffer()
        self._choose_adam_kernel()
        # every rank starts from rank 0's initial parameters
        self._replica.broadcast_tensors(self.policy.state_dict().values())

    def _setup_policy_and_buffer(self) -> None:
        """SB3's set-up of an on-policy model: schedules, seeding, the rollout buffer and the policy."""
        super()._setup_model()

    def _choose_adam_kernel(self) -> None:
        """Run SB3's default critic optimizer (Adam, ``eps=1e-5``) with torch's fused kernel where this device has it.

        The critic step makes hundreds of small optimizer steps per update, and the fused kernel is the cheapest.
        The choice belongs to the device the model runs on, not to the model: it is not written into
        ``policy_kwargs`` (which are saved, and which ``TRPO.load`` compares with the ones it is given), and it is
        made again after parameters and optimizer state are loaded, since the saved state carries the flag of the
        device it was saved on. A user's own ``optimizer_class`` or ``optimizer_kwargs`` are left as they are.
        """
        if "optimizer_kwargs" in self.policy_kwargs or self.policy_kwargs.get("optimizer_class", th.optim.Adam) is not (
            th.optim.Adam
        ):
            return
        set_adam_kernel(self.policy.optimizer, fused=fused_adam_available(self.device))

    def set_parameters(
        self,
        load_path_or_dict: str | dict[str, th.Tensor],
        exact_match: bool = True,
        device: th.device | str = "auto",
    ) -> None:
        """SB3's ``set_parameters``, then the Adam kernel chosen for this model's device (see ``_choose_adam_kernel``)."""
        super().set_parameters(load_path_or_dict, exact_match=exact_match, device=device)
        self._choose_adam_kernel()

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
        # the actor view holds references to the policy: it is rebuilt at the first update after loading
        # a checkpoint is an ordinary single-process model: the process-group context and the flag that joins one
        # are not saved (pass distributed=... to TRPO.load to train the loaded model in parallel)
        return [
            *super()._excluded_save_params(),
            "_actor_view",
            "distributed",
            "_replica",
            "_agreed_running_stats",
            "_collection_gap",
        ]

    def _get_actor_view(self, batch: RolloutBatch) -> ActorView:
        """The flat view of the actor parameters, rebuilt if the policy or its modules were replaced, or a parameter
        was frozen or unfrozen since it was built (a part unfrozen later must enter the trust region, or the critic
        step would move the policy unchecked)."""
        if self._actor_view is None or not self._actor_view.is_view_of(self.policy):
            if batch.context is None:  # two states are enough to see what the distribution depends on
                self._actor_view = ActorView(self.policy, index_obs(batch.observations, slice(0, 2)))
            else:  # the LSTM reads whole sequences
                self._actor_view = ActorView(self.policy, batch.observations, batch.context)
        return self._actor_view

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """SB3's collection (by the lean loop where it covers the policy, see ``fast_collection``), with a clear
        error when the environment returns non-finite observations (the policy's distribution would refuse them
        with a message about its own parameters).

        In data-parallel training, the ranks then agree: ``num_timesteps`` counts the samples of all ranks, training
        goes on only if every rank's callbacks let it, and VecNormalize's statistics are merged.
        """
        timesteps_before = self.num_timesteps
        try:
            continue_training = self._collect_rollouts_locally(env, callback, rollout_buffer, n_rollout_steps)
        except (ValueError, RuntimeError) as error:
            # the policy could not act on non-finite observations or parameters: say so, in the same words whichever
            # loop collected, instead of quoting torch's complaint (a distribution's ValueError, a sampler's RuntimeError)
            last = self._last_obs.values() if isinstance(self._last_obs, dict) else [self._last_obs]
            count = sum(count_non_finite(np.asarray(o)) for o in last)
            if count:
                raise non_finite_rollout_error("observations", count) from error
            count = sum(count_non_finite(p.detach()) for p in self.policy.parameters())
            if count:
                raise non_finite_parameters_error(count) from error
            raise
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
        """This process's rollout: by the lean loop where it covers the policy and buffer, by the general one otherwise."""
        gap = self._lean_collection_gap(rollout_buffer) if self.fast_collection else None
        if gap is not None and gap != self._collection_gap and self.verbose >= 1:
            print(f"Collecting rollouts with {self._general_loop}: the lean loop does not cover {gap}.")
        self._collection_gap = gap
        if self.fast_collection and gap is None:
            return self._lean_collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        return self._general_collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)

    #: the loop that collects what the lean loop does not cover (named in the verbose message)
    _general_loop = "SB3's loop"

    def _lean_collection_gap(self, rollout_buffer: RolloutBuffer) -> str | None:
        """Why the lean loop cannot collect with this policy and buffer, or ``None`` if it can."""
        return lean_collection_gap(self.policy, rollout_buffer)

    def _lean_collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        return lean_collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps)

    def _general_collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
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

    def _check_rollout_is_finite(self) -> None:
        """Refuse to learn from NaN or infinite observations, rewards, values or advantages.

        They come from the environment (or a wrapper), not from TRPO: failing loudly points the user at them,
        and the model is left exactly as it was, so it can still be saved.
        """
        checks = non_finite_counts(self.rollout_buffer)
        # summed over ranks, so that every rank raises (a rank left waiting in the next all-reduce would hang)
        counts = self._replica.sum_of_floats(list(checks.values()), self.device)
        for what, count in zip(checks, counts, strict=True):
            if count:
                raise non_finite_rollout_error(what, int(count))

    def _rollout_batch(self) -> RolloutBatch:
        """The whole rollout buffer as one batch (SB3 computed GAE advantages and returns at collection)."""
        data = next(self.rollout_buffer.get(batch_size=None))
        actions = data.actions
        if isinstance(self.action_space, spaces.Discrete):
            # the buffer stores actions as floats of shape (n, 1); Categorical.log_prob wants indices (n,)
            actions = actions.long().flatten()
        advantages = data.advantages
        if self.normalize_advantage and len(advantages) * self._replica.world_size > 1:
            # statistics of the global batch: per-rank normalization would weigh the ranks' advantages differently
            mean, std = self._replica.mean_and_std(advantages)
            advantages = (advantages - mean) / (std + 1e-8)
        return RolloutBatch(
            data.observations, actions, data.old_log_prob, advantages, data.returns, data.old_values, self._batch_masks(data)
        )

    def _batch_masks(self, data: RolloutBufferSamples | DictRolloutBufferSamples) -> th.Tensor | None:
        """The action masks the rollout was collected with (none: TRPO does not mask; see ``MaskableTRPO``)."""
        return None

    def train(self) -> None:
        """Update the policy with one trust-region step, then fit the critic, on the current rollout buffer."""
        self.policy.set_training_mode(True)
        target_kl = self._current_target_kl()
        # the learning rate schedule drives the critic's optimizer only
        self._update_learning_rate(self.policy.optimizer)
        self._check_rollout_is_finite()
        batch = self._rollout_batch()
        actor = self._get_actor_view(batch)

        step = self._policy_step(actor, batch, target_kl)
        value_loss = self._critic_step(actor, batch)
        self._n_updates += 1
        self.logger.record("train/skipped_policy_steps", self._skipped_policy_steps)
        self.logger.record("train/skipped_critic_steps", self._skipped_critic_steps)

        self.logger.record("train/policy_objective", step.policy_objective)
        self.logger.record("train/kl_divergence_loss", step.kl_divergence)
        self.logger.record("train/target_kl", target_kl)
        self.logger.record("train/is_line_search_success", float(step.accepted))
        self.logger.record("train/surrogate_improvement", step.surrogate_improvement)
        self.logger.record("train/expected_improvement", step.expected_improvement)
        self.logger.record("train/line_search_steps", step.line_search_steps)
        self.logger.record("train/step_size", step.step_size)
        self.logger.record("train/cg_residual", step.cg_residual)
        self.logger.record("train/entropy", step.entropy)
        self.logger.record("train/value_loss", value_loss)
        self.logger.record(
            "train/explained_variance",
            explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()),
        )
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        if self._replica.is_distributed:
            # this iteration's all-reduces (rollout agreement and update): what multi-node scaling depends on
            self.logger.record("distributed/bytes_reduced", self._replica.bytes_reduced)
            self.logger.record("distributed/all_reduces", self._replica.all_reduces)
            self._replica.bytes_reduced = self._replica.all_reduces = 0

    def _current_target_kl(self) -> float:
        """The trust-region radius for this update: ``target_kl``, or its schedule at the current progress.

        :raises ValueError: if a schedule returns anything but a finite number >= 0 (before anything changes)
        """
        if not callable(self.target_kl):
            return self.target_kl
        progress = self._current_progress_remaining
        try:
            value = float(self.target_kl(progress))
        except (TypeError, ValueError) as error:
            raise ValueError(f"The target_kl schedule failed at progress_remaining={progress:.4g}: {error}") from error
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(
                f"The target_kl schedule returned {value!r} at progress_remaining={progress:.4g}: it must return finite "
                "numbers >= 0 (0 leaves the policy unchanged). Nothing was updated: the model is as before this call."
            )
        return value

    def _policy_step(self, actor: ActorView, batch: RolloutBatch, target_kl: float) -> PolicyStepResult:
        """One trust-region step on the rollout (:func:`~sb3_trpo.policy_step.trust_region_step`); a step a numerical
        fault made meaningless keeps the old policy, with a warning and a counter.

        :param target_kl: the trust-region radius of this update (0: no step)
        """
        evaluator = FeedForwardEvaluator(
            actor, batch.observations, batch.actions, batch.action_masks, self.sub_sampling_factor, self.cg_damping
        )
        return self._checked(
            trust_region_step(evaluator, batch.old_log_prob, batch.advantages, self._step_settings(target_kl), self._replica)
        )

    def _step_settings(self, target_kl: float) -> StepSettings:
        """The policy step's settings at this update."""
        return StepSettings(target_kl, self.cg_max_steps, self.line_search_shrinking_factor, self.line_search_max_iter)

    def _checked(self, step: PolicyStepResult) -> PolicyStepResult:
        """Count and report a policy step that a numerical fault made TRPO skip."""
        if step.skip_reason is not None:
            self._skipped_policy_steps += 1
            warnings.warn(
                f"TRPO skipped the policy step of update {self._n_updates + 1}: {step.skip_reason}. The policy is "
                f"unchanged ({self._skipped_policy_steps} policy steps skipped so far, logged as "
                "train/skipped_policy_steps).",
                RuntimeWarning,
                stacklevel=4,
            )
        return step

    def _critic_step(self, actor: ActorView, batch: RolloutBatch) -> float:
        """``n_critic_updates`` epochs of minibatch regression of the value function on the returns, moving only
        the parameters outside the actor, undone as a whole if it diverges.

        :return: the mean loss over the minibatches (or, with no critic update, the loss of the rollout's values)
        """
        if self.n_critic_updates == 0:
            # the batch's own values: the buffer's get() shuffles, so its arrays are in another order than the batch
            if batch.weights is None:
                rollout_loss = F.mse_loss(batch.returns, batch.old_values).item()
            else:  # padded sequences: real steps only
                rollout_loss = weighted_mean((batch.returns - batch.old_values) ** 2, batch.weights).item()
            return self._replica.mean_of_floats([rollout_loss], self.device)[0]
        actor_ids = {id(p) for p in actor.parameters}
        params = critic_parameters(self.policy, actor_ids)
        snapshot = CriticSnapshot(params, self.policy.optimizer)
        mean_loss = self._regress_critic(params, actor_ids, batch)
        if not math.isfinite(mean_loss) or not all(bool(th.isfinite(p).all()) for p in params):
            # a diverging regression (e.g. a learning rate far too large): undo the whole critic step
            snapshot.restore()
            self._skipped_critic_steps += 1
            warnings.warn(
                f"TRPO undid the critic step of update {self._n_updates + 1}: the value loss or the critic's parameters "
                "became non-finite (is learning_rate too large?). The critic and its optimizer are back to their state "
                f"before the step ({self._skipped_critic_steps} critic steps undone so far, logged as "
                "train/skipped_critic_steps).",
                RuntimeWarning,
                stacklevel=3,
            )
        return mean_loss

    def _regress_critic(self, params: list[th.nn.Parameter], actor_ids: set[int], batch: RolloutBatch) -> float:
        """``n_critic_updates`` epochs of minibatch regression of the values on the returns, moving ``params`` only.

        :return: the mean loss over the minibatches
        """
        inputs, predict_values = value_inputs(self.policy, batch.observations, actor_ids)
        fast_regression = MlpCriticRegression.for_policy(self.policy, params, actor_ids)
        if fast_regression is not None:  # SB3's MLP critic with Adam: the same regression, with less overhead
            assert isinstance(inputs, th.Tensor)
            return fast_regression(inputs, batch.returns, self.n_critic_updates, self.batch_size, self._replica)
        return regress_values(
            params,
            self.policy.optimizer,
            inputs,
            batch.returns,
            predict_values,
            self.n_critic_updates,
            self.batch_size,
            self._replica,
        )

    def save(
        self,
        path: str | pathlib.Path | io.BufferedIOBase,
        exclude: Iterable[str] | None = None,
        include: Iterable[str] | None = None,
    ) -> None:
        """Save the model as SB3 does, but atomically when ``path`` is a file path: the model is written to a
        temporary file and renamed over ``path``, so an interrupted save never leaves a truncated checkpoint.

        :param path: where to save (``.zip`` is appended when it has no suffix), or a binary file object
        :param exclude: names of attributes not to save, in addition to the default ones
        :param include: names of attributes to save even if excluded by default

        In data-parallel training only rank 0 writes (the ranks' models are identical); on other ranks this does
        nothing, so callbacks such as ``CheckpointCallback`` can run on every rank.
        """
        if not self._replica.is_main:
            return
        if isinstance(path, (str, os.PathLike)) and not resolve_save_path(path).is_dir():
            save_atomically(path, lambda file: super(TRPO, self).save(file, exclude=exclude, include=include))
        else:
            super().save(path, exclude=exclude, include=include)

    @classmethod
    def load(
        cls: type[SelfTRPO],
        path: str | pathlib.Path | io.BufferedIOBase,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SelfTRPO:
        """Load a model saved by ``sb3_trpo.TRPO`` or by ``sb3_contrib.TRPO`` (same format, same policies).

        The file is checked first: a truncated or damaged file raises a ``ValueError`` saying so. Keyword
        arguments that override saved settings (``target_kl=0.02``, ``n_steps=...``) are checked as the constructor
        checks them, and the rollout size is checked with the settings the model ends up with.
        Other arguments as in SB3's ``BaseAlgorithm.load``.
        """
        check_arguments(kwargs)
        check_model_file(path)
        model = super().load(
            path,
            env=env,
            device=device,
            custom_objects=custom_objects,
            print_system_info=print_system_info,
            force_reset=force_reset,
            **kwargs,
        )
        if model.env is not None:
            model._check_rollout_size(stacklevel=2)
        return model

    def learn(
        self: SelfTRPO,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "TRPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfTRPO:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )
