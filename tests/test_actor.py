"""Actor parameters are chosen structurally; the critic step never moves them."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

import sb3_trpo.solvers
from sb3_trpo import TRPO
from sb3_trpo.actor import ActorView, select_actor_parameters
from tests.helpers import ACTION_SPACES, BOX_OBS, RandomEnv, sample_batch, tiny_policy


def selected_names(policy, obs) -> set[str]:
    return {name for name, _ in select_actor_parameters(policy, obs)}


def test_mlp_policy_actor_is_policy_net_action_net_and_log_std():
    policy = tiny_policy(ACTION_SPACES["box"])
    obs, _ = sample_batch(policy, n=2)
    names = selected_names(policy, obs)
    assert names == {
        "mlp_extractor.policy_net.0.weight",
        "mlp_extractor.policy_net.0.bias",
        "action_net.weight",
        "action_net.bias",
        "log_std",
    }


class ValueEmbedding(BaseFeaturesExtractor):
    """A features extractor whose only layer is *named* like a critic part, though the actor uses it."""

    def __init__(self, observation_space: spaces.Box) -> None:
        super().__init__(observation_space, features_dim=4)
        self.value_embedding = th.nn.Linear(int(np.prod(observation_space.shape)), 4)

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return th.tanh(self.value_embedding(observations))


def test_selection_does_not_depend_on_names():
    """Selecting by name (``"value" in name``) would drop this shared layer from the trust region."""
    policy = tiny_policy(ACTION_SPACES["discrete"], features_extractor_class=ValueEmbedding)
    obs, _ = sample_batch(policy, n=2)
    names = selected_names(policy, obs)
    assert "features_extractor.value_embedding.weight" in names
    assert not any(name.startswith("value_net") or "mlp_extractor.value_net" in name for name in names)


def test_separate_feature_extractors_only_the_actor_one_is_selected():
    policy = tiny_policy(ACTION_SPACES["discrete"], features_extractor_class=ValueEmbedding, share_features_extractor=False)
    obs, _ = sample_batch(policy, n=2)
    names = selected_names(policy, obs)
    # SB3 registers the actor's extractor first, as ``features_extractor`` (``pi_features_extractor`` aliases it)
    assert policy.pi_features_extractor is policy.features_extractor
    assert "features_extractor.value_embedding.weight" in names
    assert any(name.startswith("vf_features_extractor") for name, _ in policy.named_parameters())
    assert not any(name.startswith("vf_features_extractor") for name in names)


def test_frozen_parameters_are_not_selected():
    policy = tiny_policy(ACTION_SPACES["discrete"])
    policy.action_net.bias.requires_grad_(False)
    obs, _ = sample_batch(policy, n=2)
    assert "action_net.bias" not in selected_names(policy, obs)


def test_view_round_trip_and_functional_evaluation_leave_the_policy_untouched():
    policy = tiny_policy(ACTION_SPACES["multidiscrete"])
    obs, actions = sample_batch(policy, n=8)
    view = ActorView(policy, obs)
    theta = view.flat()
    assert theta.shape == (view.size,)
    evaluated = view.evaluate(theta + 0.1, obs, actions)
    th.testing.assert_close(view.flat(), theta)  # evaluating elsewhere did not write into the policy
    with th.no_grad():
        direct = policy.get_distribution(obs).log_prob(actions)
    assert not th.allclose(evaluated.log_prob, direct)
    view.commit(theta + 0.1)
    with th.no_grad():
        th.testing.assert_close(policy.get_distribution(obs).log_prob(actions), evaluated.log_prob)


class SharedImageEnv(gym.Env):
    """Small images and a discrete action, for a CnnPolicy whose extractor is shared by actor and critic."""

    observation_space = spaces.Box(0, 255, shape=(36, 36, 1), dtype=np.uint8)
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), float(action), False, False, {}


def test_critic_step_never_moves_a_shared_feature_extractor(monkeypatch):
    model = TRPO(
        "CnnPolicy",
        SharedImageEnv(),
        n_steps=32,
        batch_size=16,
        seed=0,
        policy_kwargs=dict(features_extractor_kwargs=dict(features_dim=16), net_arch=[]),
    )
    assert model.policy.share_features_extractor
    model.learn(32)
    # reject every policy step: then any change of an actor parameter would come from the critic
    monkeypatch.setattr(sb3_trpo.solvers, "is_acceptable", lambda trial, max_kl: False)
    before = {name: p.detach().clone() for name, p in model.policy.named_parameters()}
    model.train()
    after = dict(model.policy.named_parameters())
    extractor = [name for name in before if name.startswith("features_extractor.")]
    assert extractor
    for name in extractor:
        assert th.equal(before[name], after[name]), name
    assert not th.equal(before["value_net.weight"], after["value_net.weight"])


def test_replacing_a_module_rebuilds_the_view():
    model = TRPO("MlpPolicy", RandomEnv(BOX_OBS, ACTION_SPACES["discrete"]), n_steps=32, batch_size=32, seed=0)
    model.learn(32)
    first = model._actor_view
    model.policy.action_net = th.nn.Linear(model.policy.action_net.in_features, 3)
    model.policy.optimizer = th.optim.Adam(model.policy.parameters())
    model.learn(32, reset_num_timesteps=False)
    assert model._actor_view is not first
    assert any(p is model.policy.action_net.weight for p in model._actor_view.parameters)


@pytest.mark.parametrize("space", ["discrete", "box"])
def test_views_of_two_policies_are_independent(space):
    a, b = tiny_policy(ACTION_SPACES[space], seed=0), tiny_policy(ACTION_SPACES[space], seed=1)
    obs, actions = sample_batch(a, n=8)
    view_a, view_b = ActorView(a, obs), ActorView(b, obs)
    a_before, b_before = view_a.flat().clone(), view_b.flat().clone()
    b_state = {name: tensor.clone() for name, tensor in b.state_dict().items()}
    with th.no_grad():
        b_log_prob = b.evaluate_actions(obs, actions)[1]
    view_a.commit(a_before + 0.1)  # a step of one policy
    assert th.equal(view_a.flat(), a_before + 0.1)
    assert th.equal(view_b.flat(), b_before)  # leaves the other one alone: its parameters, its view
    for name, tensor in b.state_dict().items():
        assert th.equal(tensor, b_state[name]), name
    with th.no_grad():
        assert th.equal(b.evaluate_actions(obs, actions)[1], b_log_prob)
    assert view_a.is_view_of(a)
    assert not view_a.is_view_of(b)


@pytest.mark.parametrize(
    ("space", "kwargs", "frozen"),
    [
        ("box", {}, ["log_std"]),  # a fixed exploration noise
        ("box", {}, ["mlp_extractor.policy_net", "action_net"]),  # only the noise is learned
        ("box", {"use_sde": True}, ["log_std"]),
        ("discrete", {}, ["mlp_extractor.policy_net"]),
    ],
    ids=["frozen-log-std", "frozen-mean", "gsde-frozen-log-std", "discrete-frozen-policy-net"],
)
def test_training_with_frozen_actor_parts_moves_only_the_trainable_ones(space, kwargs, frozen):
    model = TRPO(
        "MlpPolicy",
        RandomEnv(BOX_OBS, ACTION_SPACES[space]),
        n_steps=64,
        batch_size=32,
        seed=0,
        policy_kwargs=dict(net_arch=dict(pi=[8], vf=[8])),
        **kwargs,
    )
    named = dict(model.policy.named_parameters())
    for prefix in frozen:
        for name, param in named.items():
            if name == prefix or name.startswith(prefix + "."):
                param.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in named.items()}
    model.learn(128)
    assert model.logger.name_to_value["train/is_line_search_success"] == 1.0
    changed = {name for name, p in model.policy.named_parameters() if not th.equal(before[name], p)}
    frozen_names = {name for name, p in model.policy.named_parameters() if not p.requires_grad}
    assert frozen_names
    assert not changed & frozen_names
    actor = {name.removeprefix("policy.") for name in model._actor_view.names}
    assert actor
    assert actor <= changed  # every trainable actor parameter took the accepted step


def test_an_entirely_frozen_actor_is_refused_with_what_to_do():
    policy = tiny_policy(ACTION_SPACES["box"])
    for module in (policy.mlp_extractor.policy_net, policy.action_net):
        module.requires_grad_(False)
    policy.log_std.requires_grad_(False)
    obs, _ = sample_batch(policy, n=2)
    with pytest.raises(ValueError, match=r"does not depend on any trainable parameter.*requires_grad=True"):
        ActorView(policy, obs)


def test_freezing_log_std_between_learn_calls_keeps_it_fixed():
    model = TRPO("MlpPolicy", RandomEnv(BOX_OBS, ACTION_SPACES["box"]), n_steps=64, batch_size=32, seed=0)
    model.learn(64)  # the actor view is built with a trainable log_std
    model.policy.log_std.requires_grad_(False)
    log_std = model.policy.log_std.detach().clone()
    model.learn(128, reset_num_timesteps=False)
    assert model.logger.name_to_value["train/is_line_search_success"] == 1.0
    assert th.equal(model.policy.log_std, log_std)
    assert all(p is not model.policy.log_std for p in model._actor_view.parameters)


def test_a_shared_extractor_unfrozen_between_learn_calls_joins_the_actor_and_the_critic_step_leaves_it():
    model = TRPO(
        "MlpPolicy",
        RandomEnv(BOX_OBS, ACTION_SPACES["box"]),
        n_steps=64,
        batch_size=32,
        seed=0,
        policy_kwargs=dict(features_extractor_class=ValueEmbedding, net_arch=dict(pi=[8], vf=[8])),
    )
    extractor = model.policy.features_extractor
    extractor.requires_grad_(False)
    model.learn(64)  # the extractor is frozen: outside the actor
    extractor.requires_grad_(True)
    model.target_kl = 0.0  # no policy step: whatever moves the policy now is the critic step
    obs, actions = sample_batch(model.policy, n=16)
    with th.no_grad():
        before = model.policy.evaluate_actions(obs, actions)[1]
    model.learn(64, reset_num_timesteps=False)
    with th.no_grad():
        th.testing.assert_close(model.policy.evaluate_actions(obs, actions)[1], before, rtol=0, atol=0)
    assert any(p is extractor.value_embedding.weight for p in model._actor_view.parameters)


@pytest.mark.parametrize("accept", [True, False], ids=["accepted", "rejected"])
def test_evaluating_a_shared_extractor_leaves_the_policys_own_parameters_in_place(monkeypatch, accept):
    """The extractor is registered under three names (features_extractor, pi_ and vf_features_extractor): a
    candidate substituted for it must not stay in the policy, under any of them, after the evaluation."""
    model = TRPO(
        "MlpPolicy",
        RandomEnv(BOX_OBS, ACTION_SPACES["discrete"]),
        n_steps=64,
        batch_size=32,
        seed=0,
        n_critic_updates=0,
        policy_kwargs=dict(features_extractor_class=ValueEmbedding),
    )
    parameters = dict(model.policy.named_parameters())
    if not accept:  # every trial fails: the line search rejects, and the policy must stay exactly as it was
        monkeypatch.setattr(sb3_trpo.solvers, "is_acceptable", lambda trial, max_kl: False)
    before = {name: p.detach().clone() for name, p in parameters.items()}
    model.learn(64)
    assert model.logger.name_to_value["train/is_line_search_success"] == float(accept)
    now = dict(model.policy.named_parameters())
    assert now.keys() == parameters.keys()
    for name, param in now.items():
        assert param is parameters[name], f"{name} was replaced by another tensor"
        assert isinstance(param, th.nn.Parameter)
    extractor_moved = not th.equal(
        before["features_extractor.value_embedding.weight"], now["features_extractor.value_embedding.weight"]
    )
    assert extractor_moved == accept
