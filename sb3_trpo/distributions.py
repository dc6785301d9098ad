"""Action distributions seen as tensors: the parameters that define them and the KL between two of them.

TRPO constrains the KL divergence between the old and the new policy. SB3's distribution objects are
stateful (``policy.get_distribution`` returns the *same* object on every call), so the update works on
the tensors that define a distribution instead: logits for the discrete families, mean and standard
deviation for the Gaussian ones. Those tensors are taken once from SB3's object, right after the forward
pass, and everything below is a pure function of them.

The KL of one state is the KL of its whole action distribution: the action dimensions are independent,
so their KLs **add up**. Averaging over the dimensions (as ``sb3_contrib.TRPO`` does for Box actions)
would divide the constraint by the action dimension and loosen the trust region by that factor.
"""

from collections.abc import Callable
from enum import Enum
from typing import NamedTuple

import torch as th
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    Distribution,
    MultiCategoricalDistribution,
    StateDependentNoiseDistribution,
)
from torch.nn import functional as F


class Family(Enum):
    """The kind of action distribution, which fixes how its parameters are read and compared."""

    #: one or more independent categoricals (Discrete, MultiDiscrete): one logits tensor per sub-space
    CATEGORICAL = "categorical"
    #: independent Bernoullis (MultiBinary): one logits tensor
    BERNOULLI = "bernoulli"
    #: diagonal Gaussian (Box, also gSDE and tanh-squashed): mean and standard deviation
    GAUSSIAN = "gaussian"


class DistributionParams(NamedTuple):
    """The tensors that define a batch of action distributions, one row per state.

    :param family: the distribution family
    :param tensors: for ``CATEGORICAL`` the normalized logits of each sub-space, for ``BERNOULLI`` the logits,
        for ``GAUSSIAN`` the mean and the standard deviation (both of shape ``(batch, action_dim)``)
    """

    family: Family
    tensors: tuple[th.Tensor, ...]

    def detach(self) -> "DistributionParams":
        """:return: the same parameters, cut from the autograd graph"""
        return DistributionParams(self.family, tuple(t.detach() for t in self.tensors))

    def select(self, idx: slice | th.Tensor) -> "DistributionParams":
        """:return: the parameters of the states selected by ``idx`` (along the batch dimension)"""
        return DistributionParams(self.family, tuple(t[idx] for t in self.tensors))


SUPPORTED_DISTRIBUTIONS = (
    CategoricalDistribution,
    MultiCategoricalDistribution,
    BernoulliDistribution,
    DiagGaussianDistribution,
    StateDependentNoiseDistribution,
)


#: readers of distribution classes outside SB3 (e.g. sb3-contrib's maskable ones), added by the modules that use them
_EXTRA_READERS: dict[type[Distribution], Callable[[Distribution], DistributionParams]] = {}


def register_distribution(cls: type[Distribution], reader: Callable[[Distribution], DistributionParams]) -> None:
    """Teach :func:`distribution_params` a distribution class that is not one of SB3's (exact type).

    :param cls: the distribution class
    :param reader: ``distribution -> DistributionParams`` for instances of ``cls``
    """
    _EXTRA_READERS[cls] = reader


def distribution_params(distribution: Distribution) -> DistributionParams:
    """Read the defining tensors out of an SB3 distribution (after ``proba_distribution`` was called).

    Gradients flow through the returned tensors to whatever produced them.

    :param distribution: an SB3 action distribution (or one registered with :func:`register_distribution`)
    :return: its parameters
    """
    reader = _EXTRA_READERS.get(type(distribution))
    if reader is not None:
        return reader(distribution)
    # Squashed Gaussians and gSDE are Gaussians underneath: tanh is a bijection, so the KL of the squashed
    # distributions equals the KL of the Gaussians before the squashing.
    if isinstance(distribution, (DiagGaussianDistribution, StateDependentNoiseDistribution)):
        normal = distribution.distribution
        # DiagGaussian's scale broadcasts a (action_dim,) std to the batch: make it a real (batch, dim) tensor
        return DistributionParams(Family.GAUSSIAN, (normal.loc, normal.scale.expand_as(normal.loc)))
    if isinstance(distribution, CategoricalDistribution):
        return DistributionParams(Family.CATEGORICAL, (distribution.distribution.logits,))
    if isinstance(distribution, MultiCategoricalDistribution):
        return DistributionParams(Family.CATEGORICAL, tuple(d.logits for d in distribution.distribution))
    if isinstance(distribution, BernoulliDistribution):
        return DistributionParams(Family.BERNOULLI, (distribution.distribution.logits,))
    classes: list[type[Distribution]] = [*SUPPORTED_DISTRIBUTIONS, *_EXTRA_READERS]
    allowed = ", ".join(cls.__name__ for cls in classes)
    raise TypeError(f"TRPO cannot constrain a {type(distribution).__name__}: the policy must produce one of {allowed}.")


def kl_divergence(old: DistributionParams, new: DistributionParams) -> th.Tensor:
    """KL(old || new) of each state, summed over the independent action dimensions.

    :param old: parameters of the reference (old) distributions
    :param new: parameters of the new distributions, same family and shapes
    :return: shape ``(batch,)``
    """
    if old.family is not new.family:
        raise ValueError(f"Cannot compare a {old.family.value} distribution with a {new.family.value} one.")
    if old.family is Family.CATEGORICAL:
        kl = th.zeros_like(old.tensors[0][:, 0])
        for old_logits, new_logits in zip(old.tensors, new.tensors, strict=True):
            old_log_p = F.log_softmax(old_logits, dim=-1)
            kl = kl + (old_log_p.exp() * (old_log_p - F.log_softmax(new_logits, dim=-1))).sum(dim=-1)
        return kl
    if old.family is Family.BERNOULLI:
        (a,), (b,) = old.tensors, new.tensors
        p = th.sigmoid(a)
        # log(1 - sigmoid(x)) = logsigmoid(-x), stable for large |x|
        per_dim = p * (F.logsigmoid(a) - F.logsigmoid(b)) + (1 - p) * (F.logsigmoid(-a) - F.logsigmoid(-b))
        return per_dim.sum(dim=-1)
    (old_mean, old_std), (new_mean, new_std) = old.tensors, new.tensors
    var_ratio = (old_std / new_std) ** 2
    per_dim = 0.5 * (var_ratio + ((old_mean - new_mean) / new_std) ** 2 - 1.0) - 0.5 * th.log(var_ratio)
    return per_dim.sum(dim=-1)


def fisher_metric_product(params: DistributionParams, tangents: tuple[th.Tensor, ...]) -> tuple[th.Tensor, ...]:
    """``M u`` per state: the Hessian of ``KL(params || ·)`` at ``params`` (the Fisher information of the
    distribution in these coordinates) applied to a tangent ``u`` of the parameters.

    - categorical logits ``z`` with probabilities ``p``: ``M = diag(p) - p pᵀ`` (the Hessian of logsumexp);
    - Bernoulli logits ``a``: ``M = σ(a)(1 - σ(a))``;
    - Gaussian mean ``μ`` and standard deviation ``σ``: ``M = diag(1/σ², 2/σ²)``, no cross term.

    :param params: the distributions at which the metric is taken
    :param tangents: one tensor per tensor of ``params``, same shapes
    :return: ``M u``, same shapes as ``tangents``
    """
    if params.family is Family.CATEGORICAL:
        products = []
        for logits, u in zip(params.tensors, tangents, strict=True):
            p = F.softmax(logits, dim=-1)
            products.append(p * (u - (p * u).sum(dim=-1, keepdim=True)))
        return tuple(products)
    if params.family is Family.BERNOULLI:
        (logits,), (u,) = params.tensors, tangents
        s = th.sigmoid(logits)
        return (s * (1 - s) * u,)
    (_, std), (u_mean, u_std) = params.tensors, tangents
    inv_var = std.pow(-2)
    return (inv_var * u_mean, 2.0 * inv_var * u_std)
