"""``MaskableRecurrentTRPO``: TRPO with LSTM policies and invalid-action masks together.

Masks and memory are two independent properties of the batch the policy step sees, and each already has its part:
:class:`~sb3_trpo.maskable.MaskedTRPO` (the action spaces, where masks come from, ``learn(use_masking)``,
``predict(action_masks)``, the stored masks handed to the step) and :class:`~sb3_trpo.recurrent.RecurrentTRPO`
(sequences with stored LSTM states and padding, the recurrent collection loop, which takes masks, and an evaluator
that takes them too). This module adds only what neither has, because sb3-contrib has no such pieces:

- a recurrent policy whose distributions are sb3-contrib's maskable ones (:class:`MaskableRecurrentActorCriticPolicy`
  and its CNN and Dict-observation forms), taking ``action_masks`` wherever sb3-contrib's recurrent policy takes
  observations;
- recurrent buffers that also store each step's mask, and hand them out padded like the rest
  (:class:`MaskableRecurrentRolloutBuffer`, :class:`MaskableRecurrentDictRolloutBuffer`);

and the class that picks them. A padded row's mask is all-valid (a finite distribution), and padding counts for
nothing in the step whatever it holds. With few valid actions among many (at most a quarter in every real step), the
Fisher-vector product runs the policy's head over each step's valid actions only
(:class:`~sb3_trpo.fisher.GatheredHeadFisherProduct`), as MaskableTRPO's written-out product does.
"""

from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, Schedule

try:
    from sb3_contrib.common.maskable.distributions import MaskableDistribution, make_masked_proba_distribution
    from sb3_contrib.common.recurrent.type_aliases import RNNStates
except ImportError as error:  # pragma: no cover - exercised in a subprocess without sb3-contrib
    raise ImportError(
        "MaskableRecurrentTRPO reuses sb3-contrib's recurrent and maskable pieces, and sb3-contrib is not installed: "
        'install it with `pip install "sb3-trpo[masking]"` (or `pip install sb3-contrib`).'
    ) from error

from sb3_trpo.actor import ActorView, PolicyEvaluation
from sb3_trpo.fisher import FisherProduct, GatheredHeadFisherProduct, gather_valid_actions
from sb3_trpo.maskable import MaskedTRPO
from sb3_trpo.masks import mask_sizes
from sb3_trpo.recurrent import RecurrentEvaluator, RecurrentTRPO
from sb3_trpo.recurrent_policies import (
    RecurrentCellActorCriticCnnPolicy,
    RecurrentCellActorCriticPolicy,
    RecurrentCellMultiInputActorCriticPolicy,
)
from sb3_trpo.sequences import SequenceDictRolloutBuffer, SequenceRolloutBuffer

__all__ = [
    "CnnLstmPolicy",
    "MaskableRecurrentActorCriticCnnPolicy",
    "MaskableRecurrentActorCriticPolicy",
    "MaskableRecurrentDictRolloutBuffer",
    "MaskableRecurrentMultiInputActorCriticPolicy",
    "MaskableRecurrentRolloutBuffer",
    "MaskableRecurrentTRPO",
    "MlpLstmPolicy",
    "MultiInputLstmPolicy",
]


class _MaskedRecurrent:
    """What masks add to sb3-contrib's recurrent policies: its maskable distributions, and an ``action_masks``
    argument to every method that makes a distribution. The methods run the recurrent policy's own, with the masks
    applied where it turns the actor's output into a distribution."""

    # the masks of the distribution being made (only while one of the methods below runs)
    _pending_masks: Any = None

    def _build(self: Any, lr_schedule: Schedule) -> None:
        super()._build(lr_schedule)  # type: ignore[misc]
        # sb3-contrib's maskable distribution and its head (MultiBinary: two logits per dimension); the optimizer is
        # made after this, once the LSTMs exist (RecurrentActorCriticPolicy.__init__)
        self.action_dist = make_masked_proba_distribution(self.action_space)
        self.action_net = self.action_dist.proba_distribution_net(latent_dim=self.mlp_extractor.latent_dim_pi)
        if self.ortho_init:
            self.action_net.apply(lambda module: self.init_weights(module, gain=0.01))  # as SB3 initialises its head

    def _get_action_dist_from_latent(self: Any, latent_pi: th.Tensor) -> MaskableDistribution:
        distribution: MaskableDistribution = self.action_dist.proba_distribution(action_logits=self.action_net(latent_pi))
        if self._pending_masks is not None:
            distribution.apply_masking(self._pending_masks)
        return distribution

    @contextmanager
    def _masks_applied(self, action_masks: np.ndarray | th.Tensor | None) -> Iterator[None]:
        """The distributions made inside are masked with ``action_masks`` (``None``: as an enclosing call says)."""
        if action_masks is None:
            yield
            return
        before, self._pending_masks = self._pending_masks, action_masks
        try:
            yield
        finally:
            self._pending_masks = before

    def forward(
        self,
        obs: th.Tensor,
        lstm_states: RNNStates,
        episode_starts: th.Tensor,
        deterministic: bool = False,
        action_masks: np.ndarray | th.Tensor | None = None,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor, RNNStates]:
        with self._masks_applied(action_masks):
            return super().forward(obs, lstm_states, episode_starts, deterministic)  # type: ignore[misc]

    def get_distribution(
        self,
        obs: th.Tensor,
        lstm_states: tuple[th.Tensor, th.Tensor],
        episode_starts: th.Tensor,
        action_masks: np.ndarray | th.Tensor | None = None,
    ) -> tuple[MaskableDistribution, tuple[th.Tensor, ...]]:
        with self._masks_applied(action_masks):
            return super().get_distribution(obs, lstm_states, episode_starts)  # type: ignore[misc]

    def evaluate_actions(
        self,
        obs: th.Tensor,
        actions: th.Tensor,
        lstm_states: RNNStates,
        episode_starts: th.Tensor,
        action_masks: np.ndarray | th.Tensor | None = None,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        with self._masks_applied(action_masks):
            return super().evaluate_actions(obs, actions, lstm_states, episode_starts)  # type: ignore[misc]

    def _predict(
        self,
        observation: th.Tensor,
        lstm_states: tuple[th.Tensor, th.Tensor],
        episode_starts: th.Tensor,
        deterministic: bool = False,
        action_masks: np.ndarray | th.Tensor | None = None,
    ) -> tuple[th.Tensor, tuple[th.Tensor, ...]]:
        with self._masks_applied(action_masks):
            return super()._predict(observation, lstm_states, episode_starts, deterministic)  # type: ignore[misc]

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
        action_masks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """sb3-contrib's recurrent ``predict``, choosing among the valid actions of ``action_masks`` (one row of
        booleans per observation, over the flattened action logits; ``None``: every action)."""
        with self._masks_applied(action_masks):
            return super().predict(observation, state, episode_start, deterministic)  # type: ignore[misc]


class MaskableRecurrentActorCriticPolicy(_MaskedRecurrent, RecurrentCellActorCriticPolicy):  # type: ignore[misc]  # adds keyword arguments
    """sb3-contrib's ``RecurrentActorCriticPolicy`` (an LSTM, GRU or RNN actor and critic:
    :class:`~sb3_trpo.recurrent_policies.RecurrentCellActorCriticPolicy`) with invalid-action masks, for Discrete,
    MultiDiscrete and MultiBinary actions: every method that makes a distribution takes ``action_masks``."""


# Subclasses of MaskableRecurrentActorCriticPolicy (as sb3-contrib's CNN and Dict forms subclass its MLP one), so the
# class's policy check, and a user's isinstance, accept every alias.
class MaskableRecurrentActorCriticCnnPolicy(MaskableRecurrentActorCriticPolicy, RecurrentCellActorCriticCnnPolicy):  # type: ignore[misc]  # adds keyword arguments
    """:class:`MaskableRecurrentActorCriticPolicy` reading images (sb3-contrib's ``CnnLstmPolicy``)."""


class MaskableRecurrentMultiInputActorCriticPolicy(  # type: ignore[misc]  # adds keyword arguments
    MaskableRecurrentActorCriticPolicy, RecurrentCellMultiInputActorCriticPolicy
):
    """:class:`MaskableRecurrentActorCriticPolicy` reading Dict observations (sb3-contrib's ``MultiInputLstmPolicy``)."""


MlpLstmPolicy = MaskableRecurrentActorCriticPolicy
CnnLstmPolicy = MaskableRecurrentActorCriticCnnPolicy
MultiInputLstmPolicy = MaskableRecurrentMultiInputActorCriticPolicy


class MaskableRecurrentRolloutBufferSamples(NamedTuple):
    """sb3-contrib's recurrent samples (padded sequences) with each step's mask, padded likewise (all-valid)."""

    observations: Any  # a tensor, or a dict of them
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    lstm_states: RNNStates
    episode_starts: th.Tensor
    mask: th.Tensor
    action_masks: th.Tensor


class _StoresMasks:
    """What a recurrent buffer adds to store masks: an array of them, written by ``add(..., action_masks=...)``,
    flattened with the other arrays, and cut into the same padded sequences (padding: every action valid)."""

    action_masks: np.ndarray

    def reset(self: Any) -> None:
        self.mask_dims = sum(mask_sizes(self.action_space))
        self.action_masks = np.ones((self.buffer_size, self.n_envs, self.mask_dims), dtype=np.float32)
        super().reset()  # type: ignore[misc]

    def add(self: Any, *args: Any, action_masks: np.ndarray | None = None, **kwargs: Any) -> None:
        """The recurrent buffer's ``add``, and the step's masks (``None``: every action valid)."""
        if action_masks is not None:
            self.action_masks[self.pos] = np.asarray(action_masks).reshape((self.n_envs, self.mask_dims))
        super().add(*args, **kwargs)  # type: ignore[misc]

    def get(self: Any, batch_size: int | None = None) -> Generator[MaskableRecurrentRolloutBufferSamples, None, None]:
        if not self.generator_ready:  # before the recurrent buffer flattens its own arrays, in the same order
            self.action_masks = self.swap_and_flatten(self.action_masks)
        yield from super().get(batch_size)  # type: ignore[misc]

    def _get_samples(self: Any, batch_inds: np.ndarray, env_change: np.ndarray, env: Any = None) -> Any:
        samples = super()._get_samples(batch_inds, env_change, env)  # type: ignore[misc]
        masks = self.pad(self.action_masks[batch_inds], padding_value=1.0).reshape(-1, self.mask_dims)
        return MaskableRecurrentRolloutBufferSamples(**samples._asdict(), action_masks=masks)


class MaskableRecurrentRolloutBuffer(_StoresMasks, SequenceRolloutBuffer):  # type: ignore[misc]  # adds keyword arguments
    """sb3-contrib's ``RecurrentRolloutBuffer`` (with :class:`~sb3_trpo.sequences.PaddedSequences`) that also stores
    each step's action masks."""


class MaskableRecurrentDictRolloutBuffer(_StoresMasks, SequenceDictRolloutBuffer):  # type: ignore[misc]  # adds keyword arguments
    """sb3-contrib's ``RecurrentDictRolloutBuffer`` (with :class:`~sb3_trpo.sequences.PaddedSequences`) that also
    stores each step's action masks."""


def _head_slices(actor: ActorView) -> tuple[th.nn.Linear, slice, slice] | None:
    """The head and where its weight and bias lie in the flat actor parameters, when the policy's logits are its
    ``action_net`` (a biased linear layer) of the latent, masked, for a Discrete action space (``None`` otherwise: a
    custom distribution, head or method, MultiDiscrete or MultiBinary actions, a frozen head)."""
    policy = actor.policy
    head = getattr(policy, "action_net", None)
    standard = type(policy)._get_action_dist_from_latent is _MaskedRecurrent._get_action_dist_from_latent
    if (
        not isinstance(policy, MaskableRecurrentActorCriticPolicy)
        or not standard
        or "_get_action_dist_from_latent" in vars(policy)  # replaced on the instance
        or not isinstance(policy.action_space, spaces.Discrete)
        or type(head) is not th.nn.Linear
        or head.bias is None
    ):
        return None
    offsets = np.cumsum([0, *actor.numels])
    where = {id(param): slice(int(offsets[i]), int(offsets[i + 1])) for i, param in enumerate(actor.parameters)}
    if id(head.weight) not in where or id(head.bias) not in where:
        return None
    return head, where[id(head.weight)], where[id(head.bias)]


class MaskedRecurrentEvaluator(RecurrentEvaluator):
    """:class:`~sb3_trpo.recurrent.RecurrentEvaluator` whose Fisher-vector product, with few valid actions among many
    (:func:`~sb3_trpo.fisher.gather_valid_actions`), runs the head over each step's valid actions only: the LSTM and
    the layers below the head through autograd, the head written out (:class:`~sb3_trpo.fisher.GatheredHeadFisherProduct`).
    Otherwise, and for heads it does not know, autograd's product over every logit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head = _head_slices(self.actor) if self._masks is not None else None
        # the head's input of the last evaluation with a graph, and the logits it gave
        self._head_input: tuple[th.Tensor, th.Tensor] | None = None

    def evaluate(self, theta: th.Tensor) -> PolicyEvaluation:
        if self._head is None or not theta.requires_grad:
            return super().evaluate(theta)
        captured: list[th.Tensor] = []
        hook = self._head[0].register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        try:
            evaluation = super().evaluate(theta)
        finally:
            hook.remove()
        self._head_input = (evaluation.params.tensors[0], captured[0]) if len(captured) == 1 else None
        return evaluation

    def fisher_product(self, theta: th.Tensor, current: PolicyEvaluation) -> FisherProduct:
        if self._head is None or self._head_input is None or self._head_input[0] is not current.params.tensors[0]:
            return super().fisher_product(theta, current)
        assert self._masks is not None
        assert self.weights is not None
        valid = self._masks.bool()
        probs = th.softmax(current.params.tensors[0].detach(), dim=-1) * valid
        gathered = gather_valid_actions(valid, probs, real=self.weights > 0)
        if gathered is None:
            return super().fisher_product(theta, current)
        head, weight_slice, bias_slice = self._head
        return GatheredHeadFisherProduct(
            theta, self._head_input[1], head.weight, weight_slice, bias_slice, gathered, self.weights, self._damping
        )


class MaskableRecurrentTRPO(MaskedTRPO, RecurrentTRPO):
    """
    Trust Region Policy Optimization with recurrent (LSTM) policies and invalid-action masks.

    :class:`~sb3_trpo.RecurrentTRPO` and :class:`~sb3_trpo.MaskableTRPO` in one: a RecurrentPPO user with masks
    changes the class name. The policies are ``"MlpLstmPolicy"``, ``"CnnLstmPolicy"``, ``"MultiInputLstmPolicy"``
    (:class:`MaskableRecurrentActorCriticPolicy` and its forms, with sb3-contrib's recurrent options) for Discrete,
    MultiDiscrete and MultiBinary actions; ``predict(obs, state, episode_start, deterministic, action_masks)``;
    ``learn(..., use_masking=True)``. The masks come from wherever the environment keeps them
    (:mod:`sb3_trpo.masks`), are stored with each step, and define the masked distributions of the whole update:
    sampling at collection, the surrogate's ratios, the KL, the Fisher matrix and the line search, on the rollout's
    padded sequences (padding counts for nothing, whatever it holds).

    ``sub_sampling_factor`` must be 1 and ``distributed_critic`` ``"gradients"``, as for RecurrentTRPO.

    :param policy: the policy (an alias above, or a :class:`MaskableRecurrentActorCriticPolicy` subclass)
    :param env: the environment to learn from (if registered in Gym, can be str); it must offer masks to train with
        them
    :param kwargs: the other arguments of :class:`~sb3_trpo.TRPO` (as keywords), with the same meaning and checks
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpLstmPolicy": MlpLstmPolicy,
        "CnnLstmPolicy": CnnLstmPolicy,
        "MultiInputLstmPolicy": MultiInputLstmPolicy,
    }
    policy: MaskableRecurrentActorCriticPolicy
    _policy_base = MaskableRecurrentActorCriticPolicy
    _policy_kind = "maskable recurrent"
    _buffer_classes = (MaskableRecurrentRolloutBuffer, MaskableRecurrentDictRolloutBuffer)
    _accepted_buffers = _lean_buffers = _buffer_classes
    _evaluator_class = MaskedRecurrentEvaluator

    def __init__(self, policy: str | type[MaskableRecurrentActorCriticPolicy], env: GymEnv | str, **kwargs: Any):
        super().__init__(policy, env, **kwargs)
