"""``MaskableTRPO``: the trust-region update of :class:`~sb3_trpo.TRPO` with invalid-action masking.

It follows ``sb3_contrib.MaskablePPO``'s conventions and reuses its pieces: the maskable policies (whose
distributions give masked actions a logit of -1e8, i.e. probability exactly 0 in float32, never ``-inf``), the
rollout buffers that store each step's mask, and the mask utilities. sb3-contrib is an optional dependency,
imported only by the modules of the classes that need it (``pip install "sb3-trpo[masking]"``).

The masks stored with the rollout define the distributions of the whole update: the surrogate's ratios, the KL
of the trust region, the Fisher matrix (``M = diag(p) - p pᵀ`` has zero rows and columns at masked actions; a
sub-space with no valid action has sb3-contrib's fixed uniform distribution and no curvature at all) and the line
search all see the masked distributions that collected the data, so an accepted step has mean KL over
the valid actions at most ``target_kl``.
"""

import warnings
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import CategoricalDistribution, Distribution, MultiCategoricalDistribution
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback
from stable_baselines3.common.vec_env import VecEnv

try:
    from sb3_contrib.common.maskable.buffers import MaskableDictRolloutBuffer, MaskableRolloutBuffer
    from sb3_contrib.common.maskable.distributions import (
        MaskableBernoulliDistribution,
        MaskableCategoricalDistribution,
        MaskableMultiCategoricalDistribution,
    )
    from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
    from sb3_contrib.ppo_mask import MaskablePPO
    from sb3_contrib.ppo_mask.policies import CnnPolicy, MlpPolicy, MultiInputPolicy
except ImportError as error:  # pragma: no cover - exercised in a subprocess without sb3-contrib
    raise ImportError(
        "MaskableTRPO reuses sb3-contrib's maskable policies and buffers, and sb3-contrib is not installed: "
        'install it with `pip install "sb3-trpo[masking]"` (or `pip install sb3-contrib`).'
    ) from error

from sb3_trpo.actor import register_standard_mlp_policy
from sb3_trpo.collection import lean_collect_rollouts
from sb3_trpo.critic import register_standard_predict_values
from sb3_trpo.distributions import DistributionParams, Family, register_distribution
from sb3_trpo.lean_forward import lean_collection_gap, register_masked_distribution
from sb3_trpo.masks import masks_of, with_action_masks
from sb3_trpo.trpo import TRPO
from sb3_trpo.validation import check_policy_class

SelfMaskedTRPO = TypeVar("SelfMaskedTRPO", bound="MaskedTRPO")

__all__ = ["MaskableTRPO", "MaskedTRPO"]

#: the action spaces sb3-contrib can mask
MASKABLE_ACTION_SPACES = (spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


def _masked_categorical_params(distribution: Distribution) -> DistributionParams:
    # the masked (and renormalized) logits: masked actions sit at about -1e8, so exp() gives exactly 0
    if isinstance(distribution, MaskableCategoricalDistribution):
        return DistributionParams(Family.CATEGORICAL, (distribution.distribution.logits,))
    assert isinstance(distribution, MaskableMultiCategoricalDistribution)
    # MultiBinary is sb3-contrib's MultiCategorical with two outcomes per dimension: a categorical per pair
    return DistributionParams(Family.CATEGORICAL, tuple(d.logits for d in distribution.distributions))


for _cls in (MaskableCategoricalDistribution, MaskableMultiCategoricalDistribution, MaskableBernoulliDistribution):
    register_distribution(_cls, _masked_categorical_params)
# the maskable policy computes its actor as ActorCriticPolicy does, then masks: the written-out Fisher product applies
register_standard_mlp_policy(
    MaskableActorCriticPolicy,
    (MaskableCategoricalDistribution, MaskableMultiCategoricalDistribution, MaskableBernoulliDistribution),
)
# and its critic as ActorCriticPolicy's: the critic step's fast paths apply too
register_standard_predict_values(MaskableActorCriticPolicy.predict_values)
# the lean collection samples them as SB3's categoricals, with sb3-contrib's masking
register_masked_distribution(MaskableCategoricalDistribution, CategoricalDistribution)
register_masked_distribution(MaskableMultiCategoricalDistribution, MultiCategoricalDistribution)
register_masked_distribution(MaskableBernoulliDistribution, MultiCategoricalDistribution)


class MaskedTRPO(TRPO):
    """What invalid-action masks add to :class:`~sb3_trpo.TRPO`, for every maskable class (:class:`MaskableTRPO`,
    :class:`~sb3_trpo.maskable_recurrent.MaskableRecurrentTRPO`): Discrete, MultiDiscrete and MultiBinary actions only;
    the environment's masks wherever it keeps them (:mod:`sb3_trpo.masks`); ``learn(..., use_masking=True)``,
    ``predict(..., action_masks=...)``; the masks stored with the rollout handed to the policy step. How the masks are
    collected and stored is the subclass's (its policy, buffer and loop).

    :param policy: the policy (an alias of the subclass, or a subclass of its policy class)
    :param env: the environment to learn from (if registered in Gym, can be str)
    :param kwargs: the other arguments of the class it extends (as keywords)
    """

    #: whether predict() has warned that it was called without masks (once per model)
    _warned_without_masks = False

    def __init__(self, policy: Any, env: GymEnv | str, **kwargs: Any):
        # whether the rollout in the buffer was collected with masks (set by learn(use_masking=...))
        self._use_masking = True
        init_setup_model = kwargs.pop("_init_setup_model", True)
        super().__init__(policy, env, _init_setup_model=False, **kwargs)
        # load() builds the model without an environment, and sets the saved spaces afterwards
        if hasattr(self, "action_space") and not isinstance(self.action_space, MASKABLE_ACTION_SPACES):
            raise ValueError(
                f"{type(self).__name__} does not support the action space {self.action_space}: masks exist for "
                "Discrete, MultiDiscrete and MultiBinary actions (use TRPO for Box actions)."
            )
        if init_setup_model:  # as TRPO does when it sets up the model itself
            if self.env is not None:
                self._check_rollout_size()
            self._setup_model()

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_warned_without_masks"]

    @staticmethod
    def _wrap_env(env: GymEnv, verbose: int = 0, monitor_wrapper: bool = True) -> VecEnv:
        """SB3's wrapping into a ``VecEnv``, then :func:`~sb3_trpo.masks.with_action_masks`: masks are read from the
        vectorised environment's ``action_masks()``, each environment's, or the infos of its steps and resets."""
        return with_action_masks(TRPO._wrap_env(env, verbose, monitor_wrapper))

    def _action_masks_of(self) -> Callable[[VecEnv], np.ndarray] | None:
        """The environment's masks, checked, when learning with them (``learn(use_masking=True)``)."""
        return masks_of if self._use_masking else None

    def _batch_masks(self, data: Any) -> th.Tensor | None:
        """The masks stored with the rollout, as booleans (``None`` if it was collected without masks)."""
        if not self._use_masking:
            return None
        masks: th.Tensor = data.action_masks  # the maskable buffers' samples
        return masks.bool()

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
        action_masks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """The policy's action for ``observation``, chosen among the valid actions of ``action_masks``.

        :param observation: the observation (or a batch of them)
        :param state: a recurrent policy's states (``None`` at the start); unused otherwise, returned as given
        :param episode_start: for a recurrent policy, whether each observation starts an episode
        :param deterministic: the most likely valid action instead of a sample
        :param action_masks: which actions are valid (``True``), shaped like the flattened action logits of each
            observation; ``None`` acts without masks
        :return: the action(s) and the next state
        """
        if action_masks is None and not self._warned_without_masks:
            self._warned_without_masks = True
            warnings.warn(
                f"{type(self).__name__}.predict was called without action_masks, so it may choose invalid actions: pass "
                "action_masks=sb3_contrib.common.maskable.utils.get_action_masks(env), or evaluate with sb3-contrib's "
                "evaluate_policy / MaskableEvalCallback, which pass them (said once per model).",
                UserWarning,
                stacklevel=2,
            )
        return self.policy.predict(  # type: ignore[call-arg]  # the maskable policies take the masks
            observation, state, episode_start, deterministic, action_masks=action_masks
        )

    def learn(  # type: ignore[override]
        self: SelfMaskedTRPO,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str | None = None,
        reset_num_timesteps: bool = True,
        use_masking: bool = True,
        progress_bar: bool = False,
    ) -> SelfMaskedTRPO:
        """Train as :meth:`TRPO.learn <sb3_trpo.TRPO.learn>` does, with the environment's action masks.

        :param tb_log_name: the TensorBoard run's name (default: the class's name)
        :param use_masking: collect (and update) with the environment's masks; ``False`` ignores them
        """
        if not isinstance(use_masking, (bool, np.bool_)):
            raise ValueError(f"use_masking={use_masking!r}: allowed values are True or False.")
        # an environment without masks says so at the first step (sb3_trpo.masks.VecActionMasks)
        self._use_masking = bool(use_masking)
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name or type(self).__name__,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )


class MaskableTRPO(MaskedTRPO):
    """
    Trust Region Policy Optimization with invalid-action masking.

    The same algorithm, keywords, guarantees and logged values as :class:`~sb3_trpo.TRPO`, with
    ``sb3_contrib.MaskablePPO``'s interface for masks: ``learn(..., use_masking=True)`` collects with them and
    ``predict(obs, action_masks=...)`` acts with them. The masks come from the first of these the environment offers
    (:mod:`sb3_trpo.masks`): the vectorised environment's own ``action_masks()``, each environment's
    ``action_masks()`` (directly or through ``sb3_contrib.common.wrappers.ActionMasker``), or ``info["action_mask"]``
    of its steps and resets; a mask of the wrong size, or with no valid value in a sub-space, is refused. The
    policies are sb3-contrib's maskable ones (``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"`` or a
    ``MaskableActorCriticPolicy`` subclass), for Discrete, MultiDiscrete and MultiBinary actions.

    Each step's mask is stored in the rollout buffer, and the update uses the masked distributions throughout:
    a masked action has probability 0 under the old and the new policy, so it adds nothing to the surrogate, the
    KL or the Fisher matrix, and the trust region bounds the mean KL over the valid actions.

    Rollouts are collected as sb3-contrib's ``MaskablePPO.collect_rollouts`` collects them, by the lean loop of
    :mod:`sb3_trpo.collection` where it covers the policy (``fast_collection=True``, the default; the same data,
    random numbers and callback locals) and by sb3-contrib's loop otherwise.

    :param policy: The policy model to use (``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"``, or a
        ``MaskableActorCriticPolicy`` subclass)
    :param env: The environment to learn from (if registered in Gym, can be str); it must offer masks to train with
        them (see above)
    :param kwargs: the other arguments of :class:`~sb3_trpo.TRPO` (as keywords), with the same meaning and checks
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }
    policy: MaskableActorCriticPolicy  # type: ignore[assignment]
    _policy_base = MaskableActorCriticPolicy
    _policy_kind = "maskable"

    def __init__(self, policy: str | type[MaskableActorCriticPolicy], env: GymEnv | str, **kwargs: Any):
        check_policy_class(type(self).__name__, policy, self._policy_base, self._policy_kind, list(self.policy_aliases))
        super().__init__(policy, env, **kwargs)

    def _setup_policy_and_buffer(self) -> None:
        """SB3's on-policy set-up with the maskable buffer and policy (which, unlike SB3's, takes no ``use_sde``)."""
        if self.rollout_buffer_class is None:
            # the maskable buffers store each step's mask next to its action
            dict_obs = isinstance(self.observation_space, spaces.Dict)
            self.rollout_buffer_class = MaskableDictRolloutBuffer if dict_obs else MaskableRolloutBuffer
        elif not issubclass(self.rollout_buffer_class, (MaskableRolloutBuffer, MaskableDictRolloutBuffer)):
            raise ValueError(
                f"rollout_buffer_class={self.rollout_buffer_class.__name__} cannot store action masks: MaskableTRPO "
                "needs sb3-contrib's MaskableRolloutBuffer or MaskableDictRolloutBuffer (or a subclass), or None."
            )
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        self.rollout_buffer = self.rollout_buffer_class(
            self.n_steps,
            self.observation_space,  # type: ignore[arg-type]  # a Dict space for the Dict buffer
            self.action_space,
            device=self.device,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            n_envs=self.n_envs,
            **self.rollout_buffer_kwargs,
        )
        policy = self.policy_class(self.observation_space, self.action_space, self.lr_schedule, **self.policy_kwargs)
        assert isinstance(policy, MaskableActorCriticPolicy)
        self.policy = policy.to(self.device)

    _general_loop = "sb3-contrib's masked loop"

    def _lean_collection_gap(self, rollout_buffer: RolloutBuffer) -> str | None:
        buffers = (MaskableRolloutBuffer, MaskableDictRolloutBuffer)
        return lean_collection_gap(self.policy, rollout_buffer, reference=MaskableActorCriticPolicy, buffer_classes=buffers)

    def _lean_collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        """What sb3-contrib's masked loop collects (each step's masks from ``env.action_masks()``, stored in the
        buffer), by the lean loop: the same data, random numbers and callback locals."""
        return lean_collect_rollouts(
            self, env, callback, rollout_buffer, n_rollout_steps, maskable=True, action_masks_of=self._action_masks_of()
        )

    def _general_collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        return MaskablePPO.collect_rollouts(
            self,  # type: ignore[arg-type]  # it uses OnPolicyAlgorithm's attributes only
            env,
            callback,
            rollout_buffer,
            n_rollout_steps,
            use_masking=self._use_masking,
        )
