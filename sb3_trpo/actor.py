"""The actor as one flat parameter vector and a pure function ``θ ↦ action distribution``.

TRPO's step lives in the space of the *actor* parameters: every parameter the action distribution depends
on, whatever its name (shared feature extractors and ``log_std`` included, the value head excluded). They
are found structurally, by asking autograd which parameters the distribution's tensors are connected to, so
custom policies work without naming conventions.

Candidates are evaluated with :func:`torch.func.functional_call`, which runs the policy's own
``get_distribution`` with substituted parameter tensors: no module is copied and the policy's parameters
change only in :meth:`ActorView.commit`.
"""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import NamedTuple

import torch as th
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    Distribution,
    MultiCategoricalDistribution,
)
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.torch_layers import MlpExtractor
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn
from torch.func import functional_call

from sb3_trpo.distributions import DistributionParams, Family, distribution_params
from sb3_trpo.fisher import MlpFisherProduct, MlpLayer
from sb3_trpo.mlp import ACTIVATION_DERIVATIVES, linear_layers, methods_replaced_on_instances

#: the distributions of the written-out Fisher product (exact types; gSDE's std depends on the state)
_MLP_FISHER_DISTRIBUTIONS: list[type] = [
    DiagGaussianDistribution,
    CategoricalDistribution,
    MultiCategoricalDistribution,
    BernoulliDistribution,
]
#: policy classes whose get_distribution, extract_features and _get_action_dist_from_latent compute what
#: ActorCriticPolicy's do (sb3-contrib's maskable policy is added by sb3_trpo.maskable, with masking on top)
_STANDARD_POLICIES: list[type[BasePolicy]] = [ActorCriticPolicy]
_STANDARD_METHODS = ("get_distribution", "extract_features", "_get_action_dist_from_latent")
#: a recurrent policy's extra inputs: the LSTM states at the start of each sequence, and the episode starts
RecurrentContext = tuple[tuple[th.Tensor, th.Tensor], th.Tensor]


def register_standard_mlp_policy(policy_class: type[BasePolicy], distributions: tuple[type, ...]) -> None:
    """Let :func:`mlp_fisher_product` write out the Fisher product of another policy class whose actor is computed
    as ``ActorCriticPolicy``'s (and whose ``get_distribution`` may take ``action_masks``).

    :param policy_class: the policy class (its methods, not its subclasses', are the standard ones)
    :param distributions: its distribution classes (exact types) whose parameters are SB3's logits
    """
    _STANDARD_POLICIES.append(policy_class)
    _MLP_FISHER_DISTRIBUTIONS.extend(distributions)


class PolicyEvaluation(NamedTuple):
    """The action distributions of a batch of states, evaluated at some actor parameters.

    :param params: the tensors that define the distributions
    :param log_prob: log-probability of the given actions, shape ``(batch,)``
    :param entropy: entropy of each distribution, or ``None`` where it has no closed form (tanh squashing)
    """

    params: DistributionParams
    log_prob: th.Tensor
    entropy: th.Tensor | None


class _DistributionOf(nn.Module):
    """Module whose forward is the policy's ``get_distribution``, so that ``functional_call`` can run it."""

    def __init__(self, policy: ActorCriticPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(
        self,
        obs: PyTorchObs,
        actions: th.Tensor,
        action_masks: th.Tensor | None = None,
        context: RecurrentContext | None = None,
    ) -> PolicyEvaluation:
        distribution = distribution_of(self.policy, obs, action_masks, context)
        # SB3 reuses one distribution object per policy: read everything out of it before the next call
        return PolicyEvaluation(distribution_params(distribution), distribution.log_prob(actions), distribution.entropy())


def distribution_of(
    policy: ActorCriticPolicy, obs: PyTorchObs, action_masks: th.Tensor | None = None, context: RecurrentContext | None = None
) -> Distribution:
    """The policy's action distribution of ``obs``, as its own ``get_distribution`` computes it.

    :param action_masks: for a maskable policy (sb3-contrib's ``get_distribution(obs, action_masks)``)
    :param context: for a recurrent policy, the LSTM states at the start of each sequence and the episode starts
        (sb3-contrib's ``get_distribution(obs, lstm_states, episode_starts)``, whose new states are not needed)
    """
    if context is not None and action_masks is not None:  # a maskable recurrent policy
        return policy.get_distribution(obs, *context, action_masks=action_masks)[0]  # type: ignore[call-arg,index]
    if context is not None:
        return policy.get_distribution(obs, *context)[0]  # type: ignore[call-arg,index]
    if action_masks is not None:
        return policy.get_distribution(obs, action_masks=action_masks)  # type: ignore[call-arg]
    return policy.get_distribution(obs)


def select_actor_parameters(
    policy: ActorCriticPolicy, obs: PyTorchObs, context: RecurrentContext | None = None
) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters that the action distribution depends on, in ``named_parameters`` order.

    Decided by the autograd graph of one forward pass, not by names: a parameter belongs to the actor if the
    distribution's tensors are connected to it.

    :param policy: the actor-critic policy
    :param obs: a (small) batch of observations, already a tensor (or dict of tensors) on the policy's device
    :param context: a recurrent policy's LSTM states and episode starts for ``obs`` (see :func:`distribution_of`)
    :return: ``(name, parameter)`` pairs
    """
    named = [(name, param) for name, param in policy.named_parameters() if param.requires_grad]
    params = distribution_params(distribution_of(policy, obs, context=context))
    # a tensor without autograd history (e.g. a frozen log_std) depends on no trainable parameter
    connected = [t for t in params.tensors if t.requires_grad]
    selected = []
    if connected and named:
        probe = th.stack([t.sum() for t in connected]).sum()
        grads = th.autograd.grad(probe, [p for _, p in named], allow_unused=True)
        selected = [pair for pair, grad in zip(named, grads, strict=True) if grad is not None]
    if not selected:
        raise ValueError(
            "The policy's action distribution does not depend on any trainable parameter, so TRPO has nothing to "
            "train: leave at least one actor parameter with requires_grad=True (e.g. action_net or log_std)."
        )
    return selected


class ActorView:
    """The actor parameters of a policy as one flat vector, with functional evaluation at any vector.

    :param policy: the actor-critic policy
    :param obs: a small batch of observations used once to find the actor parameters
    :param context: for a recurrent policy, the LSTM states and episode starts of ``obs``
    """

    def __init__(self, policy: ActorCriticPolicy, obs: PyTorchObs, context: RecurrentContext | None = None) -> None:
        self.policy = policy
        named = select_actor_parameters(policy, obs, context)
        self.names = ["policy." + name for name, _ in named]
        self.parameters = [param for _, param in named]
        self._places = _places_of(policy, self.parameters)
        self.shapes = [param.shape for param in self.parameters]
        self.numels = [param.numel() for param in self.parameters]
        self._module = _DistributionOf(policy)
        self._parameter_key = self.parameter_key(policy)

    @staticmethod
    def parameter_key(policy: nn.Module) -> tuple[tuple[int, bool], ...]:
        """:return: identity and ``requires_grad`` of every parameter of ``policy``: what the choice of the actor
        parameters depends on (a replaced module, or a part frozen or unfrozen since, changes it)"""
        return tuple((id(p), p.requires_grad) for p in policy.parameters())

    def is_view_of(self, policy: nn.Module) -> bool:
        """Whether this view still describes ``policy``.

        :param policy: the policy the view was built from, or another
        :return: ``True`` for the same object with the same parameter objects, each as trainable as when the view was
            built
        """
        return policy is self.policy and self.parameter_key(policy) == self._parameter_key

    @property
    def size(self) -> int:
        """Number of actor parameters (length of the flat vector)."""
        return sum(self.numels)

    def flat(self) -> th.Tensor:
        """:return: a detached copy of the current actor parameters as one flat vector"""
        return th.cat([param.detach().reshape(-1) for param in self.parameters])

    def unflatten(self, theta: th.Tensor) -> dict[str, th.Tensor]:
        """Split a flat vector into tensors shaped like the actor parameters (views, so gradients flow), keyed by
        every place where the policy holds an actor parameter (see :func:`_places_of`).

        :param theta: flat vector of length :attr:`size`
        """
        chunks = th.split(theta, self.numels)
        return {
            place: chunk.view(shape)
            for places, chunk, shape in zip(self._places, chunks, self.shapes, strict=True)
            for place in places
        }

    def evaluate(
        self,
        theta: th.Tensor,
        obs: PyTorchObs,
        actions: th.Tensor,
        action_masks: th.Tensor | None = None,
        context: RecurrentContext | None = None,
    ) -> PolicyEvaluation:
        """Action distributions of ``obs`` and log-probabilities of ``actions`` if the actor parameters were ``theta``.

        The policy's own parameters are not touched.

        :param theta: flat actor parameters
        :param obs: observations
        :param actions: actions taken in those states (for the log-probabilities)
        :param action_masks: the valid actions of each state, for a maskable policy (``None``: no masking)
        :param context: for a recurrent policy, the LSTM states at the start of each sequence and the episode starts
        """
        # tie_weights=False: the places are given explicitly, each once (torch's own untying swaps a module registered
        # under several names once per name and then restores the candidate instead of the parameter)
        inputs = (obs, actions, action_masks, context)
        output = functional_call(self._module, self.unflatten(theta), inputs, tie_weights=False)
        assert isinstance(output, PolicyEvaluation)
        return output

    def commit(self, theta: th.Tensor) -> None:
        """Write ``theta`` into the policy's actor parameters, as one uninterruptible assignment.

        A Ctrl-C (SIGINT) arriving during the write is held back until every parameter is written, so the
        actor is never left half old, half new.

        :param theta: flat actor parameters
        :raises ValueError: if ``theta`` is not finite (the policy is left untouched)
        """
        if not bool(th.isfinite(theta).all()):
            raise ValueError("Refusing to write non-finite values into the actor parameters; the policy is unchanged.")
        chunks = [chunk.view_as(param) for param, chunk in zip(self.parameters, th.split(theta, self.numels), strict=True)]
        with interrupts_deferred(), th.no_grad():
            for param, chunk in zip(self.parameters, chunks, strict=True):
                param.copy_(chunk)


def _places_of(policy: nn.Module, parameters: list[nn.Parameter]) -> list[list[str]]:
    """Where each parameter is registered in ``policy``: one name per distinct (module, attribute) holding it.

    A module can sit under several names (SB3's shared ``features_extractor`` is also ``pi_features_extractor`` and
    ``vf_features_extractor``): one of its names reaches it. A parameter can also be held by two distinct modules
    (tied weights): each of them needs the substitute, or part of the forward pass would see the old value.

    :return: for each parameter, the names (prefixed ``policy.``, as seen from :class:`_DistributionOf`) to substitute
    """
    places: dict[int, list[str]] = {id(p): [] for p in parameters}
    seen: set[tuple[int, str]] = set()
    for name, param in policy.named_parameters(remove_duplicate=False):
        module_name, _, attribute = name.rpartition(".")
        owner = policy.get_submodule(module_name)
        if id(param) in places and (id(owner), attribute) not in seen:
            seen.add((id(owner), attribute))
            places[id(param)].append("policy." + name)
    return [places[id(p)] for p in parameters]


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back SIGINT (KeyboardInterrupt) until the block is done, then deliver it.

    Only the main thread receives signals in Python; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple[int, FrameType | None]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):  # Python's default handler raises KeyboardInterrupt here
            previous(*received[0])
        elif received and previous == signal.SIG_DFL:
            raise KeyboardInterrupt


def mlp_fisher_product(
    view: ActorView, obs: PyTorchObs, damping: float, action_masks: th.Tensor | None = None
) -> MlpFisherProduct | None:
    """The written-out Fisher-vector product for SB3's standard MLP actor, or ``None`` if the policy is not one.

    Covered: ``ActorCriticPolicy``'s own ``get_distribution`` over a features extractor without trainable actor
    parameters, SB3's ``MlpExtractor`` policy branch (biased ``nn.Linear`` layers with Tanh, ReLU, LeakyReLU or
    ELU, not with a negative slope or alpha), a biased linear ``action_net``, and a diagonal Gaussian (``log_std``
    trainable or frozen), Categorical, MultiCategorical or Bernoulli distribution, with every layer's parameters in
    the actor. Anything else (gSDE, a custom policy or extractor, frozen layers, hooks, methods replaced on an
    instance) returns ``None`` and TRPO uses :class:`~sb3_trpo.fisher.JacobianFisherProduct`.

    :param view: the actor view (its flat layout is the product's)
    :param obs: the states of the Fisher matrix
    :param damping: Tikhonov damping added to ``F``
    :param action_masks: the valid actions of each state, for a maskable policy: the metric is then taken at the
        masked distributions (a masked action adds nothing to ``M``, and neither does a sub-space with no valid
        action, whose distribution sb3-contrib fixes to the uniform one)
    """
    policy = view.policy
    if not any(all(getattr(type(policy), m) is getattr(ref, m) for m in _STANDARD_METHODS) for ref in _STANDARD_POLICIES):
        return None
    if type(policy.mlp_extractor) is not MlpExtractor or type(policy.action_dist) not in _MLP_FISHER_DISTRIBUTIONS:
        return None
    if methods_replaced_on_instances(policy):  # e.g. policy.get_distribution = ...: the classes' methods do not run
        return None
    layers = linear_layers([*policy.mlp_extractor.policy_net, policy.action_net])
    if layers is None or layers[-1][1] is not None:
        return None
    slices: dict[int, slice] = {}
    offset = 0
    for param, numel in zip(view.parameters, view.numels, strict=True):
        slices[id(param)] = slice(offset, offset + numel)
        offset += numel
    layer_params = [p for linear, _ in layers for p in (linear.weight, linear.bias)]
    log_std = getattr(policy, "log_std", None) if isinstance(policy.action_dist, DiagGaussianDistribution) else None
    expected = {id(p) for p in layer_params} | ({id(log_std)} if log_std is not None and log_std.requires_grad else set())
    if set(slices) != expected or any(p.dtype != th.float32 for p in view.parameters):
        return None  # frozen layers, or actor parameters elsewhere (a trainable features extractor)
    with th.no_grad():
        features = BasePolicy.extract_features(policy, obs, policy.pi_features_extractor)
        assert isinstance(features, th.Tensor)
        hidden = []
        x = features
        for linear, activation in layers[:-1]:
            assert activation is not None
            x = activation(linear(x))
            hidden.append(x)
        distribution = policy._get_action_dist_from_latent(x)
        if action_masks is not None:
            distribution.apply_masking(action_masks)  # type: ignore[attr-defined]
        params = distribution_params(distribution).detach()
    fisher_layers = [
        MlpLayer(
            weight=linear.weight.detach(),
            weight_slice=slices[id(linear.weight)],
            bias_slice=slices[id(linear.bias)],
            derivative=None if activation is None else ACTIVATION_DERIVATIVES[type(activation)],
            activation=activation,
        )
        for linear, activation in layers
    ]
    # one softmax per categorical sub-space (MultiDiscrete, and sb3-contrib's masked MultiBinary as pairs)
    split = [t.shape[1] for t in params.tensors] if params.family is Family.CATEGORICAL and len(params.tensors) > 1 else [-1]
    log_std_slice = slices.get(id(log_std)) if log_std is not None else None
    valid = None if action_masks is None else action_masks.reshape(len(features), -1)
    return MlpFisherProduct(features, fisher_layers, hidden, params, log_std_slice, split, view.size, damping, valid)
