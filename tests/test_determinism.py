"""The same seed gives bit-identical parameters on CPU; sub-sampling works with every observation type."""

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env

from sb3_trpo import TRPO
from sb3_trpo.fisher import JacobianFisherProduct, MlpFisherProduct
from tests.helpers import ACTION_SPACES, BOX_OBS, RandomEnv


def train_once(env_id: str, **kwargs) -> dict[str, th.Tensor]:
    model = TRPO(
        "MlpPolicy", make_vec_env(env_id, n_envs=2, seed=3), seed=3, n_steps=128, batch_size=64, device="cpu", **kwargs
    )
    model.learn(128 * 2 * 3)
    return {name: p.detach().clone() for name, p in model.policy.named_parameters()} | {
        f"optimizer.{k}.{n}": t for k, v in model.policy.optimizer.state_dict()["state"].items() for n, t in v.items()
    }


@pytest.mark.parametrize(
    ("env_id", "kwargs"), [("CartPole-v1", {}), ("Pendulum-v1", {"use_sde": True, "sub_sampling_factor": 2})]
)
def test_same_seed_gives_bit_identical_parameters(env_id, kwargs):
    first, second = train_once(env_id, **kwargs), train_once(env_id, **kwargs)
    assert first.keys() == second.keys()
    for name in first:
        assert th.equal(first[name], second[name]), name
    different_seed = TRPO("MlpPolicy", make_vec_env(env_id, n_envs=2, seed=4), seed=4, n_steps=128, batch_size=64, **kwargs)
    different_seed.learn(128 * 2 * 3)
    assert not th.equal(different_seed.policy.action_net.weight, first["action_net.weight"])


IMAGE = spaces.Box(0, 255, shape=(36, 36, 1), dtype=np.uint8)
OBSERVATIONS = {
    "box": ("MlpPolicy", BOX_OBS, {}),
    "discrete": ("MlpPolicy", spaces.Discrete(5), {}),
    "multidiscrete": ("MlpPolicy", spaces.MultiDiscrete([3, 2]), {}),
    "multibinary": ("MlpPolicy", spaces.MultiBinary(4), {}),
    "image": ("CnnPolicy", IMAGE, dict(features_extractor_kwargs=dict(features_dim=8))),
    "dict": ("MultiInputPolicy", spaces.Dict({"vec": BOX_OBS, "img": IMAGE, "id": spaces.Discrete(3)}), {}),
}


@pytest.mark.parametrize("name", list(OBSERVATIONS))
def test_sub_sampling_uses_every_kth_state_with_every_observation_type(name, monkeypatch):
    policy, observation_space, policy_kwargs = OBSERVATIONS[name]
    fisher_sizes = []
    original_init = JacobianFisherProduct.__init__

    def recording_init(self, theta, params, *args, **kwargs):
        fisher_sizes.append(params.tensors[0].shape[0])
        original_init(self, theta, params, *args, **kwargs)

    monkeypatch.setattr(JacobianFisherProduct, "__init__", recording_init)
    original_mlp_init = MlpFisherProduct.__init__

    def recording_mlp_init(self, features, *args, **kwargs):  # MLP actors use the written-out product
        fisher_sizes.append(features.shape[0])
        original_mlp_init(self, features, *args, **kwargs)

    monkeypatch.setattr(MlpFisherProduct, "__init__", recording_mlp_init)
    env = RandomEnv(observation_space, ACTION_SPACES["multidiscrete"])
    model = TRPO(policy, env, n_steps=50, batch_size=25, sub_sampling_factor=3, seed=0, policy_kwargs=policy_kwargs or None)
    model.learn(100)
    assert fisher_sizes == [17, 17]  # states 0, 3, ..., 48 of 50
    assert model.logger.name_to_value["train/skipped_policy_steps"] == 0
    assert np.isfinite(model.logger.name_to_value["train/policy_objective"])
