"""The critic step: which inputs it regresses from, its optimizer, and that it matches SB3's value function."""

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.utils import obs_as_tensor

from sb3_trpo import TRPO, critic
from sb3_trpo.distributed import Replica
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


# --- the fast path for SB3's MLP critic -------------------------------------------------------------------------


def critic_setup(policy: ActorCriticPolicy) -> tuple[list[th.nn.Parameter], set[int]]:
    actor_ids = {id(p) for p in [*policy.mlp_extractor.policy_net.parameters(), *policy.action_net.parameters()]}
    if hasattr(policy, "log_std"):
        actor_ids.add(id(policy.log_std))
    return critic.critic_parameters(policy, actor_ids), actor_ids


def regress_both_ways(model: TRPO, features: th.Tensor, returns: th.Tensor, n_epochs: int, batch_size: int):
    """One critic step by the fast path and one by autograd + torch.optim.Adam, from the same state and seed."""
    import copy

    results = []
    for fast in (True, False):
        policy = copy.deepcopy(model.policy)
        params, actor_ids = critic_setup(policy)
        th.manual_seed(3)
        if fast:
            regression = critic.MlpCriticRegression.for_policy(policy, params, actor_ids)
            assert regression is not None
            loss = regression(features, returns, n_epochs, batch_size, Replica.alone())
        else:

            def predict(x: th.Tensor, policy: ActorCriticPolicy = policy) -> th.Tensor:
                return policy.value_net(policy.mlp_extractor.forward_critic(x)).flatten()

            loss = critic.regress_values(
                params, policy.optimizer, features, returns, predict, n_epochs, batch_size, Replica.alone()
            )
        results.append((policy, params, loss, th.get_rng_state()))
    return results


FAST_CRITICS = {
    "tanh-64x64": dict(net_arch=[64, 64]),
    "relu-3-layers": dict(net_arch=dict(pi=[8], vf=[16, 8, 4]), activation_fn=th.nn.ReLU),
    "leaky-relu": dict(net_arch=dict(pi=[8], vf=[12, 6]), activation_fn=th.nn.LeakyReLU),
    "elu": dict(net_arch=dict(pi=[8], vf=[12]), activation_fn=th.nn.ELU),
    "linear-critic": dict(net_arch=dict(pi=[8], vf=[])),
    "plain-adam": dict(net_arch=[16, 16], optimizer_kwargs=dict(eps=1e-7, betas=(0.8, 0.95))),
}


@pytest.mark.parametrize("policy_kwargs", list(FAST_CRITICS.values()), ids=list(FAST_CRITICS))
def test_fast_mlp_critic_matches_autograd_and_torch_adam(policy_kwargs):
    model = model_for(**policy_kwargs)
    model.policy.optimizer.param_groups[0]["lr"] = 3e-3
    generator = th.Generator().manual_seed(0)
    features = th.randn(100, 3, generator=generator)
    returns = (features**2).sum(1) * 3 + th.randn(100, generator=generator)
    # twice: from a fresh optimizer, then from the state the first step left (moments and step count carried on)
    for _ in range(2):
        (fast, fast_params, fast_loss, fast_rng), (reference, ref_params, ref_loss, ref_rng) = regress_both_ways(
            model, features, returns, n_epochs=4, batch_size=32
        )
        assert th.equal(fast_rng, ref_rng)  # the same shuffles drawn
        assert fast_loss == pytest.approx(ref_loss, rel=1e-5)
        moved = max((p - q).abs().max().item() for p, q in zip(ref_params, critic_setup(model.policy)[0], strict=True))
        assert moved > 1e-3  # the step did something worth comparing
        for p, q in zip(fast_params, ref_params, strict=True):
            th.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            th.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)  # the last minibatch's gradient
            fast_state, ref_state = fast.optimizer.state[p], reference.optimizer.state[q]
            assert fast_state.keys() == ref_state.keys()
            for key in ref_state:
                assert fast_state[key].dtype == ref_state[key].dtype
                assert fast_state[key].device == ref_state[key].device
                th.testing.assert_close(fast_state[key], ref_state[key], rtol=1e-4, atol=1e-7)
        assert all(p.grad is None for p in fast.action_net.parameters())  # the actor is untouched
        model.policy = fast  # the next round starts from a non-empty Adam state


@pytest.mark.parametrize(
    "policy_kwargs",
    [
        dict(activation_fn=th.nn.Softplus),  # an activation without a written-out backward
        dict(optimizer_class=th.optim.SGD),
        dict(optimizer_kwargs=dict(weight_decay=1e-4)),
        dict(optimizer_kwargs=dict(amsgrad=True)),
        dict(features_extractor_class=ValueEmbedding, share_features_extractor=False),  # a trainable extractor
    ],
    ids=["softplus", "sgd", "weight-decay", "amsgrad", "trainable-extractor"],
)
def test_fast_mlp_critic_declines_what_it_does_not_cover(policy_kwargs):
    model = model_for(**policy_kwargs)
    model.learn(32)
    params, actor_ids = critic_setup(model.policy)
    if "features_extractor_class" in policy_kwargs:
        actor_ids = {id(p) for p in model._actor_view.parameters}
        params = critic.critic_parameters(model.policy, actor_ids)
    assert critic.MlpCriticRegression.for_policy(model.policy, params, actor_ids) is None
    model.learn(64)  # and the general path trains it


def test_fast_mlp_critic_declines_custom_values_and_hooks():
    model = TRPO(CustomValuePolicy, RandomEnv(BOX_OBS, ACTION_SPACES["box"]), n_steps=32, batch_size=16, seed=0)
    assert critic.MlpCriticRegression.for_policy(model.policy, *critic_setup(model.policy)) is None
    model = model_for()
    assert critic.MlpCriticRegression.for_policy(model.policy, *critic_setup(model.policy)) is not None
    model.policy.value_net.register_forward_hook(lambda module, inputs, output: output)
    assert critic.MlpCriticRegression.for_policy(model.policy, *critic_setup(model.policy)) is None
    # methods replaced on the instance, not the class
    model = model_for()
    predict_values = model.policy.predict_values
    model.policy.predict_values = lambda obs: predict_values(obs) + 1.0
    assert critic.MlpCriticRegression.for_policy(model.policy, *critic_setup(model.policy)) is None
    model = model_for()
    value_net = model.policy.value_net
    value_net.forward = lambda x: th.nn.Linear.forward(value_net, x) + 1.0
    assert critic.MlpCriticRegression.for_policy(model.policy, *critic_setup(model.policy)) is None


def test_training_uses_the_fast_critic_and_its_state_survives_a_checkpoint(tmp_path, monkeypatch):
    calls = []
    original = critic.MlpCriticRegression.__call__

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(critic.MlpCriticRegression, "__call__", counted)
    model = TRPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, seed=0)
    model.learn(128)
    assert len(calls) == 2
    state = model.policy.optimizer.state_dict()
    assert {float(s["step"]) for s in state["state"].values()} == {40.0}  # 2 updates of 10 epochs x 2 minibatches
    model.save(tmp_path / "model")
    loaded = TRPO.load(tmp_path / "model", env=model.get_env())
    loaded.learn(64, reset_num_timesteps=False)
    assert {float(s["step"]) for s in loaded.policy.optimizer.state_dict()["state"].values()} == {60.0}
