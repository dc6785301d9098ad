"""Batches of observations as the update handles them: a tensor, or a dict of tensors for ``Dict`` spaces."""

import torch as th
from stable_baselines3.common.type_aliases import PyTorchObs


def index_obs(obs: PyTorchObs, idx: slice | th.Tensor) -> PyTorchObs:
    """Select states from a batch of observations (a tensor, or a dict of tensors).

    :param obs: batch of observations
    :param idx: slice or index tensor along the batch dimension
    """
    if isinstance(obs, dict):
        return {key: value[idx] for key, value in obs.items()}
    return obs[idx]
