"""The critic step: which inputs it regresses from, its optimizer, and that it matches SB3's value function."""

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.utils import obs_as_tensor

from sb3_trpo import TRPO, critic
from tests.helpers import ACTION_SPACES, BOX_OBS, RandomEnv
from tests.test_actor import SharedImageEnv, ValueEmbedding


def model_for(policy="MlpPolicy", env=None, **policy_kwargs) -> TRPO:
    env = env if env is not None else RandomEnv(BOX_OBS, ACTION_SPACES["box"])
    return TRPO(policy, env, n_steps=32, batch_size=16, seed=0, policy_kwargs=policy_kwargs or None)


def value_inputs(model: TRPO, n: int = 8):
    model.learn(32)  # builds the actor view from a real rollout
    obs = obs_as_tensor(model.rollout_buffer.observations[:n].reshape(n, *model.observation_space.shape), model.device)
    actor_ids = {id(p) for p in model._actor_view.parameters}
    return obs, critic.value_inputs(model.policy, obs, actor_ids)


@pytest.mark.parametrize(
    ("policy", "env", "policy_kwargs", "precomputed"),
    [
        ("MlpPolicy", None, {}, True),  # FlattenExtractor: nothing to train, features computed once
        ("CnnPolicy", SharedImageEnv(), dict(features_extractor_kwargs=dict(features_dim=8)), True),  # shared CNN
        ("MlpPolicy", None, dict(features_extractor_class=ValueEmbedding, share_features_extractor=False), False),
    ],
    ids=["mlp", "shared-cnn", "separate-trainable-extractor"],
)
def test_value_inputs_give_sb3_values(policy, env, policy_kwargs, precomputed):
    model = model_for(policy, env, **policy_kwargs)
    obs, (inputs, predict) = value_inputs(model)
    with th.no_grad():
        expected = model.policy.predict_values(obs).flatten()
    calls = []
    sb3_predict_values = model.policy.predict_values
    model.policy.predict_values = lambda x: calls.append(1) or sb3_predict_values(x)  # type: ignore[method-assign]
    th.testing.assert_close(predict(inputs), expected)
    # precomputed features skip SB3's predict_values (and its feature extraction) on every minibatch
    assert (not calls) == precomputed


class CustomValuePolicy(ActorCriticPolicy):
    """A policy with its own value function: the critic step must call it, not SB3's formula."""

    def predict_values(self, obs):
        return 2.0 * super().predict_values(obs) + 1.0


def test_custom_predict_values_is_respected():
    model = TRPO(CustomValuePolicy, RandomEnv(BOX_OBS, ACTION_SPACES["box"]), n_steps=32, batch_size=16, seed=0)
    obs, (inputs, predict) = value_inputs(model)
    assert inputs is obs
    with th.no_grad():
        th.testing.assert_close(predict(inputs), model.policy.predict_values(obs).flatten())


def test_critic_optimizer_is_fused_adam_by_default_and_overridable():
    model = model_for()
    assert isinstance(model.policy.optimizer, th.optim.Adam)
    group = model.policy.optimizer.param_groups[0]
    assert group["fused"] is True
    assert group["eps"] == 1e-5  # SB3's default for Adam is kept
    custom = model_for(optimizer_kwargs=dict(eps=1e-7))
    assert not custom.policy.optimizer.param_groups[0]["fused"]
    assert custom.policy.optimizer.param_groups[0]["eps"] == 1e-7
    sgd = model_for(optimizer_class=th.optim.SGD)
    assert isinstance(sgd.policy.optimizer, th.optim.SGD)
    sgd.learn(64)


def test_critic_regression_reduces_the_value_loss():
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=256, batch_size=64, n_critic_updates=30, seed=0)
    model.learn(256)
    buffer = model.rollout_buffer
    obs = obs_as_tensor(buffer.observations.reshape(-1, 4), model.device)
    returns = th.as_tensor(buffer.returns.flatten())
    with th.no_grad():
        after = th.mean((model.policy.predict_values(obs).flatten() - returns) ** 2).item()
    before = float(np.mean((buffer.values.flatten() - buffer.returns.flatten()) ** 2))
    assert after < 0.5 * before
