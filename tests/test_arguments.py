"""The constructor is a drop-in for sb3_contrib.TRPO, and refuses arguments that cannot work."""

import inspect

import numpy as np
import pytest

from sb3_trpo import TRPO
from tests.helpers import import_sb3_contrib

# defaults that deliberately follow the reference notebook instead of sb3-contrib
NOTEBOOK_DEFAULTS = {"cg_max_steps": 10, "line_search_shrinking_factor": 0.5, "line_search_max_iter": 15}


def contrib_parameters() -> dict[str, inspect.Parameter]:
    sb3_contrib = import_sb3_contrib()
    return dict(inspect.signature(sb3_contrib.TRPO.__init__).parameters)


def test_accepts_every_sb3_contrib_keyword_with_the_same_defaults():
    ours = dict(inspect.signature(TRPO.__init__).parameters)
    theirs = contrib_parameters()
    missing = theirs.keys() - ours.keys()
    assert not missing, f"sb3_contrib.TRPO keywords not accepted: {missing}"
    for name, param in theirs.items():
        expected = NOTEBOOK_DEFAULTS.get(name, param.default)
        assert ours[name].default == expected, name
        assert ours[name].kind == param.kind, name


def test_positional_arguments_keep_sb3_contrib_order():
    ours = list(inspect.signature(TRPO.__init__).parameters)
    theirs = list(contrib_parameters())
    assert ours[: len(theirs)] == theirs  # our own keywords come after sb3-contrib's, keyword-only


def test_a_script_written_for_sb3_contrib_runs_by_changing_the_import():
    theirs = contrib_parameters()
    kwargs = {
        "learning_rate": lambda progress: 1e-3 * progress,
        "n_steps": 64,
        "batch_size": 32,
        "gamma": 0.98,
        "cg_max_steps": 15,
        "cg_damping": 0.05,
        "line_search_shrinking_factor": 0.8,
        "line_search_max_iter": 10,
        "n_critic_updates": 3,
        "gae_lambda": 0.9,
        "use_sde": False,
        "sde_sample_freq": -1,
        "rollout_buffer_class": None,
        "rollout_buffer_kwargs": None,
        "normalize_advantage": False,
        "target_kl": 0.02,
        "sub_sampling_factor": 2,
        "stats_window_size": 10,
        "tensorboard_log": None,
        "policy_kwargs": dict(net_arch=[8]),
        "verbose": 0,
        "seed": 3,
        "device": "cpu",
        "_init_setup_model": True,
    }
    assert set(kwargs) == set(theirs) - {"self", "policy", "env"}
    model = TRPO("MlpPolicy", "CartPole-v1", **kwargs)
    model.learn(128)
    for name in ("cg_max_steps", "cg_damping", "line_search_max_iter", "target_kl", "sub_sampling_factor", "n_critic_updates"):
        assert getattr(model, name) == kwargs[name]
    assert model.gamma == 0.98
    assert model.gae_lambda == 0.9
    assert model.normalize_advantage is False


def test_single_sample_rollout_with_advantage_normalization_is_refused():
    with pytest.raises(ValueError, match="must hold at least 2 samples"):
        TRPO("MlpPolicy", "CartPole-v1", n_steps=1, batch_size=1)


def test_truncated_minibatch_warns():
    with pytest.warns(UserWarning, match="does not divide the rollout size"):
        TRPO("MlpPolicy", "CartPole-v1", n_steps=100, batch_size=64)


def test_no_critic_updates_still_logs_a_value_loss():
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, n_critic_updates=0, seed=0)
    critic_before = model.policy.value_net.weight.detach().clone()
    model.learn(64)
    # the loss of the rollout's own value predictions, each paired with the return of the same state
    buffer = model.rollout_buffer
    expected = float(np.mean((buffer.returns.astype(np.float64) - buffer.values) ** 2))
    assert model.logger.name_to_value["train/value_loss"] == pytest.approx(expected, rel=1e-5)
    assert (model.policy.value_net.weight == critic_before).all()
