"""The lean recurrent collection stores exactly what ``RecurrentPPO.collect_rollouts`` stores, step for step.

Every comparison runs the same seeded set-up twice, once through ``RecurrentTRPO.collect_rollouts`` (the lean loop,
which must cover the configuration) and once through sb3-contrib's ``RecurrentPPO.collect_rollouts`` itself on the
same kind of model, and requires bit-identical results: buffer fields and the states stored with each step, random
generator states, what callbacks see (every local), the states the rollout leaves, counters and episode records.
"""

from typing import Any

import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env

from tests.helpers import ACTION_SPACES, BOX_OBS, RandomEnv, import_sb3_contrib
from tests.test_collection import BUFFER_FIELDS, assert_same
from tests.test_collection import collect as collect_with_recording

import_sb3_contrib()  # a dev dependency: required in CI, skipped elsewhere without it

from sb3_contrib import RecurrentPPO  # noqa: E402
from sb3_contrib.common.recurrent.buffers import RecurrentRolloutBuffer  # noqa: E402
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy  # noqa: E402

from sb3_trpo import MaskableRecurrentTRPO, RecurrentTRPO  # noqa: E402
from sb3_trpo.recurrent_policies import RECURRENT_LAYER_TYPES, RecurrentCellActorCriticPolicy  # noqa: E402

STATE_FIELDS = ("hidden_states_pi", "cell_states_pi", "hidden_states_vf", "cell_states_vf")
CRITICS = {
    "critic-layer": dict(enable_critic_lstm=True),
    "linear-critic": dict(enable_critic_lstm=False),
    "shared": dict(enable_critic_lstm=False, shared_lstm=True),
}


def model_maker(
    action_space: spaces.Space, obs_space: spaces.Space = BOX_OBS, policy: Any = "MlpLstmPolicy", **kwargs: Any
) -> Any:
    def make() -> RecurrentTRPO:
        # episodes of 7 steps end by truncation: the timeout bootstrap from the critic's state runs in every rollout
        env = make_vec_env(lambda: RandomEnv(obs_space, action_space, ep_length=7), n_envs=3, seed=3)
        kwargs.setdefault("policy_kwargs", dict(lstm_hidden_size=5, net_arch=[6]))
        return RecurrentTRPO(policy, env, n_steps=16, batch_size=48, seed=1, **kwargs)

    return make


def lean(model: Any, callback: Any) -> bool:
    result = model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    assert model._collection_gap is None, f"the lean loop should cover this configuration: {model._collection_gap}"
    return result


def recurrent_ppos(model: Any, callback: Any) -> bool:
    return RecurrentPPO.collect_rollouts(model, model.env, callback, model.rollout_buffer, model.n_steps)


def collect(make_model: Any, collector: Any, n_rollouts: int = 3, stop_at: int | None = None) -> dict[str, Any]:
    """test_collection's ``collect`` with the given loop, comparing the states stored with each step too."""
    result = collect_with_recording(
        lambda _: make_model(), False, n_rollouts, stop_at, collector=collector, fields=(*BUFFER_FIELDS, *STATE_FIELDS)
    )
    result.pop("gap")  # set by RecurrentTRPO's collect_rollouts only (the lean collector checks it)
    return result


def assert_collects_what_recurrent_ppo_collects(make_model: Any, stop_at: int | None = None) -> dict[str, Any]:
    ours, theirs = collect(make_model, lean, stop_at=stop_at), collect(make_model, recurrent_ppos, stop_at=stop_at)
    for key in ours:
        assert_same(ours[key], theirs[key], key)
    return ours


@pytest.mark.parametrize("cell", RECURRENT_LAYER_TYPES)
@pytest.mark.parametrize("action_name", ["discrete", "box"])
def test_every_cell_collects_what_recurrent_ppo_collects(cell, action_name):
    net = dict(lstm_hidden_size=5, net_arch=[6], recurrent_layer_type=cell, n_lstm_layers=2)
    ours = assert_collects_what_recurrent_ppo_collects(model_maker(ACTION_SPACES[action_name], policy_kwargs=net))
    assert ours["buffers"][-1]["hidden_states_pi"].any(), "degenerate test: the stored states are all zero"
    assert any("terminal_value" in step for step in ours["callback"]), "degenerate test: no truncation was bootstrapped"


@pytest.mark.parametrize("critic", list(CRITICS))
@pytest.mark.parametrize("action_name", sorted(ACTION_SPACES))
def test_every_action_space_and_critic_collects_what_recurrent_ppo_collects(action_name, critic):
    net = dict(lstm_hidden_size=5, net_arch=[6], **CRITICS[critic])
    assert_collects_what_recurrent_ppo_collects(model_maker(ACTION_SPACES[action_name], policy_kwargs=net))


RELU_RNN = dict(lstm_hidden_size=5, recurrent_layer_type="rnn", lstm_kwargs=dict(nonlinearity="relu"))
SEPARATE = dict(lstm_hidden_size=5, share_features_extractor=False, enable_critic_lstm=True)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("gsde", dict(use_sde=True, sde_sample_freq=4)),
        ("rnn-relu", dict(policy_kwargs=RELU_RNN)),
        ("separate-extractors", dict(policy_kwargs=SEPARATE)),
        ("no-hidden-layers", dict(policy_kwargs=dict(lstm_hidden_size=5, net_arch=[]))),
        ("sb3-contribs-own-class", dict(policy=RecurrentActorCriticPolicy, policy_kwargs=dict(lstm_hidden_size=5))),
    ],
)
def test_other_settings_collect_what_recurrent_ppo_collects(name, kwargs):
    space = ACTION_SPACES["box"] if name == "gsde" else ACTION_SPACES["discrete"]
    assert_collects_what_recurrent_ppo_collects(model_maker(space, **kwargs))


def test_dict_observations_collect_what_recurrent_ppo_collects():
    obs_space = spaces.Dict({"vector": BOX_OBS, "cells": spaces.MultiDiscrete([2, 3])})
    make = model_maker(ACTION_SPACES["discrete"], obs_space, policy="MultiInputLstmPolicy")
    assert_collects_what_recurrent_ppo_collects(make)


def test_a_callback_stopping_the_rollout_stops_both_loops_at_the_same_step():
    ours = assert_collects_what_recurrent_ppo_collects(model_maker(ACTION_SPACES["discrete"]), stop_at=5)
    assert ours["continues"] == [False, False, False]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_training_gives_bit_identical_parameters_with_and_without_the_lean_loop(cell):
    def train(fast: bool) -> list[th.Tensor]:
        make = model_maker(
            ACTION_SPACES["box"], fast_collection=fast, policy_kwargs=dict(lstm_hidden_size=5, recurrent_layer_type=cell)
        )
        model = make()
        model.learn(4 * 48)
        assert model._collection_gap is None
        return [p.detach().clone() for p in model.policy.parameters()]

    for a, b in zip(train(True), train(False), strict=True):
        assert th.equal(a, b)


def test_masks_collect_with_the_lean_loop_what_the_general_loop_collects():
    """MaskableRecurrentTRPO has no sb3-contrib counterpart: the lean loop against this package's loop with the
    policy's own call and the buffer's add (itself tested against RecurrentPPO's above)."""
    from tests.test_maskable_recurrent import Recall

    def make(fast: bool) -> Any:
        return lambda: MaskableRecurrentTRPO(
            "MlpLstmPolicy", make_vec_env(Recall, n_envs=2, seed=0), n_steps=16, batch_size=32, seed=0,
            fast_collection=fast, policy_kwargs=dict(lstm_hidden_size=5, recurrent_layer_type="gru"),
        )  # fmt: skip

    def general(model: Any, callback: Any) -> bool:
        return model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)

    ours, general_loop = collect(make(True), lean), collect(make(False), general)
    for key in ours:
        assert_same(ours[key], general_loop[key], key)
    masks = ours["buffers"][-1]["action_masks"]
    assert not masks.all(), "degenerate test: every action valid"


class OwnSequences(RecurrentCellActorCriticPolicy):
    @staticmethod
    def _process_sequence(*args: Any) -> Any:
        return RecurrentActorCriticPolicy._process_sequence(*args)


class OwnBuffer(RecurrentRolloutBuffer):
    pass


class OwnLSTM(th.nn.LSTM):
    pass


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        (dict(policy=OwnSequences), "overrides _process_sequence"),
        (dict(rollout_buffer_class=OwnBuffer), "rollout buffer class OwnBuffer"),
        (dict(), "lstm_actor is a OwnLSTM"),
    ],
)
def test_what_the_lean_loop_does_not_cover_falls_back_to_the_policys_call(kwargs, reason):
    model = model_maker(ACTION_SPACES["discrete"], **kwargs)()
    if not kwargs:  # a layer class of the user's (its forward may compute anything)
        model.policy.lstm_actor.__class__ = OwnLSTM
    model._setup_learn(10**6, None)
    model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, model.n_steps)
    assert reason in model._collection_gap
