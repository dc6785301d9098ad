"""The critic step: minibatch regression of the value function on the returns, its undo snapshot, the inputs
it regresses from, and the choice of Adam kernel for the critic's optimizer.

Knows nothing of the actor beyond which parameters belong to it (those never move here) and nothing of the
trust region.
"""

from collections.abc import Callable, Sequence

import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import PyTorchObs
from torch.nn import functional as F

from sb3_trpo.distributed import Replica

#: device types on which ``torch.optim.Adam(fused=True)`` runs (the critic's default optimizer uses it there)
FUSED_ADAM_DEVICES = ("cpu", "cuda")


def index_obs(obs: PyTorchObs, idx: slice | th.Tensor) -> PyTorchObs:
    """Select states from a batch of observations (a tensor, or a dict of tensors).

    :param obs: batch of observations
    :param idx: slice or index tensor along the batch dimension
    """
    if isinstance(obs, dict):
        return {key: value[idx] for key, value in obs.items()}
    return obs[idx]


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
    extractor_frozen = all(id(p) in actor_ids or not p.requires_grad for p in policy.vf_features_extractor.parameters())
    if extractor_frozen and type(policy).predict_values is ActorCriticPolicy.predict_values:
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
    :return: the mean over all minibatches (and ranks) of each minibatch's loss before its step
    """
    # the actor's gradients stay None for the whole step, so the optimizer leaves the actor alone
    optimizer.zero_grad(set_to_none=True)
    n_samples = len(returns)
    losses = []
    for _ in range(n_epochs):
        permutation = th.randperm(n_samples, device=returns.device)
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
