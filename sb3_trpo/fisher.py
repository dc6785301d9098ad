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


def gather_valid_actions(
    valid: th.Tensor, probs: th.Tensor, real: th.Tensor | None = None
) -> tuple[th.Tensor, th.Tensor] | None:
    """Each state's valid actions, when a masked categorical leaves at most a quarter of its ``n`` actions valid in
    every (real) state, for a Fisher product that runs the policy's head over those actions only.

    ``M = diag(p) - ppᵀ`` is zero outside the valid actions (``p = 0`` there), so only their logits' tangents and
    cotangents matter: with ``k`` valid actions at most, the head's products cost ``N k`` rows instead of ``N n``
    (one of ``n = 20,000`` costs as much as the whole update otherwise, ``benchmarks/README.md``). A state with
    fewer valid actions is padded with invalid ones, whose ``p = 0`` makes them count for nothing.

    :param valid: which actions each state may take, ``(N, n)`` (bool)
    :param probs: the masked probabilities, ``(N, n)`` (0 at invalid actions)
    :param real: which states count (``None``: all); the others (padding of a batch of sequences, whose masks allow
        every action) neither decide ``k`` nor may be read by the product
    :return: the actions ``(N, k)`` and their masked probabilities ``(N, k)``, or ``None`` when the head's full
        products are as cheap
    """
    n_actions = valid.shape[1]
    counted = valid if real is None else valid & real.reshape(-1, 1)
    k = int(counted.sum(dim=1).max())
    if k == 0 or 4 * k > n_actions:
        return None
    # valid actions first (a stable sort keeps their order), then padding
    actions = th.argsort((~valid).to(th.int8), dim=1, stable=True)[:, :k]
    return actions, th.gather(probs, 1, actions)


def gathered_head_product(
    actions: th.Tensor,
    probs: th.Tensor,
    scale: float | th.Tensor,
    rows: th.Tensor,
    head_input: th.Tensor,
    input_tangent: th.Tensor | None,
    weight_tangent: th.Tensor,
    bias_tangent: th.Tensor,
    weight_out: th.Tensor,
    bias_out: th.Tensor,
) -> th.Tensor:
    """The part of ``Jᵀ M J v`` of a linear head ``z = W x + b`` of a masked categorical, on each state's valid
    actions only (see :func:`gather_valid_actions`): writes the head's block and returns the cotangent of its input.

    :param actions: each state's valid actions, ``(N, k)``
    :param probs: their masked probabilities, ``(N, k)`` (0 on the padding)
    :param scale: each state's weight in the mean KL, a number or ``(N, 1)`` (0: a state that does not count)
    :param rows: the head's weight rows of those actions at the old parameters, ``W[actions]``, ``(N, k, in)``
    :param head_input: the head's input ``x`` at the old parameters, ``(N, in)``
    :param input_tangent: ``x'``, the tangent of the head's input along ``v`` (``None``: ``x`` does not depend on θ)
    :param weight_tangent: ``W'``, the head weight's part of ``v``, ``(n, in)``
    :param bias_tangent: ``b'``, the head bias's part of ``v``, ``(n,)``
    :param weight_out: where the head weight's part of the product is written, ``(n, in)``
    :param bias_out: where the head bias's part is written, ``(n,)``
    :return: the cotangent of the head's input ``(N, in)``, before the layers below it
    """
    # the valid logits' tangents: b'[a] + W'[a]·x + W[a]·x'
    z_tangent = bias_tangent[actions] + th.bmm(weight_tangent[actions], head_input.unsqueeze(2)).squeeze(2)
    if input_tangent is not None:
        z_tangent = z_tangent + th.bmm(rows, input_tangent.unsqueeze(2)).squeeze(2)
    # M restricted to them (p = 0 on the padding), weighted; a state that does not count is selected away, not
    # multiplied by 0 (its input may be anything)
    cotangent = scale * probs * (z_tangent - (probs * z_tangent).sum(dim=1, keepdim=True))
    if isinstance(scale, th.Tensor):
        cotangent = th.where(scale > 0, cotangent, 0.0)
    flat_actions = actions.reshape(-1)
    weight_out.zero_()
    weight_out.index_add_(0, flat_actions, (cotangent.unsqueeze(2) * head_input.unsqueeze(1)).reshape(-1, head_input.shape[1]))
    bias_out.zero_()
    bias_out.index_add_(0, flat_actions, cotangent.reshape(-1))
    return th.bmm(cotangent.unsqueeze(1), rows).squeeze(1)


class GatheredHeadFisherProduct:
    """``v ↦ (Jᵀ M J + damping·I) v`` for a masked categorical with few valid actions whose logits are a linear head
    over a latent computed by any network (an LSTM's), weighted per state as :class:`JacobianFisherProduct`.

    ``J`` splits at the head's input ``x``: ``z = W x(θ_body) + b``. The body's ``x' = J_x v`` and ``J_xᵀ u`` go
    through autograd (reverse over reverse, on the graph of the gradient's forward pass), the head's products run
    over each state's valid actions only (:func:`gathered_head_product`): the action count enters only through the
    ``n``-row index-adds, not through ``N x n`` logits.

    :param theta: the flat actor parameters, a leaf tensor with ``requires_grad``
    :param head_input: the head's input ``x`` of the ``N`` states computed from ``theta``, graph kept
    :param weight: the head's weight at the old parameters, ``(n, in)``
    :param weight_slice: where it lies in the flat parameters (row-major)
    :param bias_slice: where the head's bias lies
    :param gathered: each state's valid actions and their masked probabilities (:func:`gather_valid_actions`)
    :param weights: each state's weight in the mean KL (0 for padding)
    :param damping: Tikhonov damping added to ``F``
    """

    def __init__(
        self,
        theta: th.Tensor,
        head_input: th.Tensor,
        weight: th.Tensor,
        weight_slice: slice,
        bias_slice: slice,
        gathered: tuple[th.Tensor, th.Tensor],
        weights: th.Tensor,
        damping: float = 0.0,
    ) -> None:
        self._theta, self._input = theta, head_input
        self._at = head_input.detach()
        self._weight, self._weight_slice, self._bias_slice = weight.detach(), weight_slice, bias_slice
        self._actions, self._probs = gathered
        self._rows = self._weight[self._actions]
        self._scale = (weights / weights.sum()).reshape(-1, 1)
        self._damping = damping
        self._depends = head_input.requires_grad  # an input with no history (no body parameter in the actor)
        if self._depends:
            self._probe = th.zeros_like(head_input, requires_grad=True)
            (self._transpose,) = th.autograd.grad(head_input, theta, self._probe, create_graph=True)

    def __call__(self, vector: th.Tensor) -> th.Tensor:
        input_tangent = None
        if self._depends:  # x' = J_x v, reverse over reverse (see JacobianFisherProduct)
            (input_tangent,) = th.autograd.grad(self._transpose, self._probe, vector, retain_graph=True)
        result = th.zeros_like(vector)
        input_cotangent = gathered_head_product(
            self._actions,
            self._probs,
            self._scale,
            self._rows,
            self._at,
            input_tangent,
            vector[self._weight_slice].view_as(self._weight),
            vector[self._bias_slice],
            result[self._weight_slice].view_as(self._weight),
            result[self._bias_slice],
        )
        if self._depends:
            (body,) = th.autograd.grad(self._input, self._theta, input_cotangent, retain_graph=True)
            # the body's block (the head's slices of J_xᵀ u are 0: x does not depend on W and b)
            result = result + body
        return result + self._damping * vector if self._damping else result


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
        """The head's rows of each state's valid actions (:func:`gather_valid_actions`), for a single masked
        categorical whose head is the last layer.

        :return: the actions ``(N, k)``, their masked probabilities ``(N, k)``, the head's weight rows ``(N, k, in)``
        """
        if len(self._probs) != 1 or self._layers[-1].derivative is not None:
            return None
        gathered = gather_valid_actions(valid, self._probs[0])
        if gathered is None:
            return None
        actions, probs = gathered
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
        """The head's part of ``Jᵀ M J v`` on each state's valid actions only (:func:`gathered_head_product`):
        writes the head's block of ``result`` and returns the cotangent of the layer below the head.

        :param vector: ``v``
        :param tangent: the tangent of the head's input (0 for an actor without hidden layers)
        :param result: the product being written
        """
        assert self._gathered is not None
        actions, probs, rows = self._gathered
        head = self._layers[-1]
        cotangent = gathered_head_product(
            actions,
            probs,
            self._scale,
            rows,
            self._inputs[-1],
            tangent if len(self._layers) > 1 else None,
            vector[head.weight_slice].view_as(head.weight),
            vector[head.bias_slice],
            result[head.weight_slice].view_as(head.weight),
            result[head.bias_slice],
        )
        if len(self._layers) == 1:
            return cotangent.new_zeros(())
        derivative = self._derivatives[-2]
        assert derivative is not None
        return cotangent.mul_(derivative)
