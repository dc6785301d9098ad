"""Fisher-vector products: ``v ↦ F v`` with ``F`` the Hessian of the mean KL at the old parameters.

At ``θ = θ_old`` the KL between the old and the new policy has value 0 and gradient 0; its Hessian is the
Fisher information matrix of the policy (TRPO paper, Appendix C.1). TRPO never forms ``F``: conjugate
gradient only needs products ``F v``.
"""

from collections.abc import Callable

import torch as th

from sb3_trpo.distributions import DistributionParams, kl_divergence

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
