"""The critic step: minibatch regression of the value function on the returns, its undo snapshot, the inputs
it regresses from, and the choice of Adam kernel for the critic's optimizer.

Knows nothing of the actor beyond which parameters belong to it (those never move here) and nothing of the
trust region.
"""

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.torch_layers import MlpExtractor
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn
from torch.nn import functional as F

from sb3_trpo.distributed import Replica
from sb3_trpo.mlp import ACTIVATION_DERIVATIVES, linear_layers, methods_replaced_on_instances
from sb3_trpo.observations import index_obs

#: device types on which ``torch.optim.Adam(fused=True)`` runs (the critic's default optimizer uses it there)
FUSED_ADAM_DEVICES = ("cpu", "cuda")


def critic_parameters(policy: th.nn.Module, actor_ids: set[int]) -> list[th.nn.Parameter]:
    """The trainable parameters outside the actor: what the critic step may move.

    A feature extractor shared with the actor is inside the trust region, and a critic step on it would change
    the policy unchecked.

    :param policy: the actor-critic policy
    :param actor_ids: ``id`` of every actor parameter
    :raises ValueError: if the critic has no parameters of its own
    """
    params = [p for p in policy.parameters() if p.requires_grad and id(p) not in actor_ids]
    if not params:
        raise ValueError(
            "The policy's value function has no parameters of its own (all are shared with the actor): "
            "set n_critic_updates=0, or give the critic its own layers."
        )
    return params


def value_inputs(
    policy: ActorCriticPolicy, obs: PyTorchObs, actor_ids: set[int]
) -> tuple[PyTorchObs, Callable[[PyTorchObs], th.Tensor]]:
    """What the critic step regresses from, and how values are computed from a minibatch of it.

    When the critic's feature extractor is frozen during the critic step (it belongs to the actor, or has no
    trainable parameters) and the policy computes values the standard way, the features are extracted once
    for the whole rollout instead of once per minibatch and epoch (for a CNN, most of the critic's cost).
    Otherwise the inputs are the observations and the values come from ``policy.predict_values``.

    :param policy: the actor-critic policy
    :param obs: the rollout's observations
    :param actor_ids: ``id`` of every actor parameter
    :return: the inputs, and ``minibatch of inputs -> flat value predictions``
    """
    if critic_features_frozen(policy, actor_ids) and _standard_values(policy):
        with th.no_grad():
            # the same computation as ActorCriticPolicy.predict_values, split at the frozen features
            features = BasePolicy.extract_features(policy, obs, policy.vf_features_extractor)
        return features, lambda x: policy.value_net(policy.mlp_extractor.forward_critic(x)).flatten()
    return obs, lambda x: policy.predict_values(x).flatten()


def regress_values(
    params: Sequence[th.nn.Parameter],
    optimizer: th.optim.Optimizer,
    inputs: PyTorchObs,
    returns: th.Tensor,
    predict_values: Callable[[PyTorchObs], th.Tensor],
    n_epochs: int,
    batch_size: int,
    replica: Replica,
    orders: Sequence[th.Tensor] | None = None,
) -> float:
    """``n_epochs`` epochs of minibatch MSE regression of the values on the returns, moving only ``params``.

    The minibatches are shuffled once per epoch, then taken as contiguous slices (views, no copies). In
    data-parallel training each step uses the mean over ranks of the minibatch gradients, so every rank takes
    the same optimizer step.

    :param params: the critic's parameters (the optimizer's other parameters keep ``grad=None`` and stay put)
    :param optimizer: the optimizer over them
    :param inputs: what ``predict_values`` takes (observations, or precomputed features)
    :param returns: the regression targets, one per state
    :param predict_values: ``minibatch of inputs -> flat values``
    :param n_epochs: passes over the rollout
    :param batch_size: minibatch size (the last minibatch of an epoch may be smaller)
    :param replica: this process's data-parallel context
    :param orders: the order of the samples in each epoch (default: a random permutation drawn at each epoch)
    :return: the mean over all minibatches (and ranks) of each minibatch's loss before its step
    """
    # the actor's gradients stay None for the whole step, so the optimizer leaves the actor alone
    optimizer.zero_grad(set_to_none=True)
    n_samples = len(returns)
    losses = []
    for epoch in range(n_epochs):
        permutation = th.randperm(n_samples, device=returns.device) if orders is None else orders[epoch]
        epoch_inputs, epoch_returns = index_obs(inputs, permutation), returns[permutation]
        for start in range(0, n_samples, batch_size):
            minibatch = slice(start, start + batch_size)
            loss = F.mse_loss(epoch_returns[minibatch], predict_values(index_obs(epoch_inputs, minibatch)))
            grads: Sequence[th.Tensor | None] = th.autograd.grad(loss, params, allow_unused=True)
            if replica.is_distributed:
                grads = replica.mean_of_tensors(grads, list(params))
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad
            optimizer.step()
            losses.append(loss.detach())  # no .item() per minibatch: one synchronization at the end
    return replica.mean_of_floats([th.stack(losses).mean().item()], returns.device)[0]


class GatheredCriticData(NamedTuple):
    """The critic's regression data of all ranks, in the order that makes one process's regression on it the
    data-parallel regression (see :func:`gather_critic_data`).

    :param inputs: every rank's inputs, concatenated in rank order
    :param returns: every rank's returns, likewise
    :param orders: for each epoch, the order of the samples: minibatch ``k`` of ``world_size * batch_size`` samples
        is the union of every rank's minibatch ``k``
    :param batch_size: the global minibatch size, ``world_size * batch_size``
    """

    inputs: PyTorchObs
    returns: th.Tensor
    orders: list[th.Tensor]
    batch_size: int


def gather_critic_data(
    replica: Replica, inputs: PyTorchObs, returns: th.Tensor, n_epochs: int, batch_size: int
) -> GatheredCriticData:
    """Gather the critic's regression data of every rank, so that each rank runs the whole regression itself
    instead of all-reducing the gradient of every minibatch (one all-gather of the data, one of the orders, instead
    of ``n_epochs * ceil(n / batch_size)`` all-reduces of the critic's gradient).

    It is the same regression: each rank draws its minibatch permutations as it would alone, and minibatch ``k``
    of the gathered data is the union of the ranks' minibatches ``k``, whose mean loss (equal sizes on every rank)
    is the mean over ranks of their mean losses, the gradient all-reduced otherwise. Only the float summation order
    differs. Every rank computes on the same gathered data, so the ranks' critics stay bit-identical; each rank
    does the critic arithmetic of all ranks, which costs little where a minibatch step is dominated by per-operation
    overhead (small networks on CPU) and is what the all-reduce latency it saves would cost otherwise.

    :param replica: this process's data-parallel context
    :param inputs: this rank's critic inputs (observations, a dict of them, or features), one row per sample
    :param returns: this rank's regression targets (the same number of samples on every rank)
    :param n_epochs: passes over the data
    :param batch_size: this rank's minibatch size
    """
    n_samples = len(returns)
    # this rank's draws, in the order a lone regression draws them (the random streams go on as they would)
    permutations = th.stack([th.randperm(n_samples, device=returns.device) for _ in range(n_epochs)])
    if isinstance(inputs, th.Tensor) and inputs.dim() == 2 and inputs.dtype == returns.dtype:
        # features and targets in one all-gather
        both = replica.all_gather(th.cat([inputs, returns.unsqueeze(1)], dim=1))
        all_inputs: PyTorchObs = both[:, :-1]
        all_returns = both[:, -1]
    else:
        all_inputs = (
            {key: replica.all_gather(value) for key, value in inputs.items()}
            if isinstance(inputs, dict)
            else replica.all_gather(inputs)
        )
        all_returns = replica.all_gather(returns)
    # rank r's sample i is row r * n_samples + i of the gathered data
    offsets = th.arange(replica.world_size, device=returns.device).mul_(n_samples).view(-1, 1, 1)
    # sent as int32 (half int64's bytes; a rollout has far fewer than 2**31 samples), then as indices again
    gathered = replica.all_gather(permutations.unsqueeze(0).to(th.int32)).long() + offsets  # (ranks, epochs, samples)
    # each epoch's order: the ranks' minibatch k side by side, for every k (the last minibatch may be shorter)
    world_size, full = replica.world_size, n_samples - n_samples % batch_size
    whole = gathered[:, :, :full].reshape(world_size, n_epochs, -1, batch_size).permute(1, 2, 0, 3).reshape(n_epochs, -1)
    rest = gathered[:, :, full:].permute(1, 0, 2).reshape(n_epochs, -1)
    orders = list(th.cat([whole, rest], dim=1))
    return GatheredCriticData(all_inputs, all_returns, orders, batch_size * replica.world_size)


class CriticSnapshot:
    """A copy of the critic's parameters and of their optimizer state, to undo a failed critic step.

    :param params: the parameters the critic step may move
    :param optimizer: their optimizer
    """

    def __init__(self, params: Sequence[th.nn.Parameter], optimizer: th.optim.Optimizer) -> None:
        self._params = list(params)
        self._optimizer = optimizer
        self._values = [p.detach().clone() for p in params]
        self._state = {
            p: {k: v.clone() if isinstance(v, th.Tensor) else v for k, v in optimizer.state[p].items()}
            for p in params
            if p in optimizer.state
        }

    def restore(self) -> None:
        """Put the parameters and their optimizer state back as they were when the snapshot was taken."""
        with th.no_grad():
            for param, value in zip(self._params, self._values, strict=True):
                param.copy_(value)
        for param in self._params:
            if param in self._state:
                self._optimizer.state[param] = self._state[param]
            else:
                self._optimizer.state.pop(param, None)


def regress_or_undo(
    params: Sequence[th.nn.Parameter], optimizer: th.optim.Optimizer, regress: Callable[[], float]
) -> tuple[float, bool]:
    """Run a critic regression, and undo it as a whole if it diverged.

    A diverging regression (e.g. a learning rate far too large) leaves a non-finite loss or parameters; the
    parameters and their optimizer state then go back to what they were before it, so the model stays usable.

    :param params: the parameters the regression may move
    :param optimizer: their optimizer
    :param regress: runs the regression and returns its mean loss
    :return: the mean loss, and whether the step was kept (``False``: undone)
    """
    snapshot = CriticSnapshot(params, optimizer)
    loss = regress()
    if math.isfinite(loss) and all(bool(th.isfinite(p).all()) for p in params):
        return loss, True
    snapshot.restore()
    return loss, False


def fused_adam_available(device: th.device) -> bool:
    """:return: whether ``torch.optim.Adam(fused=True)`` runs on ``device``"""
    return device.type in FUSED_ADAM_DEVICES


def set_adam_kernel(optimizer: th.optim.Optimizer, fused: bool) -> None:
    """Switch an Adam optimizer to torch's fused kernel or off it, keeping its state.

    Round-tripping through ``load_state_dict`` lets torch place each parameter's ``step`` counter where the
    chosen kernel wants it (fused: a float32 tensor on the parameter's device).

    :param optimizer: a ``torch.optim.Adam``
    :param fused: whether to use the fused kernel
    """
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        group["fused"] = fused
        if fused:
            group["foreach"] = None  # torch refuses fused and foreach together
    optimizer.load_state_dict(state)


#: ``predict_values`` implementations that compute ``value_net(mlp_extractor.forward_critic(features))`` as
#: ActorCriticPolicy's does (sb3_trpo.maskable adds sb3-contrib's maskable policy's)
_STANDARD_PREDICT_VALUES: list[Callable[..., th.Tensor]] = [ActorCriticPolicy.predict_values]


def register_standard_predict_values(predict_values: Callable[..., th.Tensor]) -> None:
    """Let the critic step's fast paths cover another policy class whose ``predict_values`` is the standard one.

    :param predict_values: the class's ``predict_values`` function
    """
    _STANDARD_PREDICT_VALUES.append(predict_values)


def _standard_values(policy: BasePolicy) -> bool:
    if methods_replaced_on_instances(policy):  # e.g. policy.predict_values = ...: the class's method does not run
        return False
    return any(type(policy).predict_values is f for f in _STANDARD_PREDICT_VALUES)  # type: ignore[attr-defined]


def critic_features_frozen(policy: ActorCriticPolicy, actor_ids: set[int]) -> bool:
    """:return: whether the critic's feature extractor stays put in the critic step (it belongs to the actor, or
    has no trainable parameters), so its features can be computed once per update"""
    return all(id(p) in actor_ids or not p.requires_grad for p in policy.vf_features_extractor.parameters())


class MlpCriticRegression:
    """:func:`regress_values` for SB3's standard MLP critic, with the backward pass and Adam written out.

    For ``MlpExtractor``'s value branch (``nn.Linear`` layers, each but the last followed by a Tanh, ReLU, LeakyReLU
    or ELU, not with a negative slope or alpha) and ``value_net``, regressed from precomputed features with
    ``torch.optim.Adam``. The general path spends most of a minibatch on per-op bookkeeping: autograd's graph, and
    ``Optimizer.step`` looping over six tensors. Here the critic's parameters, gradients and Adam moments each live
    in one flat tensor for the whole step, the backward pass is the few matrix products of an MLP's chain rule (with
    the very backward ops autograd would run), and one Adam update covers all parameters. The results are those of
    the general path up to float rounding; parameters and optimizer state are written back at the end, in the
    optimizer's own format, so checkpoints and the undo snapshot see no difference.

    Use :meth:`for_policy`, which returns ``None`` for anything else (the general path then runs).

    :param layers: the critic's linear layers in order, each with the activation module that follows it (None
        for the last)
    :param optimizer: the policy's Adam
    """

    def __init__(self, layers: list[tuple[nn.Linear, nn.Module | None]], optimizer: th.optim.Adam) -> None:
        self.layers = layers
        self.optimizer = optimizer
        self.params: list[th.Tensor] = [p for linear, _ in layers for p in (linear.weight, linear.bias)]

    @classmethod
    def for_policy(
        cls, policy: ActorCriticPolicy, params: Sequence[th.nn.Parameter], actor_ids: set[int]
    ) -> "MlpCriticRegression | None":
        """The fast path for this policy's critic step, or ``None`` if it does not cover it.

        :param policy: the actor-critic policy
        :param params: the parameters the critic step moves (from :func:`critic_parameters`)
        :param actor_ids: ``id`` of every actor parameter
        """
        if not _standard_values(policy):
            return None
        if not critic_features_frozen(policy, actor_ids) or type(policy.mlp_extractor) is not MlpExtractor:
            return None
        layers = linear_layers([*policy.mlp_extractor.value_net, policy.value_net])
        if layers is None or layers[-1][1] is not None:
            return None
        optimizer = policy.optimizer
        regression = cls(layers, optimizer)  # type: ignore[arg-type]
        if {id(p) for p in regression.params} != {id(p) for p in params} or len(regression.params) != len(params):
            return None  # the critic moves something else too (e.g. its own trainable feature extractor)
        if type(optimizer) is not th.optim.Adam or len(optimizer.param_groups) != 1:
            return None
        group = optimizer.param_groups[0]
        if group["weight_decay"] != 0 or group["amsgrad"] or group["maximize"] or group.get("decoupled_weight_decay"):
            return None
        if isinstance(group["lr"], th.Tensor) or isinstance(group["betas"][0], th.Tensor):
            return None
        if any(p.dtype != th.float32 or not p.requires_grad for p in params):
            return None
        if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
            return None
        return regression

    def _flat_state(self, flat: th.Tensor) -> tuple[th.Tensor, th.Tensor, float]:
        """Adam's moments of every parameter as two flat tensors, and their common step count."""
        states = [self.optimizer.state.get(p, {}) for p in self.params]
        steps = {float(s["step"]) if "step" in s else 0.0 for s in states}
        if len(steps) != 1:
            raise RuntimeError("the critic's parameters have different Adam step counts")
        if steps == {0.0}:
            return th.zeros_like(flat), th.zeros_like(flat), 0.0
        exp_avg = th.cat([s["exp_avg"].reshape(-1) for s in states])
        exp_avg_sq = th.cat([s["exp_avg_sq"].reshape(-1) for s in states])
        return exp_avg, exp_avg_sq, steps.pop()

    def _write_back(self, flat: th.Tensor, grad: th.Tensor, exp_avg: th.Tensor, exp_avg_sq: th.Tensor, step: float) -> None:
        """Put the parameters, their last gradients and Adam's state back where torch keeps them, in the
        optimizer's own format (as the general path leaves them)."""
        group = self.optimizer.param_groups[0]
        offset = 0
        for param in self.params:
            n = param.numel()
            with th.no_grad():
                param.copy_(flat[offset : offset + n].view_as(param))
            param.grad = grad[offset : offset + n].view_as(param).clone()
            state = self.optimizer.state[param]
            if "step" in state:
                state["step"].fill_(step)
            else:  # torch's Adam keeps the count as a tensor: float32 on the device when fused, on the CPU otherwise
                device = param.device if group.get("fused") else th.device("cpu")
                state["step"] = th.tensor(step, dtype=th.float32, device=device)
            state["exp_avg"] = exp_avg[offset : offset + n].view_as(param).clone()
            state["exp_avg_sq"] = exp_avg_sq[offset : offset + n].view_as(param).clone()
            offset += n

    def __call__(
        self,
        features: th.Tensor,
        returns: th.Tensor,
        n_epochs: int,
        batch_size: int,
        replica: Replica,
        orders: Sequence[th.Tensor] | None = None,
    ) -> float:
        """What :func:`regress_values` computes and does, from precomputed features.

        :param features: the critic's input features, one row per state
        :param returns: the regression targets, one per state
        :param n_epochs: passes over the rollout
        :param batch_size: minibatch size (the last minibatch of an epoch may be smaller)
        :param replica: this process's data-parallel context
        :param orders: the order of the samples in each epoch (default: a random permutation drawn at each epoch)
        :return: the mean over all minibatches (and ranks) of each minibatch's loss before its step
        """
        group = self.optimizer.param_groups[0]
        lr, (beta1, beta2), eps = float(group["lr"]), group["betas"], group["eps"]
        # as in the general path, the actor's gradients are None for the whole step
        self.optimizer.zero_grad(set_to_none=True)
        with th.no_grad():
            flat = th.cat([p.detach().reshape(-1) for p in self.params])
            exp_avg, exp_avg_sq, step = self._flat_state(flat)
            grad = th.empty_like(flat)
            # per layer: views of its weight and bias into the flat parameters and gradient
            views = []
            offset = 0
            for linear, activation in self.layers:
                out_features, in_features = linear.weight.shape
                w_end = offset + out_features * in_features
                b_end = w_end + out_features
                views.append(
                    (
                        flat[offset:w_end].view(out_features, in_features),
                        flat[w_end:b_end],
                        grad[offset:w_end].view(out_features, in_features),
                        grad[w_end:b_end],
                        activation,
                    )
                )
                offset = b_end
            n_samples = len(returns)
            losses = []
            for epoch in range(n_epochs):
                permutation = th.randperm(n_samples, device=returns.device) if orders is None else orders[epoch]
                epoch_features, epoch_returns = features[permutation], returns[permutation]
                for start in range(0, n_samples, batch_size):
                    x, target = epoch_features[start : start + batch_size], epoch_returns[start : start + batch_size]
                    # forward, keeping every layer's input
                    inputs = [x]
                    for weight, bias, _, _, activation in views:
                        h = F.linear(inputs[-1], weight, bias)
                        inputs.append(activation.forward(h) if activation is not None else h)
                    error = inputs.pop().reshape(-1) - target
                    losses.append((error * error).mean())
                    # backward of mean((v - R)^2), layer by layer (the products autograd's linear backward makes)
                    upstream = (error * (2.0 / len(target))).unsqueeze(1)
                    for i in range(len(views) - 1, -1, -1):
                        weight, _, weight_grad, bias_grad, _ = views[i]
                        th.mm(upstream.T, inputs[i], out=weight_grad)
                        th.sum(upstream, dim=0, out=bias_grad)
                        if i > 0:
                            below = views[i - 1][4]
                            assert below is not None
                            upstream = ACTIVATION_DERIVATIVES[type(below)](below, inputs[i], upstream.mm(weight))
                    if replica.is_distributed:
                        grad.copy_(replica.mean(grad))
                    # torch's Adam (Kingma & Ba 2015, with its bias corrections) on all parameters at once
                    step += 1
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    bias_correction1 = 1 - beta1**step
                    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
                    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                    flat.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
            self._write_back(flat, grad, exp_avg, exp_avg_sq, step)
        return replica.mean_of_floats([th.stack(losses).mean().item()], returns.device)[0]
