"""Numerical faults never reach the parameters; an exception or Ctrl-C inside train() never leaves the actor at a
trial step."""

import os
import signal

import gymnasium as gym
import numpy as np
import pytest
import torch as th

from sb3_trpo import TRPO
from sb3_trpo.actor import ActorView, interrupts_deferred
from sb3_trpo.fisher import JacobianFisherProduct, MlpFisherProduct
from sb3_trpo.trpo import NonFiniteRolloutError
from tests.helpers import ACTION_SPACES, BOX_OBS, RandomEnv


def make_model(**kwargs) -> TRPO:
    kwargs.setdefault("n_steps", 64)
    kwargs.setdefault("batch_size", 32)
    return TRPO("MlpPolicy", RandomEnv(BOX_OBS, ACTION_SPACES["box"]), seed=0, policy_kwargs=dict(net_arch=[8]), **kwargs)


def trained(**kwargs) -> TRPO:
    model = make_model(**kwargs)
    model.learn(64)  # a filled buffer and an actor view
    return model


def parameters(model: TRPO) -> dict[str, th.Tensor]:
    return {name: p.detach().clone() for name, p in model.policy.named_parameters()}


def all_finite(model: TRPO) -> bool:
    return all(bool(th.isfinite(p).all()) for p in model.policy.parameters())


class Poisoned(gym.Wrapper):
    """Makes one field of step ``at`` non-finite."""

    def __init__(self, env: gym.Env, field: str, at: int = 10, value: float = np.nan) -> None:
        super().__init__(env)
        self.field, self.at, self.value, self.t = field, at, value, 0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.t += 1
        if self.t == self.at:
            if self.field == "observation":
                obs = np.full_like(obs, self.value)
            else:
                reward = self.value
        return obs, reward, terminated, truncated, info


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [("observation", np.nan, "observations"), ("reward", np.inf, "rewards"), ("reward", np.nan, "rewards")],
)
def test_non_finite_rollout_data_raises_a_clear_error_and_changes_nothing(field, value, named):
    env = Poisoned(RandomEnv(BOX_OBS, ACTION_SPACES["box"]), field, value=value)
    model = TRPO("MlpPolicy", env, n_steps=64, batch_size=32, seed=0)
    before = parameters(model)
    with pytest.raises(NonFiniteRolloutError, match=rf"non-finite {named}.*VecCheckNan"):
        model.learn(64)
    after = parameters(model)
    assert all(th.equal(before[name], after[name]) for name in before)


def test_non_finite_gradient_skips_the_policy_step(monkeypatch):
    model = trained()
    original = ActorView.evaluate

    def nan_gradient(self, theta, obs, actions, action_masks=None):
        result = original(self, theta, obs, actions, action_masks)
        if theta.requires_grad:  # the gradient's forward pass: poison the log-probabilities
            return result._replace(log_prob=result.log_prob + theta.sum() * float("nan"))
        return result

    monkeypatch.setattr(ActorView, "evaluate", nan_gradient)
    actor_before = model._actor_view.flat()
    with pytest.warns(RuntimeWarning, match="skipped the policy step .* surrogate or its gradient is not finite"):
        model.train()
    assert th.equal(model._actor_view.flat(), actor_before)
    assert all_finite(model)
    assert model.logger.name_to_value["train/skipped_policy_steps"] == 1


def test_non_finite_fisher_product_skips_the_policy_step(monkeypatch):
    model = trained()
    for product in (JacobianFisherProduct, MlpFisherProduct):
        monkeypatch.setattr(product, "__call__", lambda self, v: v * float("nan"))
    actor_before = model._actor_view.flat()
    with pytest.warns(RuntimeWarning, match=r"Fisher-vector product is not finite \(pᵀ\(F \+ λI\)p = nan\)"):
        model.train()
    assert th.equal(model._actor_view.flat(), actor_before)
    assert model.logger.name_to_value["train/skipped_policy_steps"] == 1


def test_non_positive_curvature_skips_the_policy_step(monkeypatch):
    model = trained(cg_damping=0.0)
    for product in (JacobianFisherProduct, MlpFisherProduct):
        monkeypatch.setattr(product, "__call__", lambda self, v: -v)  # a negative-definite "Fisher"
    actor_before = model._actor_view.flat()
    with pytest.warns(RuntimeWarning, match="curvature .* is not positive and finite"):
        model.train()
    assert th.equal(model._actor_view.flat(), actor_before)


def test_a_gradient_below_the_solvers_tolerance_takes_no_step_and_is_no_fault():
    """A converged policy (here: advantages of 1e-9) has a gradient too small for conjugate gradient to move from 0:
    no step, and no warning (the curvature of the zero direction, 0, is no numerical fault)."""
    model = trained(normalize_advantage=False)
    model.rollout_buffer.advantages *= 1e-9
    actor_before = model._actor_view.flat()
    model.train()  # any warning fails the test suite
    assert th.equal(model._actor_view.flat(), actor_before)
    logged = model.logger.name_to_value
    assert logged["train/skipped_policy_steps"] == 0
    assert logged["train/is_line_search_success"] == 0.0


def test_diverging_critic_is_rolled_back():
    model = trained()
    model.lr_schedule = lambda _: 1e38  # Adam's first steps move by ~lr: the critic overflows at once
    critic_names = [n for n in parameters(model) if "value" in n]
    before = parameters(model)
    state_before = {k: {n: t.clone() for n, t in v.items()} for k, v in model.policy.optimizer.state_dict()["state"].items()}
    with pytest.warns(RuntimeWarning, match=r"undid the critic step.*is learning_rate too large"):
        model.train()
    assert all_finite(model)
    after = parameters(model)
    for name in critic_names:
        assert th.equal(before[name], after[name])
    state_after = model.policy.optimizer.state_dict()["state"]
    assert state_after.keys() == state_before.keys()
    for key, entries in state_before.items():
        for name, tensor in entries.items():
            assert th.equal(tensor, state_after[key][name])
    assert model.logger.name_to_value["train/skipped_critic_steps"] == 1


def test_commit_refuses_non_finite_parameters():
    model = trained()
    view = model._actor_view
    before = view.flat()
    with pytest.raises(ValueError, match="non-finite"):
        view.commit(before * float("nan"))
    assert th.equal(view.flat(), before)


class InjectedError(Exception):
    pass


def fail_on_call(n: int):
    calls = {"count": 0}

    def maybe_fail() -> None:
        calls["count"] += 1
        if calls["count"] == n:
            raise InjectedError

    return maybe_fail


@pytest.mark.parametrize("error", [InjectedError, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["gradient forward", "fisher product 3", "line search trial", "critic step"])
def test_an_exception_anywhere_leaves_the_actor_old_or_accepted(monkeypatch, where, error):
    model = trained()
    view = model._actor_view
    old = view.flat()
    committed = []
    original_commit = ActorView.commit

    def recording_commit(self, theta):
        committed.append(theta.clone())
        original_commit(self, theta)

    monkeypatch.setattr(ActorView, "commit", recording_commit)

    def raising(original, on_call):
        counter = {"n": 0}

        def wrapper(*args, **kwargs):
            counter["n"] += 1
            if counter["n"] == on_call:
                raise error()
            return original(*args, **kwargs)

        return wrapper

    if where == "gradient forward":
        monkeypatch.setattr(ActorView, "evaluate", raising(ActorView.evaluate, 1))
    elif where == "fisher product 3":
        for product in (JacobianFisherProduct, MlpFisherProduct):  # whichever the policy uses
            monkeypatch.setattr(product, "__call__", raising(product.__call__, 3))
    elif where == "line search trial":
        monkeypatch.setattr(ActorView, "evaluate", raising(ActorView.evaluate, 2))  # 1: gradient, 2: first trial
    else:
        # the second epoch's shuffle: the critic regression (fast MLP path or general) is half done
        monkeypatch.setattr(th, "randperm", raising(th.randperm, 2))
    with pytest.raises(error):
        model.train()
    now = view.flat()
    if where == "critic step":
        # the policy step before it was accepted and committed: the interrupted critic step leaves it in place
        assert len(committed) == 1, "the policy step was not accepted: this case would test nothing"
        assert th.equal(now, committed[0])
        assert not th.equal(now, old)
    else:  # interrupted before the commit: the old policy, untouched
        assert committed == []
        assert th.equal(now, old)


def test_ctrl_c_during_the_commit_is_delivered_after_every_parameter_is_written(monkeypatch):
    model = trained()
    view = model._actor_view
    target = view.flat() + 0.01
    original_copy = th.Tensor.copy_
    copies = {"n": 0}

    def copy_and_interrupt(self, source, *args, **kwargs):
        copies["n"] += 1
        if copies["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between the second and third parameter
        return original_copy(self, source, *args, **kwargs)

    monkeypatch.setattr(th.Tensor, "copy_", copy_and_interrupt)
    with pytest.raises(KeyboardInterrupt):
        view.commit(target)
    monkeypatch.undo()
    assert copies["n"] == len(view.parameters) > 2
    assert th.equal(view.flat(), target)


def test_interrupts_deferred_restores_the_previous_handler():
    before = signal.getsignal(signal.SIGINT)
    with interrupts_deferred():
        pass
    assert signal.getsignal(signal.SIGINT) is before


def test_nan_candidates_are_rejected_not_committed(monkeypatch):
    model = trained()
    original = ActorView.evaluate

    def nan_candidates(self, theta, obs, actions, action_masks=None):
        result = original(self, theta, obs, actions, action_masks)
        if not theta.requires_grad:  # line-search candidates
            return result._replace(log_prob=result.log_prob * float("nan"))
        return result

    monkeypatch.setattr(ActorView, "evaluate", nan_candidates)
    before = model._actor_view.flat()
    model.train()
    assert model.logger.name_to_value["train/is_line_search_success"] == 0.0
    assert th.equal(model._actor_view.flat(), before)
    assert all_finite(model)


@pytest.mark.parametrize("space", list(ACTION_SPACES))
@pytest.mark.parametrize("fault", ["observation", "parameter"])
def test_non_finite_observations_or_parameters_raise_the_same_error_on_both_collection_paths(space, fault):
    messages = []
    for fast in (True, False):
        env = RandomEnv(BOX_OBS, ACTION_SPACES[space])
        if fault == "observation":
            env = Poisoned(env, "observation")
        model = TRPO("MlpPolicy", env, n_steps=64, batch_size=32, seed=0, fast_collection=fast)
        if fault == "parameter":
            with th.no_grad():
                model.policy.action_net.bias[0] = np.nan
        before = parameters(model)
        with pytest.raises(NonFiniteRolloutError) as error:
            model.learn(64)
        messages.append(str(error.value))
        if fault == "parameter":  # refused before the first step, as SB3's distributions refuse them
            assert model.num_timesteps == 0
        after = parameters(model)
        assert all(th.allclose(before[name], after[name], equal_nan=True, rtol=0, atol=0) for name in before)
    assert messages[0] == messages[1]
    assert ("observations" if fault == "observation" else "parameters") in messages[0]
