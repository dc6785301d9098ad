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

import torch as th

from sb3_trpo.distributions import DistributionParams, fisher_metric_product, kl_divergence

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
    """

    def __init__(
        self,
        theta: th.Tensor,
        params: DistributionParams,
        damping: float = 0.0,
        jvp: Callable[[th.Tensor], tuple[th.Tensor, ...]] | None = None,
    ) -> None:
        self._theta = theta
        self._at = params.detach()
        self._scale = 1.0 / params.tensors[0].shape[0]  # F is the Hessian of the *mean* KL over states
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
        return self.vjp(tuple(self._scale * t for t in metric_jv)) + self._damping * vector
