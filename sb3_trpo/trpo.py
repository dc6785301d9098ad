"""Trust Region Policy Optimization as an SB3 on-policy algorithm."""

import io
import os
import pathlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import (
    DictRolloutBufferSamples,
    GymEnv,
    MaybeCallback,
    RolloutBufferSamples,
    Schedule,
)
from stable_baselines3.common.vec_env import VecEnv
from torch.nn import functional as F

from sb3_trpo.actor import ActorView
from sb3_trpo.collection import (
    NonFiniteRolloutError,
    explain_collection_failure,
    lean_collect_rollouts,
    non_finite_counts,
    non_finite_rollout_error,
)
from sb3_trpo.critic import (
    MlpCriticRegression,
    critic_parameters,
    fused_adam_available,
    gather_critic_data,
    regress_or_undo,
    regress_values,
    set_adam_kernel,
    value_inputs,
)
from sb3_trpo.data_parallel import DataParallelAlgorithm
from sb3_trpo.distributed import Distributed, Replica
from sb3_trpo.lean_forward import lean_collection_gap
from sb3_trpo.metrics import record_update
from sb3_trpo.model_files import check_model_file, resolve_save_path, save_atomically
from sb3_trpo.observations import index_obs
from sb3_trpo.policies import CnnPolicy, MlpPolicy, MultiInputPolicy
from sb3_trpo.policy_step import (
    FeedForwardEvaluator,
    PolicyStepResult,
    RolloutBatch,
    StepSettings,
    trust_region_step,
    weighted_mean,
)
from sb3_trpo.validation import check_against_spaces, check_arguments, check_rollout_size, check_spaces, target_kl_at

SelfTRPO = TypeVar("SelfTRPO", bound="TRPO")

__all__ = ["TRPO", "NonFiniteRolloutError"]


class TRPO(DataParallelAlgorithm):
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
        counts the samples of all ranks; only rank 0 logs and saves. See docs/distributed.md.
    :param distributed_critic: (keyword only) How data-parallel ranks share the critic step. ``"gather"`` (default):
        one all-gather of the ranks' critic inputs and returns, then every rank runs the whole regression (the
        same minibatches and update as below, with two collectives per update instead of one per minibatch).
        ``"gradients"``: every rank regresses on its own data and the gradient of each minibatch is all-reduced
        (the critic's arithmetic is split, at one all-reduce per minibatch). Measured in docs/distributed.md.
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
    #: the policy class a variant needs, and what to call it in a refusal (``None``: SB3's ``ActorCriticPolicy``)
    _policy_base: ClassVar[type[BasePolicy] | None] = None
    _policy_kind: ClassVar[str] = "actor-critic"

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
        distributed_critic: str = "gather",
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
        self.distributed_critic = distributed_critic
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

    @classmethod
    def _check_variant_arguments(cls, arguments: dict[str, Any]) -> None:
        """Refuse keywords this class cannot honour, beyond TRPO's own rules (none here; subclasses add theirs). Called
        by the subclass's constructor and by :meth:`load`, whose keywords override the saved settings.

        :param arguments: keyword arguments by name
        :raises ValueError: naming the keyword, its value and what is allowed
        """

    def _check_rollout_size(self, stacklevel: int = 3) -> None:
        """Refuse a rollout too small to normalize, and warn about a truncated last minibatch.

        :param stacklevel: of the warning, so that it points at the user's call
        """
        assert self.env is not None
        check_rollout_size(self.n_steps, self.env.num_envs, self.batch_size, self.normalize_advantage, stacklevel + 1)

    def _setup_model(self) -> None:
        self._join_process_group()
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

    def _excluded_save_params(self) -> list[str]:
        # the actor view holds references to the policy: it is rebuilt at the first update after loading
        return [*super()._excluded_save_params(), "_actor_view", "_collection_gap"]

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

    def _collect_rollouts_locally(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        """This process's rollout: by the lean loop where it covers the policy and buffer (see ``fast_collection``),
        by the general one otherwise; non-finite observations or parameters fail with :class:`NonFiniteRolloutError`
        whichever loop collected."""
        gap = self._lean_collection_gap(rollout_buffer) if self.fast_collection else None
        if gap is not None and gap != self._collection_gap and self.verbose >= 1:
            print(f"Collecting rollouts with {self._general_loop}: the lean loop does not cover {gap}.")
        self._collection_gap = gap
        try:
            if self.fast_collection and gap is None:
                return self._lean_collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
            return self._general_collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        except (ValueError, RuntimeError) as error:
            # torch's complaint (a distribution's ValueError, a sampler's RuntimeError) about non-finite inputs,
            # told in the same words whichever loop collected
            explained = explain_collection_failure(self._last_obs, self.policy)
            if explained is None:
                raise
            raise explained from error

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
        return super()._collect_rollouts_locally(env, callback, rollout_buffer, n_rollout_steps)

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

    def _action_masks_of(self) -> Callable[[VecEnv], np.ndarray] | None:
        """``env -> masks of its environments`` to collect with (none: TRPO does not mask; see ``MaskableTRPO``)."""
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
        skipped = (self._skipped_policy_steps, self._skipped_critic_steps)
        record_update(self.logger, step, target_kl, value_loss, self.rollout_buffer, self.policy, self._n_updates, skipped)
        self._record_communication()

    def _current_target_kl(self) -> float:
        """The trust-region radius for this update (:func:`~sb3_trpo.validation.target_kl_at`)."""
        return target_kl_at(self.target_kl, self._current_progress_remaining)

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
        mean_loss, kept = regress_or_undo(
            params, self.policy.optimizer, lambda: self._regress_critic(params, actor_ids, batch)
        )
        if not kept:
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
        returns, batch_size, replica, orders = batch.returns, self.batch_size, self._replica, None
        if replica.is_distributed and self.distributed_critic == "gather":
            # every rank regresses on the data of all ranks: the same update, without an all-reduce per minibatch
            gathered = gather_critic_data(replica, inputs, returns, self.n_critic_updates, batch_size)
            inputs, returns, orders, batch_size = gathered
            replica = Replica.alone()
        fast_regression = MlpCriticRegression.for_policy(self.policy, params, actor_ids)
        if fast_regression is not None:  # SB3's MLP critic with Adam: the same regression, with less overhead
            assert isinstance(inputs, th.Tensor)
            return fast_regression(inputs, returns, self.n_critic_updates, batch_size, replica, orders)
        return regress_values(
            params, self.policy.optimizer, inputs, returns, predict_values, self.n_critic_updates, batch_size, replica, orders
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
        cls._check_variant_arguments(kwargs)
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
        tb_log_name: str | None = None,
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfTRPO:
        """SB3's ``learn``.

        :param tb_log_name: the TensorBoard run's name (default: the class's name, ``"TRPO"`` for TRPO)
        """
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name or type(self).__name__,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )
