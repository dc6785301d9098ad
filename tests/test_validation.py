"""Every constructor argument is checked, with a message naming it, its value and what is allowed."""

import inspect
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer

from sb3_trpo import TRPO
from sb3_trpo.validation import RULES
from tests.helpers import ACTION_SPACES, BOX_OBS, RandomEnv

NAN, INF = math.nan, math.inf

BAD_VALUES = {
    "learning_rate": [-1e-3, NAN, INF, "1e-3", True, lambda p: -1.0, lambda p: NAN * p, lambda p: 1 / 0],
    "n_steps": [0, -5, 2.5, 2048.0, True, None, "2048"],
    "batch_size": [0, -1, 64.0, False],
    "gamma": [-0.1, 1.01, NAN, INF, "0.99", None],
    "cg_max_steps": [0, -1, 10.5, True],
    "cg_damping": [-0.1, NAN, INF, "0.1"],
    "line_search_shrinking_factor": [0.0, 1.0, 1.5, -0.5, NAN],
    "line_search_max_iter": [0, 3.0, -2],
    "n_critic_updates": [-1, 1.5, None],
    "gae_lambda": [-0.01, 1.5, NAN],
    "use_sde": [1, "yes", None],
    "sde_sample_freq": [-2, 0.5, True],
    "rollout_buffer_class": [dict, "RolloutBuffer", RolloutBuffer(8, BOX_OBS, ACTION_SPACES["box"])],
    "rollout_buffer_kwargs": [[], "x"],
    "normalize_advantage": [0, "True"],
    "target_kl": [0.0, -0.01, NAN, INF, None],
    "sub_sampling_factor": [0, 1.5, -3],
    "distributed": [1, 0, "yes", "True", None],
    "distributed_critic": ["all", "Gather", None, 1],
    "fast_collection": [1, 0, "yes", None],
    "stats_window_size": [0, 2.0],
    "tensorboard_log": [1, ["runs"]],
    "policy_kwargs": [[], "net_arch=[64]"],
    "verbose": [-1, 1.0, True, "1"],
    "seed": [-1, 2**32, 1.5, "0"],
    "device": ["gpu0", "not-a-device", 3, None],
}
GOOD_VALUES = {
    # 0 (a critic that does not learn) and a schedule that starts at 0, as sb3-contrib accepts them
    "learning_rate": [3e-4, np.float32(1e-3), lambda p: 1e-3 * p, 0.0, 0, lambda p: 0.0],
    # SB3 prints debug output from 2 on: every level above it is debug too
    "verbose": [0, 2, 3, np.int64(5)],
    "n_steps": [16, np.int64(16)],
    "gamma": [0.0, 1.0],
    "cg_damping": [0.0],
    "n_critic_updates": [0],
    "distributed": [False, "auto"],
    "distributed_critic": ["gather", "gradients"],
    "fast_collection": [False, np.bool_(True)],
    "sde_sample_freq": [-1, 0, 4],
    "rollout_buffer_class": [None, RolloutBuffer],
    "tensorboard_log": [None, "runs", Path("runs")],
    "seed": [None, 0, 2**32 - 1, np.int64(7)],
    "device": ["auto", "cpu", th.device("cpu")],
}
NOT_CHECKED = {"self", "policy", "env", "_init_setup_model"}  # validated by SB3 itself (policy, env) or internal


def test_every_keyword_has_a_rule_and_bad_values_to_test_it():
    keywords = set(inspect.signature(TRPO.__init__).parameters) - NOT_CHECKED
    assert keywords == set(RULES)
    assert keywords == set(BAD_VALUES)


def cases(table: dict[str, list]) -> list:
    """One pytest param per (keyword, value), with stable ids (a lambda's repr holds its address)."""
    return [
        pytest.param(name, value, id=f"{name}-{i}-{type(value).__name__}")
        for name, values in table.items()
        for i, value in enumerate(values)
    ]


@pytest.mark.parametrize(("name", "value"), cases(BAD_VALUES))
def test_bad_value_is_refused_with_name_value_and_allowed_range(name, value):
    expected = f"{name}={value!r} is not allowed: {name} must be {RULES[name].allowed}."
    with pytest.raises(ValueError, match=re.escape(expected)):
        TRPO("MlpPolicy", RandomEnv(BOX_OBS, ACTION_SPACES["box"]), **{"n_steps": 16, "batch_size": 16, name: value})


@pytest.mark.parametrize(("name", "value"), cases(GOOD_VALUES))
def test_good_value_is_accepted(name, value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kwargs = {"n_steps": 16, "batch_size": 16, name: value}
    model = TRPO("MlpPolicy", RandomEnv(BOX_OBS, ACTION_SPACES["box"]), **kwargs)
    model.learn(16)


def test_gsde_needs_box_actions():
    # SB3 refuses it before TRPO sees the spaces, with a clear message of its own
    with pytest.raises(ValueError, match=r"gSDE\) can only be used with continuous actions"):
        TRPO("MlpPolicy", RandomEnv(BOX_OBS, ACTION_SPACES["discrete"]), use_sde=True)


def test_rollout_buffer_must_fit_the_observations():
    dict_env = RandomEnv(spaces.Dict({"a": BOX_OBS}), ACTION_SPACES["discrete"])
    with pytest.raises(ValueError, match=r"rollout_buffer_class=RolloutBuffer is not allowed .* needs a DictRolloutBuffer"):
        TRPO("MultiInputPolicy", dict_env, rollout_buffer_class=RolloutBuffer)
    with pytest.raises(ValueError, match=r"rollout_buffer_class=DictRolloutBuffer is not allowed .* non-Dict RolloutBuffer"):
        TRPO("MlpPolicy", RandomEnv(BOX_OBS, ACTION_SPACES["discrete"]), rollout_buffer_class=DictRolloutBuffer)


def test_a_zero_learning_rate_trains_the_policy_and_leaves_the_critic():
    model = TRPO("MlpPolicy", RandomEnv(BOX_OBS, ACTION_SPACES["box"]), learning_rate=0.0, n_steps=64, batch_size=32, seed=0)
    value_net = model.policy.value_net.weight.detach().clone()
    action_net = model.policy.action_net.weight.detach().clone()
    model.learn(64)
    assert th.equal(model.policy.value_net.weight, value_net)
    assert not th.equal(model.policy.action_net.weight, action_net)
