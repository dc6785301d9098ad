"""The policy's forward pass for collection, as plain tensor ops: what ``ActorCriticPolicy.forward`` computes, bit
for bit, with the same random numbers drawn, without its module calls and validated distribution objects.

:func:`lean_collection_gap` says whether a policy is one this covers; :class:`LeanForward` runs it.
"""

import functools
import math
from collections.abc import Callable

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    Distribution,
    MultiCategoricalDistribution,
    StateDependentNoiseDistribution,
)
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.preprocessing import preprocess_obs
from stable_baselines3.common.torch_layers import FlattenExtractor, MlpExtractor
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn
from torch.nn import functional as F

from sb3_trpo.mlp import methods_replaced_on_instances

#: The action distributions the lean forward computes (exact types: a subclass may change the computation)
_COVERED_DISTRIBUTIONS = (
    DiagGaussianDistribution,
    CategoricalDistribution,
    MultiCategoricalDistribution,
    BernoulliDistribution,
    StateDependentNoiseDistribution,
)
#: ``ActorCriticPolicy`` methods whose computation the lean forward repeats (a policy overriding one falls back)
_REPEATED_METHODS = ("forward", "extract_features", "_get_action_dist_from_latent")
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))  # the constant as torch's Normal.log_prob computes it

Layer = Callable[[th.Tensor], th.Tensor]
#: the logit sb3-contrib's MaskableCategorical gives masked actions (not -inf: their probability is exactly 0)
_MASKED_LOGIT = -1e8
#: masked distribution classes (sb3-contrib's, registered by sb3_trpo.maskable) -> the SB3 class they mask
_MASKED_DISTRIBUTIONS: dict[type[Distribution], type[Distribution]] = {}


def register_masked_distribution(masked: type[Distribution], unmasked: type[Distribution]) -> None:
    """Let the lean forward sample a masked distribution: ``unmasked``'s computation with sb3-contrib's masking.

    :param masked: the masked distribution class (exact type)
    :param unmasked: ``CategoricalDistribution`` or ``MultiCategoricalDistribution``, whose sampler it uses
    """
    _MASKED_DISTRIBUTIONS[masked] = unmasked


def _masked_logits(logits: th.Tensor, masks: th.Tensor | None) -> th.Tensor:
    """What ``MaskableCategorical(logits=...).apply_masking(masks)`` holds: the normalized logits, with the masked
    ones replaced by -1e8 (torch's Categorical normalizes them again, as it does with ``masks=None`` too)."""
    normalized = logits - logits.logsumexp(dim=-1, keepdim=True)
    if masks is None:
        return normalized
    return th.where(masks, normalized, th.tensor(_MASKED_LOGIT, dtype=logits.dtype, device=logits.device))


@functools.cache
def _multinomial_is_exponential_race(device: th.device) -> bool:
    """Whether ``th.multinomial(p, 1, replacement=True)`` on this device is ``argmax(p / E)`` with ``E`` drawn by
    ``exponential_()`` (the exponential-race form of the Gumbel-max trick, which torch uses for one sample).

    Checked once per device against torch itself, with private generators: if a torch version computes it
    otherwise, collection calls ``th.multinomial`` (and still draws exactly what SB3's collection draws).
    """
    for rows, events in ((1, 2), (3, 5), (16, 7)):
        draw, race = th.Generator(device=device), th.Generator(device=device)
        draw.manual_seed(rows * events)
        race.manual_seed(rows * events)
        probs = th.softmax(th.linspace(-2.0, 3.0, rows * events, device=device).reshape(rows, events).sin(), dim=-1)
        for _ in range(20):
            expected = th.multinomial(probs, 1, True, generator=draw).reshape(-1)
            if not th.equal((probs / th.empty_like(probs).exponential_(generator=race)).argmax(dim=-1), expected):
                return False
        if not th.equal(th.rand(4, generator=draw, device=device), th.rand(4, generator=race, device=device)):
            return False  # the same results, but not the same amount of the random stream consumed
    return True


def _layer(module: nn.Module, fresh_input: bool = False) -> Layer:
    """One layer of an MLP as a plain function of its own parameters (the op its ``forward`` runs).

    :param fresh_input: whether the layer's input is a new tensor used by nothing else (the output of a linear
        layer), so that an activation may overwrite it
    """
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        if bias is None:
            return lambda x: F.linear(x, weight)
        # what F.linear runs for a batch with a bias, with the transposed weight (a view) made once per rollout
        weight_t = weight.t()
        return lambda x: th.addmm(bias, x, weight_t)
    if type(module) is nn.Tanh:
        return th.tanh_ if fresh_input else th.tanh
    if type(module) is nn.ReLU:
        return th.relu_ if fresh_input else th.relu
    return module.forward  # any other activation: its own forward, without nn.Module's call machinery


def _mlp(sequential: nn.Sequential) -> Layer:
    """An ``nn.Sequential`` of leaf modules as one function."""
    modules = list(sequential)
    layers = [_layer(m, fresh_input=i > 0 and type(modules[i - 1]) is nn.Linear) for i, m in enumerate(modules)]

    def run(x: th.Tensor) -> th.Tensor:
        for layer in layers:
            x = layer(x)
        return x

    return run


def lean_collection_gap(
    policy: BasePolicy,
    rollout_buffer: RolloutBuffer,
    reference: type[BasePolicy] = ActorCriticPolicy,
    buffer_classes: tuple[type[RolloutBuffer], ...] = (RolloutBuffer, DictRolloutBuffer),
) -> str | None:
    """Why the lean collection cannot stand in for SB3's with this policy and buffer, or ``None`` if it can.

    It repeats the computation of ``ActorCriticPolicy.forward`` with its standard parts: SB3's ``MlpExtractor``
    over ``nn.Sequential`` layers, ``nn.Linear`` heads, SB3's five action distributions (gSDE without squashing),
    any features extractor (called as it is), and SB3's own two rollout buffers (written directly). Anything
    else may compute or store something different, so it is left to SB3's loop.

    :param policy: the model's policy
    :param rollout_buffer: the buffer to fill
    :param reference: the policy class whose ``forward`` is repeated (sb3-contrib's maskable policy computes the
        same, then masks)
    :param buffer_classes: the buffer classes whose ``add`` is repeated (exact types)
    """
    if not isinstance(policy, reference):
        return f"the policy class {type(policy).__name__} is not a {reference.__name__}"
    for method in _REPEATED_METHODS:
        if getattr(type(policy), method) is not getattr(reference, method):
            return f"the policy class {type(policy).__name__} overrides {method}"
    replaced = methods_replaced_on_instances(policy)
    if replaced:
        return f"the policy replaces {replaced[0].rpartition('.')[2]} on the instance ({replaced[0]})"
    if type(policy.mlp_extractor) is not MlpExtractor:
        return f"the policy's mlp_extractor is a {type(policy.mlp_extractor).__name__}, not SB3's MlpExtractor"
    nets = (policy.mlp_extractor.policy_net, policy.mlp_extractor.value_net)
    if any(type(net) is not nn.Sequential or any(len(list(m.children())) for m in net) for net in nets):
        return "the policy's MlpExtractor networks are not flat nn.Sequential stacks"
    if type(policy.action_net) is not nn.Linear or type(policy.value_net) is not nn.Linear:
        return "the policy's action_net or value_net is not an nn.Linear"
    # masked distributions with a maskable reference policy only (SB3's policy never masks)
    covered = _COVERED_DISTRIBUTIONS if reference is ActorCriticPolicy else (*_COVERED_DISTRIBUTIONS, *_MASKED_DISTRIBUTIONS)
    if type(policy.action_dist) not in covered:
        return f"the action distribution {type(policy.action_dist).__name__} is not one it covers"
    if isinstance(policy.action_dist, StateDependentNoiseDistribution) and policy.action_dist.bijector is not None:
        return "gSDE with squashed actions (squash_output=True)"
    if type(rollout_buffer) not in buffer_classes:
        names = " or ".join(cls.__name__ for cls in buffer_classes)
        return f"the rollout buffer class {type(rollout_buffer).__name__} is not {names}"
    global_hooks = (
        nn.modules.module._global_forward_hooks,
        nn.modules.module._global_forward_pre_hooks,
    )
    if any(global_hooks) or any(m._forward_hooks or m._forward_pre_hooks for m in policy.modules()):
        return "forward hooks are registered on the policy's modules"
    return None


class LeanForward:
    """``ActorCriticPolicy.forward`` for collection, as the same tensor ops on the policy's own parameters.

    SB3's forward builds a ``torch.distributions`` object with argument validation at every step and goes through
    a dozen ``nn.Module`` calls; this runs the ops those compute, in the same order, and draws the same random
    numbers from torch's generator (so the samples, values and log-probabilities are bit-identical). Built once
    per rollout from the policy as it is then (see :func:`lean_collection_gap` for what it covers).

    :param policy: a policy for which :func:`lean_collection_gap` found nothing
    """

    def __init__(self, policy: ActorCriticPolicy) -> None:
        self.policy = policy
        # set per call: the masks of the current step, for a masked distribution (see register_masked_distribution)
        self._masks: th.Tensor | None = None
        # sb3-contrib's masked distributions normalize the logits once more than SB3's, with or without masks
        self._masked_distribution = type(policy.action_dist) in _MASKED_DISTRIBUTIONS
        extractor = policy.mlp_extractor
        self._actor_mlp, self._critic_mlp = _mlp(extractor.policy_net), _mlp(extractor.value_net)
        self._value_head, self._action_head = _layer(policy.value_net), _layer(policy.action_net)
        self._action_shape = (-1, *(policy.action_space.shape or ()))
        self._on_cpu = policy.device.type == "cpu"
        # what the sampler needs of log_std alone (Gaussian: std and its log-density terms; gSDE: the variance
        # matrix), recomputed only when log_std changes: once per rollout in training, never per step
        self._log_std_seen: th.Tensor | None = None
        self._log_std_terms: tuple[th.Tensor, np.ndarray, np.ndarray]
        space = policy.observation_space
        # flat Box observations through FlattenExtractors: their float32 batches are the features themselves
        self._float_vectors = (
            type(space) is spaces.Box
            and len(space.shape) == 1
            and type(policy.pi_features_extractor) is FlattenExtractor
            and type(policy.vf_features_extractor) is FlattenExtractor
        )
        distribution = type(policy.action_dist)
        self._sample = {
            DiagGaussianDistribution: self._diag_gaussian,
            CategoricalDistribution: self._categorical,
            MultiCategoricalDistribution: self._multi_categorical,
            BernoulliDistribution: self._bernoulli,
            StateDependentNoiseDistribution: self._state_dependent_noise,
        }[_MASKED_DISTRIBUTIONS.get(distribution, distribution)]

    def _features(self, obs: PyTorchObs, extractor: nn.Module) -> th.Tensor:
        policy = self.policy
        if self._float_vectors:
            # what preprocess_obs does to a Box batch; nn.Flatten returns a (batch, n) batch as it is
            return obs.float()  # type: ignore[union-attr]
        preprocessed = preprocess_obs(obs, policy.observation_space, normalize_images=policy.normalize_images)
        if type(extractor) is FlattenExtractor:
            return preprocessed.flatten(1)  # type: ignore[union-attr]  # nn.Flatten's op
        return extractor(preprocessed)

    def _step_features(self, obs: PyTorchObs, action_masks: np.ndarray | None) -> tuple[th.Tensor, th.Tensor]:
        """Set the step's masks (for a masked distribution) and return the actor's and critic's features of ``obs``,
        as ``ActorCriticPolicy.extract_features`` computes them."""
        policy = self.policy
        self._masks = None if action_masks is None else th.as_tensor(action_masks, dtype=th.bool, device=policy.device)
        if policy.share_features_extractor:
            features = self._features(obs, policy.features_extractor)
            return features, features
        return self._features(obs, policy.pi_features_extractor), self._features(obs, policy.vf_features_extractor)

    def __call__(self, obs: PyTorchObs, action_masks: np.ndarray | None = None) -> tuple[np.ndarray, th.Tensor, th.Tensor]:
        """:return: actions (as the numpy array SB3 makes of them), values and log-probabilities, as
        ``policy(obs)`` computes them (``policy(obs, action_masks=...)`` for a maskable policy)"""
        pi_features, vf_features = self._step_features(obs, action_masks)
        latent_pi, latent_vf = self._actor_mlp(pi_features), self._critic_mlp(vf_features)
        values = self._value_head(latent_vf)
        actions, log_prob = self._sample(latent_pi)
        return actions.reshape(self._action_shape), values, log_prob

    # The samplers below draw from torch's generator with the very calls torch.distributions makes, then finish
    # on the CPU in numpy where the remaining ops are exactly rounded IEEE arithmetic, indexing or argmax (the
    # same results as torch's, bit for bit, at a fraction of the per-op cost); exp, log and sums stay in torch.

    def _terms_of_log_std(self) -> tuple[th.Tensor, np.ndarray, np.ndarray]:
        """The sampler's values that depend on log_std alone, cached per version of log_std.

        Gaussian: exp(log_std) with the parts of the log-density made of it (SB3 broadcasts them to every row: the
        same values). gSDE: the squared std matrix of the exploration weights (its log-density terms depend on the
        latent features, so they are computed per step).
        """
        log_std = self.policy.log_std
        # compared by value: a write through log_std.data (a callback's) leaves autograd's version counter as it was
        if self._log_std_seen is None or not th.equal(self._log_std_seen, log_std):
            distribution = self.policy.action_dist
            if isinstance(distribution, StateDependentNoiseDistribution):
                self._log_std_terms = distribution.get_std(log_std) ** 2, np.empty(0), np.empty(0)
            else:
                std = log_std.exp()
                self._log_std_terms = std, (2 * std**2).cpu().numpy(), std.log().cpu().numpy()
            self._log_std_seen = log_std.detach().clone()
        return self._log_std_terms

    @staticmethod
    def _gaussian_log_prob(actions: th.Tensor, mean: th.Tensor, std: th.Tensor) -> th.Tensor:
        # torch's Normal.log_prob, summed over action dimensions as SB3's sum_independent_dims does
        return (-((actions - mean) ** 2) / (2 * std**2) - std.log() - _LOG_SQRT_2PI).sum(dim=1)

    @staticmethod
    def _numpy_gaussian_log_prob(
        actions: np.ndarray, mean: np.ndarray, two_variance: np.ndarray, log_std: np.ndarray
    ) -> th.Tensor:
        # torch's Normal.log_prob term by term (the same IEEE operations), then SB3's sum over action dimensions
        # in torch (whose summation order numpy's would not repeat)
        deviation = actions - mean
        terms = -(deviation * deviation) / two_variance - log_std - _LOG_SQRT_2PI
        return th.from_numpy(terms).sum(dim=1)

    def _diag_gaussian(self, latent_pi: th.Tensor) -> tuple[np.ndarray, th.Tensor]:
        mean = self._action_head(latent_pi)
        std, two_variance, log_std = self._terms_of_log_std()
        noise = th.empty_like(mean).normal_()  # Normal.rsample's draw: one standard normal per entry
        if not self._on_cpu:
            actions = mean + noise * std
            return actions.cpu().numpy(), self._gaussian_log_prob(actions, mean, std)
        mean_np = mean.numpy()
        actions_np = mean_np + noise.numpy() * std.numpy()
        return actions_np, self._numpy_gaussian_log_prob(actions_np, mean_np, two_variance, log_std)

    def _state_dependent_noise(self, latent_pi: th.Tensor) -> tuple[np.ndarray, th.Tensor]:
        distribution = self.policy.action_dist
        assert isinstance(distribution, StateDependentNoiseDistribution)
        mean = self._action_head(latent_pi)
        variance = self._terms_of_log_std()[0]
        std = th.sqrt(th.mm(latent_pi**2, variance) + distribution.epsilon)
        # gSDE draws no random numbers here: its noise comes from the exploration matrices sampled by reset_noise
        noise = distribution.get_noise(latent_pi)
        if not self._on_cpu:
            actions = mean + noise
            return actions.cpu().numpy(), self._gaussian_log_prob(actions, mean, std)
        mean_np, std_np = mean.numpy(), std.numpy()
        actions_np = mean_np + noise.numpy()
        return actions_np, self._numpy_gaussian_log_prob(actions_np, mean_np, 2 * (std_np * std_np), std.log().numpy())

    def _categorical_sample(self, logits: th.Tensor) -> tuple[np.ndarray, th.Tensor]:
        # torch's Categorical: normalized logits, one multinomial draw per row from their softmax
        log_pmf = logits - logits.logsumexp(dim=-1, keepdim=True)
        probs = F.softmax(log_pmf, dim=-1)
        if not (self._on_cpu and _multinomial_is_exponential_race(probs.device)):
            actions = th.multinomial(probs, 1, True).T.reshape(-1)
            return actions.cpu().numpy(), log_pmf.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        # what th.multinomial(probs, 1, True) computes, without its validity checks (each a synchronization)
        race = th.empty_like(probs).exponential_()
        actions_np = (probs.numpy() / race.numpy()).argmax(axis=-1)
        return actions_np, th.from_numpy(log_pmf.numpy()[np.arange(len(actions_np)), actions_np])

    def _categorical(self, latent_pi: th.Tensor) -> tuple[np.ndarray, th.Tensor]:
        logits = self._action_head(latent_pi)
        if self._masked_distribution:
            logits = _masked_logits(logits, None if self._masks is None else self._masks.reshape(logits.shape))
        return self._categorical_sample(logits)

    def _multi_categorical(self, latent_pi: th.Tensor) -> tuple[np.ndarray, th.Tensor]:
        logits = self._action_head(latent_pi)
        # SB3's MultiCategorical, or sb3-contrib's masked MultiCategorical or Bernoulli (pairs of outcomes)
        action_dims = list(self.policy.action_dist.action_dims)  # type: ignore[attr-defined]
        splits = th.split(logits, action_dims, dim=1)
        if self._masked_distribution:  # sb3-contrib masks each sub-space's categorical with its columns of the mask
            masks = (
                [None] * len(splits)
                if self._masks is None
                else th.split(self._masks.reshape(-1, logits.shape[1]), action_dims, dim=1)
            )
            splits = tuple(_masked_logits(split, mask) for split, mask in zip(splits, masks, strict=True))
        samples = [self._categorical_sample(split) for split in splits]
        actions = np.stack([action for action, _ in samples], axis=1)
        return actions, th.stack([log_prob for _, log_prob in samples], dim=1).sum(dim=1)

    def _bernoulli(self, latent_pi: th.Tensor) -> tuple[np.ndarray, th.Tensor]:
        logits = self._action_head(latent_pi)
        # NaN logits (non-finite observations or parameters) would make th.bernoulli raise its own error (a device-side
        # assertion on CUDA): a NaN probability draws as 0.5 instead, and its NaN log-probability stops the rollout
        # with the collection's own error; finite probabilities are unchanged
        actions = th.bernoulli(th.sigmoid(logits).nan_to_num_(0.5))
        log_prob = (-F.binary_cross_entropy_with_logits(logits, actions, reduction="none")).sum(dim=1)
        return actions.cpu().numpy(), log_prob
