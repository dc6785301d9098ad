"""The recurrent cells (``recurrent_layer_type="lstm" | "gru" | "rnn"``): what each builds, that the GRU and RNN keep the
LSTM's state interface, that the default is sb3-contrib's policy exactly, that every option and alias works for every
cell, and the checks of what a user passes in. The exact Fisher products, the loop against RecurrentPPO's and the
round trips run per cell in test_recurrent.py and test_maskable_recurrent.py."""

from typing import Any

import numpy as np
import pytest
import torch as th
from gymnasium import spaces

from tests.helpers import BOX_OBS, RandomEnv, import_sb3_contrib

import_sb3_contrib()  # a dev dependency: required in CI, skipped elsewhere without it

from sb3_contrib import RecurrentPPO  # noqa: E402
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402

from sb3_trpo import RecurrentTRPO  # noqa: E402
from sb3_trpo.recurrent_policies import (  # noqa: E402
    RECURRENT_LAYER_TYPES,
    PairStateGRU,
    PairStateRNN,
    RecurrentCellActorCriticPolicy,
)

LAYERS = {"lstm": th.nn.LSTM, "gru": PairStateGRU, "rnn": PairStateRNN}


def env(n_envs: int = 2, obs_space: spaces.Space = BOX_OBS) -> Any:
    return make_vec_env(lambda: RandomEnv(obs_space, spaces.Discrete(3), ep_length=7), n_envs=n_envs, seed=0)


@pytest.mark.parametrize("layer_class", [PairStateGRU, PairStateRNN])
def test_the_pair_state_layers_are_torchs_layers_with_the_lstms_state_interface(layer_class):
    th.manual_seed(0)
    layer = layer_class(3, 5, num_layers=2)
    plain = getattr(th.nn, layer_class.__mro__[1].__name__)(3, 5, num_layers=2)
    plain.load_state_dict(layer.state_dict())
    x, h, c = th.randn(4, 6, 3), th.randn(2, 6, 5), th.randn(2, 6, 5)
    output, (new_h, new_c) = layer(x, (h, c))
    expected_output, expected_h = plain(x, h)
    th.testing.assert_close(output, expected_output, rtol=0, atol=0)
    th.testing.assert_close(new_h, expected_h, rtol=0, atol=0)
    assert new_c is c, "the unused state comes back as it came"


@pytest.mark.parametrize("cell", RECURRENT_LAYER_TYPES)
@pytest.mark.parametrize(
    ("options", "critic"),
    [
        (dict(), "layer"),
        (dict(enable_critic_lstm=False), "linear"),
        (dict(enable_critic_lstm=False, shared_lstm=True), "shared"),
        (dict(n_lstm_layers=2, lstm_kwargs=dict(dropout=0.25)), "layer"),
    ],
)
def test_every_option_builds_the_cell_for_actor_and_critic_and_trains(cell, options, critic):
    model = RecurrentTRPO(
        "MlpLstmPolicy", env(), n_steps=16, batch_size=32, seed=0,
        policy_kwargs=dict(lstm_hidden_size=6, recurrent_layer_type=cell, **options),
    )  # fmt: skip
    policy = model.policy
    assert type(policy.lstm_actor) is LAYERS[cell]
    assert policy.lstm_actor.hidden_size == 6
    assert policy.lstm_actor.num_layers == options.get("n_lstm_layers", 1)
    assert policy.lstm_actor.dropout == options.get("lstm_kwargs", {}).get("dropout", 0.0)
    if critic == "layer":
        assert type(policy.lstm_critic) is LAYERS[cell]
    else:
        assert policy.lstm_critic is None
    # the optimizer holds every parameter of the policy, the cell's included, and nothing that left it
    optimized = {id(p) for group in policy.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in policy.parameters()}
    before = [p.detach().clone() for p in policy.lstm_actor.parameters()]
    model.learn(64)
    assert model.logger.name_to_value["train/is_line_search_success"] == 1.0
    assert any(not th.equal(a, b) for a, b in zip(before, policy.lstm_actor.parameters(), strict=True))


def test_the_rnn_takes_its_nonlinearity():
    model = RecurrentTRPO(
        "MlpLstmPolicy", env(), n_steps=16, batch_size=32, seed=0,
        policy_kwargs=dict(lstm_hidden_size=6, recurrent_layer_type="rnn", lstm_kwargs=dict(nonlinearity="relu")),
    )  # fmt: skip
    assert model.policy.lstm_actor.nonlinearity == "relu"
    assert model.policy.lstm_critic.nonlinearity == "relu"


@pytest.mark.parametrize("policy", ["MlpLstmPolicy", "CnnLstmPolicy", "MultiInputLstmPolicy"])
def test_the_default_cell_is_sb3_contribs_policy_parameter_for_parameter(policy):
    obs_space: spaces.Space = BOX_OBS
    if policy == "CnnLstmPolicy":
        obs_space = spaces.Box(0, 255, (36, 36, 1), np.uint8)
    elif policy == "MultiInputLstmPolicy":
        obs_space = spaces.Dict({"vector": BOX_OBS})
    ours = RecurrentTRPO(policy, env(1, obs_space), seed=3, policy_kwargs=dict(lstm_hidden_size=8))
    theirs = RecurrentPPO(policy, env(1, obs_space), seed=3, policy_kwargs=dict(lstm_hidden_size=8))
    assert isinstance(ours.policy, RecurrentCellActorCriticPolicy)
    assert type(theirs.policy).__name__ in str(type(ours.policy).__mro__)
    ours_state, theirs_state = ours.policy.state_dict(), theirs.policy.state_dict()
    assert list(ours_state) == list(theirs_state)
    for name in ours_state:
        assert th.equal(ours_state[name], theirs_state[name]), name


@pytest.mark.parametrize("cell", RECURRENT_LAYER_TYPES)
def test_a_policy_saved_on_its_own_comes_back_with_its_cell_and_sizes(cell, tmp_path):
    policy = RecurrentCellActorCriticPolicy(
        BOX_OBS, spaces.Discrete(3), lambda _: 1e-3, lstm_hidden_size=5, n_lstm_layers=2, recurrent_layer_type=cell
    )
    policy.save(tmp_path / "policy.pth")
    loaded = RecurrentCellActorCriticPolicy.load(tmp_path / "policy.pth")
    assert type(loaded.lstm_actor) is LAYERS[cell]
    assert loaded.lstm_hidden_state_shape == (2, 1, 5)
    obs = np.stack([BOX_OBS.sample() for _ in range(3)])
    first, state = policy.predict(obs, deterministic=True)
    second, loaded_state = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(state[0], loaded_state[0])


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_predicts_state_is_the_lstms_pair_with_the_second_left_at_zero(cell):
    model = RecurrentTRPO("MlpLstmPolicy", env(), n_steps=16, batch_size=32, seed=0,
                          policy_kwargs=dict(lstm_hidden_size=6, recurrent_layer_type=cell))  # fmt: skip
    obs = model.env.reset()
    state, starts = None, np.ones(2, dtype=bool)
    for _ in range(3):
        _, state = model.predict(obs, state, starts)
        starts = np.zeros(2, dtype=bool)
    assert len(state) == 2
    assert state[0].shape == state[1].shape == (1, 2, 6)
    assert np.abs(state[0]).max() > 0
    assert not state[1].any()


@pytest.mark.parametrize(
    ("policy_kwargs", "match"),
    [
        (dict(recurrent_layer_type="transformer"), "recurrent_layer_type='transformer' is not.*'lstm', 'gru', 'rnn'"),
        (dict(recurrent_layer_type="GRU"), "recurrent_layer_type='GRU' is not"),
        (dict(recurrent_layer_type="gru", lstm_kwargs=dict(nonlinearity="relu")), "'nonlinearity'.*'gru'.*'bias', 'dropout'"),
        (dict(lstm_kwargs=dict(proj_size=2)), "'proj_size'.*'lstm'"),
        (dict(recurrent_layer_type="rnn", lstm_kwargs=dict(bidirectional=True)), "'bidirectional'.*'rnn'"),
        (dict(lstm_kwargs=dict(batch_first=True)), "'batch_first'"),
    ],
)
def test_what_a_user_passes_for_the_cell_is_checked(policy_kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecurrentTRPO("MlpLstmPolicy", env(), policy_kwargs=policy_kwargs)


def test_the_cell_keyword_on_sb3_contribs_own_policy_class_says_which_classes_take_it():
    message = r"RecurrentActorCriticPolicy does not take.*'MlpLstmPolicy'.*RecurrentCellActorCriticPolicy"
    with pytest.raises(ValueError, match=message):
        RecurrentTRPO(RecurrentActorCriticPolicy, env(), policy_kwargs=dict(recurrent_layer_type="gru"))
    # without the keyword, sb3-contrib's class still trains (an LSTM)
    model = RecurrentTRPO(RecurrentActorCriticPolicy, env(), n_steps=16, batch_size=32, policy_kwargs=dict(lstm_hidden_size=4))
    model.learn(32)
