"""The line search's acceptance rule, alone and inside TRPO.train()."""

import math

import pytest
import torch as th

import sb3_trpo.policy_step
import sb3_trpo.solvers
from sb3_trpo import TRPO
from sb3_trpo.solvers import Trial, backtracking_line_search, is_acceptable
from tests.helpers import ACTION_SPACES, BOX_OBS, RandomEnv


class Recorder:
    """An ``evaluate`` for the line search that replays given trials and records the coefficients asked for."""

    def __init__(self, trials: list[Trial]) -> None:
        self.trials = trials
        self.coefficients: list[float] = []

    def __call__(self, coefficient: float) -> Trial:
        self.coefficients.append(coefficient)
        return self.trials[len(self.coefficients) - 1]


def test_coefficients_shrink_geometrically_and_first_acceptable_is_taken():
    trials = [Trial(1.0, 0.5), Trial(-1.0, 0.001), Trial(0.2, 0.009), Trial(0.3, 0.001)]
    recorder = Recorder(trials)
    result = backtracking_line_search(recorder, max_step=2.0, max_kl=0.01, shrinking_factor=0.5, max_iter=10)
    assert recorder.coefficients == [2.0, 1.0, 0.5]
    assert result.accepted
    assert result.step_coefficient == 0.5
    assert result.n_backtracks == 2
    assert result.trial == trials[2]


@pytest.mark.parametrize(
    "trial",
    [
        Trial(improvement=1.0, kl=0.0100001),  # KL above the radius
        Trial(improvement=0.0, kl=0.001),  # no improvement
        Trial(improvement=-1e-3, kl=0.001),  # worse
        Trial(improvement=math.nan, kl=0.001),
        Trial(improvement=1.0, kl=math.nan),
        Trial(improvement=math.inf, kl=0.001),
    ],
)
def test_never_accepts_a_step_breaking_the_rule(trial):
    assert not is_acceptable(trial, max_kl=0.01)
    recorder = Recorder([trial] * 15)
    result = backtracking_line_search(recorder, max_step=1.0, max_kl=0.01, shrinking_factor=0.5, max_iter=15)
    assert not result.accepted
    assert result.step_coefficient == 0.0
    assert result.trial is None
    assert result.n_backtracks == 15
    assert len(recorder.coefficients) == 15


def test_kl_exactly_at_the_radius_is_accepted():
    assert is_acceptable(Trial(improvement=1e-6, kl=0.01), max_kl=0.01)


def test_no_trial_without_a_positive_max_step():
    recorder = Recorder([])
    result = backtracking_line_search(recorder, max_step=0.0, max_kl=0.01)
    assert not result.accepted
    assert recorder.coefficients == []


def make_model(**kwargs) -> TRPO:
    env = RandomEnv(BOX_OBS, ACTION_SPACES["box"])
    kwargs.setdefault("n_steps", 64)
    kwargs.setdefault("batch_size", 32)
    return TRPO("MlpPolicy", env, seed=0, policy_kwargs=dict(net_arch=[8]), **kwargs)


def test_rejected_line_search_keeps_the_old_actor_exactly(monkeypatch):
    model = make_model()
    model.learn(64)  # one rollout and one update, to have a filled buffer
    monkeypatch.setattr(sb3_trpo.solvers, "is_acceptable", lambda trial, max_kl: False)
    before = {name: p.detach().clone() for name, p in model.policy.named_parameters()}
    model.train()
    after = dict(model.policy.named_parameters())
    actor_names = {name.removeprefix("policy.") for name in model._actor_view.names}
    assert actor_names, "no actor parameters were selected"
    for name in actor_names:
        assert th.equal(before[name], after[name]), f"actor parameter {name} moved on a rejected step"
    assert any(not th.equal(before[name], after[name]) for name in before.keys() - actor_names), "critic did not train"
    values = model.logger.name_to_value
    assert values["train/is_line_search_success"] == 0.0
    assert values["train/kl_divergence_loss"] == 0.0
    assert values["train/line_search_steps"] == model.line_search_max_iter


def test_accepted_step_is_the_searched_step(monkeypatch):
    """The committed parameters are θ_old + coefficient · x for the accepted coefficient, nothing else."""
    model = make_model(n_critic_updates=0)
    model.learn(64)
    captured = {}
    original = sb3_trpo.policy_step.conjugate_gradient

    def capture_cg(*args, **kwargs):
        captured["cg"] = original(*args, **kwargs)
        return captured["cg"]

    monkeypatch.setattr(sb3_trpo.policy_step, "conjugate_gradient", capture_cg)
    view = model._actor_view
    theta_old = view.flat()
    model.train()
    values = model.logger.name_to_value
    assert values["train/is_line_search_success"] == 1.0
    expected = theta_old + values["train/step_size"] * captured["cg"].x
    th.testing.assert_close(view.flat(), expected)
