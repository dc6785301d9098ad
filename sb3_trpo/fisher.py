"""Fisher-vector products: ``v ↦ F v`` with ``F`` the Hessian of the mean KL at the old parameters.

At ``θ = θ_old`` the KL between the old and the new policy has value 0 and gradient 0; its Hessian is the
Fisher information matrix of the policy (TRPO paper, Appendix C.1). TRPO never forms ``F``: conjugate
gradient only needs products ``F v``.

Two ways to compute them:

- :class:`JacobianFisherProduct`, the one TRPO uses: the chain rule gives ``F = (1/N) Jᵀ M J``, with ``J`` the
  Jacobian of the distribution parameters (logits, or mean and std) w.r.t. ``θ`` and ``M`` the Fisher matrix of
  the distribution itself, known in closed form (:func:`~sb3_trpo.distributions.fisher_metric_product`). One
  product is a Jacobian-vector product, an elementwise ``M``, and one vector-Jacobian product through the graph
  of the forward pass the surrogate gradient already made: no new forward pass.
- :func:`kl_hessian_vector_product`, the reference: double back-propagation through the mean KL. About twice as
  slow (``benchmarks/README.md``), kept to check the fast path against (``tests/test_fisher.py``).
"""

from collections.abc import Callable
from typing import NamedTuple

import torch as th
from torch import nn
from torch.nn import functional as F

from sb3_trpo.distributions import DistributionParams, Family, fisher_metric_product, kl_divergence
from sb3_trpo.mlp import ActivationDerivative

FisherProduct = Callable[[th.Tensor], th.Tensor]


def kl_hessian_vector_product(
    kl_at: Callable[[th.Tensor], th.Tensor],
    theta: th.Tensor,
    damping: float = 0.0,
) -> FisherProduct:
    """``v ↦ (∇²KL(θ) + damping·I) v`` by double back-propagation ("Pearlmutter trick").

    The gradient of the KL is built once with its graph; each product is then one backward pass of
    ``∇KL · v``.

    :param kl_at: ``θ ↦`` mean KL(old || π_θ) as a scalar, differentiable in ``θ``
    :param theta: the point (the old parameters), a flat vector
    :param damping: Tikhonov damping added to the Hessian (keeps it positive definite for CG)
    :return: the product function
    """
    theta = theta.detach().requires_grad_(True)
    (grad_kl,) = th.autograd.grad(kl_at(theta), theta, create_graph=True)

    def product(vector: th.Tensor) -> th.Tensor:
        (hessian_vector,) = th.autograd.grad(grad_kl @ vector, theta, retain_graph=True)
        return hessian_vector + damping * vector

    return product


def mean_kl_from(
    old: DistributionParams, new_at: Callable[[th.Tensor], DistributionParams]
) -> Callable[[th.Tensor], th.Tensor]:
    """``θ ↦`` mean over states of KL(old || new(θ)), each state's KL summed over action dimensions.

    :param old: the old distributions (detached)
    :param new_at: ``θ ↦`` parameters of the new distributions
    """
    return lambda theta: kl_divergence(old, new_at(theta)).mean()


class JacobianFisherProduct:
    """``v ↦ ((1/N) Jᵀ M J + damping·I) v`` on the graph of one forward pass.

    ``J v`` is computed in reverse mode twice over ("reverse-over-reverse"): ``u ↦ Jᵀu`` is linear in ``u``, so
    differentiating it w.r.t. ``u`` in the direction ``v`` gives ``J v``. Unlike forward mode
    (``torch.func.jvp``), this reuses the stored forward pass instead of recomputing it, which measures about
    2-3x faster here (``benchmarks/update_speed.py --fisher``).

    :param theta: the flat actor parameters, a leaf tensor with ``requires_grad``
    :param params: the distribution parameters of ``N`` states computed from ``theta``, graph kept
    :param damping: Tikhonov damping added to ``F`` (keeps it positive definite for CG)
    :param jvp: optional replacement for the ``J v`` computation (e.g. forward mode), for comparisons
    :param weights: weight of each state in the mean KL (``None``: the plain mean), e.g. 0 for the padding rows
        of a batch of sequences
    """

    def __init__(
        self,
        theta: th.Tensor,
        params: DistributionParams,
        damping: float = 0.0,
        jvp: Callable[[th.Tensor], tuple[th.Tensor, ...]] | None = None,
        weights: th.Tensor | None = None,
    ) -> None:
        self._theta = theta
        self._at = params.detach()
        # F is the Hessian of the *mean* KL over states (weighted: Σ w_i KL_i / Σ w_i)
        self._scale: float | th.Tensor = (
            1.0 / params.tensors[0].shape[0] if weights is None else (weights / weights.sum()).reshape(-1, 1)
        )
        # rows of weight 0 are selected away, not multiplied by 0: a padded row's M J v may not be finite
        self._rows = None if weights is None else (weights > 0).reshape(-1, 1)
        self._damping = damping
        # A distribution tensor with no autograd history (a frozen log_std, a frozen mean head) does not depend on θ:
        # its block of J is zero, so it contributes nothing to Jᵀ M J (M has no cross term between the tensors of a
        # Gaussian, and the categorical families have one tensor per sub-space). Only the others enter the graph.
        self._dependent = tuple(i for i, t in enumerate(params.tensors) if t.requires_grad)
        self._outputs = tuple(params.tensors[i] for i in self._dependent)
        self._zeros = tuple(th.zeros_like(t) for t in self._at.tensors)
        self._probes = tuple(th.zeros_like(t, requires_grad=True) for t in self._outputs)
        if self._outputs:
            (self._transpose,) = th.autograd.grad(self._outputs, theta, self._probes, create_graph=True)
        self.jvp = jvp if jvp is not None else self._reverse_jvp

    def _reverse_jvp(self, vector: th.Tensor) -> tuple[th.Tensor, ...]:
        tangents = list(self._zeros)
        if self._outputs:
            grads = th.autograd.grad(self._transpose, self._probes, vector, retain_graph=True, allow_unused=True)
            for i, grad in zip(self._dependent, grads, strict=True):
                if grad is not None:
                    tangents[i] = grad
        return tuple(tangents)

    def vjp(self, cotangents: tuple[th.Tensor, ...]) -> th.Tensor:
        """:return: ``Jᵀ u`` for cotangents ``u`` shaped like the distribution parameters"""
        if not self._outputs:
            return th.zeros_like(self._theta)
        (product,) = th.autograd.grad(
            self._outputs, self._theta, tuple(cotangents[i] for i in self._dependent), retain_graph=True
        )
        return product

    def __call__(self, vector: th.Tensor) -> th.Tensor:
        metric_jv = fisher_metric_product(self._at, self.jvp(vector))
        scaled = tuple(self._scale * t for t in metric_jv)
        if self._rows is not None:
            scaled = tuple(th.where(self._rows, t, 0.0) for t in scaled)
        return self.vjp(scaled) + self._damping * vector


class MlpLayer(NamedTuple):
    """One layer of an MLP actor, as :class:`MlpFisherProduct` needs it.

    :param weight: the weight at the old parameters, ``(out, in)``
    :param weight_slice: where the weight lies in the flat actor parameters (row-major)
    :param bias_slice: where the bias lies
    :param derivative: ``(output h, u) -> f'(z) ⊙ u`` of the activation after the layer (``None`` for the head)
    :param activation: the activation module (passed to ``derivative``)
    """

    weight: th.Tensor
    weight_slice: slice
    bias_slice: slice
    derivative: ActivationDerivative | None
    activation: nn.Module | None


class MlpFisherProduct:
    """``v ↦ ((1/N) Jᵀ M J + damping·I) v`` for an MLP actor, with ``J v`` and ``Jᵀ u`` written out.

    The same product as :class:`JacobianFisherProduct`, for SB3's MLP actor (linear layers with elementwise
    activations, a linear head, and for a Gaussian a state-independent ``log_std``): ``J v`` is the forward-mode
    chain rule through the layers (two matrix products per layer), ``Jᵀ u`` back-propagation (two more), both on
    the activations of one forward pass kept from the start. That skips autograd's double graph, which costs
    several times the few products a Fisher-vector product needs.

    :param features: the actor's input features of the ``N`` states, ``(N, in)``
    :param layers: the layers, the head last
    :param hidden: the output of every hidden layer at the old parameters (after its activation), in order
    :param params: the distribution parameters at the old parameters (their family decides ``M``)
    :param log_std_slice: where a Gaussian's trainable ``log_std`` lies in the flat parameters (``None``: frozen,
        or not Gaussian)
    :param split: sizes of the categorical sub-spaces along the head's output (MultiDiscrete), else ``[-1]``
    :param size: length of the flat actor parameter vector
    :param damping: Tikhonov damping added to ``F``
    :param valid: for masked categoricals, which actions each state may take, ``(N, sum of the sub-space sizes)``
        (``None``: all of them)
    """

    def __init__(
        self,
        features: th.Tensor,
        layers: list[MlpLayer],
        hidden: list[th.Tensor],
        params: DistributionParams,
        log_std_slice: slice | None,
        split: list[int],
        size: int,
        damping: float = 0.0,
        valid: th.Tensor | None = None,
    ) -> None:
        self._inputs = [features, *hidden]  # the input of every layer
        self._layers = layers
        self._params = params.detach()
        self._log_std_slice = log_std_slice
        self._split = split
        self._size = size
        self._damping = damping
        self._scale = 1.0 / features.shape[0]
        # for a masked categorical with few valid actions per state: the head's rows of those actions (see below)
        self._gathered: tuple[th.Tensor, th.Tensor, th.Tensor] | None = None
        # f'(z) of every hidden layer at the old parameters, once: each product then multiplies by it (twice)
        self._derivatives: list[th.Tensor | None] = [None] * len(layers)
        for i, h in enumerate(hidden):
            derivative, activation = layers[i].derivative, layers[i].activation
            assert derivative is not None, "every hidden layer has an activation"
            assert activation is not None
            self._derivatives[i] = derivative(activation, h, th.ones_like(h))
        if params.family is Family.GAUSSIAN:
            self._inv_var = self._params.tensors[1].pow(-2)
        elif params.family is Family.CATEGORICAL:
            self._probs = [F.softmax(logits, dim=-1) for logits in self._params.tensors]
            if valid is not None:
                # The head's tangent is that of the *raw* logits, but a masked logit is a constant (-1e8): its row
                # of the true J is zero. With a valid action left in the sub-space the masked p is 0, so M's row and
                # column there are zero anyway; with none left, sb3-contrib's distribution is uniform (p = 1/n),
                # constant in θ, and its block of Jᵀ M J must vanish. p ⊙ mask gives both: M = diag(p) − ppᵀ on
                # the valid actions, 0 on a fully masked sub-space.
                masks = th.split(valid.to(self._probs[0].dtype), [p.shape[1] for p in self._probs], dim=1)
                self._probs = [p * mask for p, mask in zip(self._probs, masks, strict=True)]
                self._gathered = self._gather_valid_actions(valid)
        else:
            sigmoid = th.sigmoid(self._params.tensors[0])
            self._bernoulli_metric = sigmoid * (1 - sigmoid)

    def _gather_valid_actions(self, valid: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor] | None:
        """The head's rows of each state's valid actions, when a single masked categorical leaves at most a quarter of
        its ``n`` actions valid in every state (``None`` otherwise).

        ``M = diag(p) - ppᵀ`` is zero outside the valid actions (``p = 0`` there), so only their logits' tangents and
        cotangents matter: with ``k`` valid actions at most, the head's products cost ``N k`` rows instead of ``N n``
        (one of ``n = 20,000`` costs as much as the whole update otherwise, ``benchmarks/README.md``). A state with
        fewer valid actions is padded with invalid ones, whose ``p = 0`` makes them count for nothing.

        :return: the actions ``(N, k)``, their masked probabilities ``(N, k)``, the head's weight rows ``(N, k, in)``
        """
        if len(self._probs) != 1 or self._layers[-1].derivative is not None:
            return None
        n_actions = valid.shape[1]
        k = int(valid.sum(dim=1).max())
        if k == 0 or 4 * k > n_actions:
            return None
        # valid actions first (a stable sort keeps their order), then padding
        actions = th.argsort((~valid).to(th.int8), dim=1, stable=True)[:, :k]
        probs = th.gather(self._probs[0], 1, actions)
        return actions, probs, self._layers[-1].weight[actions]

    def _metric(self, head_tangent: th.Tensor) -> th.Tensor:
        """``(1/N) M`` applied to the head's output tangent (the mean, or the logits)."""
        family = self._params.family
        if family is Family.GAUSSIAN:
            return (self._scale * self._inv_var) * head_tangent
        if family is Family.BERNOULLI:
            return (self._scale * self._bernoulli_metric) * head_tangent
        # M = diag(p) − p pᵀ per sub-space; it annihilates constant shifts, so raw logits serve as well as
        # normalized ones
        parts = th.split(head_tangent, self._split, dim=1) if len(self._split) > 1 else (head_tangent,)
        products = [p * (u - (p * u).sum(dim=-1, keepdim=True)) for p, u in zip(self._probs, parts, strict=True)]
        return self._scale * (products[0] if len(products) == 1 else th.cat(products, dim=1))

    def __call__(self, vector: th.Tensor) -> th.Tensor:
        layers, inputs = self._layers, self._inputs
        result = th.empty(self._size, dtype=vector.dtype, device=vector.device)
        # J v: the tangent of every layer's output, layer by layer (forward mode)
        tangent = vector.new_zeros(())
        hidden_layers = len(layers) - 1 if self._gathered is not None else len(layers)
        for i in range(hidden_layers):
            layer = layers[i]
            z_tangent = th.addmm(vector[layer.bias_slice], inputs[i], vector[layer.weight_slice].view_as(layer.weight).T)
            if i > 0:
                z_tangent = z_tangent.addmm_(tangent, layer.weight.T)
            derivative = self._derivatives[i]
            tangent = z_tangent if derivative is None else z_tangent.mul_(derivative)
        if self._gathered is None:
            # Jᵀ (M J v / N): back-propagation of the head's cotangent
            cotangent = self._metric(tangent)
            first = len(layers) - 1
        else:
            cotangent = self._gathered_head(vector, tangent, result)
            first = len(layers) - 2
        for i in range(first, -1, -1):
            layer = layers[i]
            th.mm(cotangent.T, inputs[i], out=result[layer.weight_slice].view_as(layer.weight))
            th.sum(cotangent, dim=0, out=result[layer.bias_slice])
            if i > 0:
                derivative = self._derivatives[i - 1]
                assert derivative is not None
                cotangent = cotangent.mm(layer.weight).mul_(derivative)
        if self._log_std_slice is not None:
            # std = exp(log_std), the same for every state: the block of F is (1/N) Σ σ · (2/σ²) · σ = 2 I
            result[self._log_std_slice] = 2.0 * vector[self._log_std_slice]
        return result + self._damping * vector if self._damping else result

    def _gathered_head(self, vector: th.Tensor, tangent: th.Tensor, result: th.Tensor) -> th.Tensor:
        """The head's part of ``Jᵀ M J v`` on each state's valid actions only (see :meth:`_gather_valid_actions`):
        writes the head's block of ``result`` and returns the cotangent of the head's input.

        :param vector: ``v``
        :param tangent: the tangent of the head's input (0 for an actor without hidden layers)
        :param result: the product being written
        """
        assert self._gathered is not None
        actions, probs, rows = self._gathered
        head, features = self._layers[-1], self._inputs[-1]
        weight_tangent = vector[head.weight_slice].view_as(head.weight)
        # the valid logits' tangents: b'[a] + w'[a]·x + w[a]·x'
        z_tangent = vector[head.bias_slice][actions] + th.bmm(weight_tangent[actions], features.unsqueeze(2)).squeeze(2)
        if len(self._layers) > 1:
            z_tangent = z_tangent + th.bmm(rows, tangent.unsqueeze(2)).squeeze(2)
        # (1/N) M restricted to them (p = 0 on the padding)
        cotangent = self._scale * probs * (z_tangent - (probs * z_tangent).sum(dim=1, keepdim=True))
        flat_actions = actions.reshape(-1)
        weight_grad = result[head.weight_slice].view_as(head.weight)
        weight_grad.zero_()
        weight_grad.index_add_(
            0, flat_actions, (cotangent.unsqueeze(2) * features.unsqueeze(1)).reshape(-1, features.shape[1])
        )
        bias_grad = result[head.bias_slice]
        bias_grad.zero_()
        bias_grad.index_add_(0, flat_actions, cotangent.reshape(-1))
        if len(self._layers) == 1:
            return cotangent.new_zeros(())
        derivative = self._derivatives[-2]
        assert derivative is not None
        return th.bmm(cotangent.unsqueeze(1), rows).squeeze(1).mul_(derivative)
