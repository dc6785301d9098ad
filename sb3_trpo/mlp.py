"""SB3's MLP building blocks as plain tensor ops, shared by the fast paths of the critic step and of the
Fisher-vector product.

An elementwise activation ``h = f(z)`` has a diagonal Jacobian, so the same op gives its vector-Jacobian and its
Jacobian-vector product. Each entry is the backward op autograd itself runs for that module, written in terms of
the activation's *output* ``h`` (which the fast paths keep from their forward pass).
"""

from collections.abc import Callable

import torch as th
from torch import nn

ActivationDerivative = Callable[[nn.Module, th.Tensor, th.Tensor], th.Tensor]

#: ``(module, its output h, a vector u) -> f'(z) ⊙ u``, for the activation classes the fast paths cover
ACTIVATION_DERIVATIVES: dict[type[nn.Module], ActivationDerivative] = {
    nn.Tanh: lambda module, h, u: th.ops.aten.tanh_backward(u, h),
    nn.ReLU: lambda module, h, u: th.ops.aten.threshold_backward(u, h, 0),
    nn.LeakyReLU: lambda module, h, u: th.ops.aten.leaky_relu_backward(u, h, module.negative_slope, True),
    nn.ELU: lambda module, h, u: th.ops.aten.elu_backward(u, module.alpha, 1, 1, True, h),
}


def methods_replaced_on_instances(module: nn.Module) -> list[str]:
    """The methods that ``module`` or one of its submodules replaces on the instance (``policy.forward = ...``).

    The fast paths repeat what the classes' methods compute, so they check the classes; a method assigned to an
    instance shadows its class's, and only this finds it.

    :return: ``"submodule.method"`` names (``"method"`` for ``module`` itself), empty for ordinary modules
    """
    return [
        f"{name}.{attribute}" if name else attribute
        for name, submodule in module.named_modules()
        for attribute, value in vars(submodule).items()
        if callable(value) and callable(getattr(type(submodule), attribute, None))
    ]


def derivative_from_output(module: nn.Module) -> bool:
    """:return: whether ``module`` is a covered activation whose derivative its output tells: a LeakyReLU with a
    negative slope (or an ELU with a negative alpha) gives positive outputs on both sides of 0, so ``h`` no longer
    tells where ``z`` was, and torch's backward from the output refuses it; the fast paths leave those to autograd"""
    if type(module) not in ACTIVATION_DERIVATIVES:
        return False
    if isinstance(module, nn.LeakyReLU):
        return module.negative_slope >= 0
    if isinstance(module, nn.ELU):
        return module.alpha >= 0
    return True


def linear_layers(modules: list[nn.Module]) -> list[tuple[nn.Linear, nn.Module | None]] | None:
    """Group a flat stack of modules into ``(linear layer, the activation after it or None)``.

    :param modules: e.g. an ``MlpExtractor`` branch followed by a head
    :return: the groups, or ``None`` if the stack holds anything but biased ``nn.Linear`` layers each followed by
        at most one covered activation (see :func:`derivative_from_output`), or if a module has forward hooks or its
        own ``forward`` on the instance
    """
    layers: list[tuple[nn.Linear, nn.Module | None]] = []
    for module in modules:
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or "forward" in vars(module):
            return None
        if type(module) is nn.Linear and module.bias is not None:
            layers.append((module, None))
        elif derivative_from_output(module) and layers and layers[-1][1] is None:
            layers[-1] = (layers[-1][0], module)
        else:
            return None
    return layers
