"""Property-based tests (hypothesis) of the numerics: CG, the Fisher product, the line search's rule."""

import itertools
import math

import torch as th
from hypothesis import given, settings
from hypothesis import strategies as st

from sb3_trpo.actor import ActorView, mlp_fisher_product
from sb3_trpo.fisher import JacobianFisherProduct
from sb3_trpo.solvers import Trial, backtracking_line_search, conjugate_gradient, is_acceptable
from tests.helpers import ACTION_SPACES, sample_batch, tiny_policy


def spd(n: int, seed: int, log_condition: float) -> tuple[th.Tensor, th.Tensor]:
    generator = th.Generator().manual_seed(seed)
    q, _ = th.linalg.qr(th.randn(n, n, generator=generator, dtype=th.float64))
    a = q @ th.diag(th.logspace(0, log_condition, n, dtype=th.float64)) @ q.T
    return (a + a.T) / 2, th.randn(n, generator=generator, dtype=th.float64)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 2**31 - 1), log_condition=st.floats(0.0, 4.0))
def test_cg_solves_random_spd_systems(n, seed, log_condition):
    a, b = spd(n, seed, log_condition)
    result = conjugate_gradient(lambda v: a @ v, b, max_iter=4 * n, residual_tol=1e-28)
    exact = th.linalg.solve(a, b)
    assert th.linalg.norm(result.x - exact) <= 1e-6 * (1 + th.linalg.norm(exact))
    th.testing.assert_close(result.a_x, a @ result.x, rtol=1e-8, atol=1e-8)
    assert result.breakdown is None


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 10), seed=st.integers(0, 2**31 - 1), log_condition=st.floats(0.0, 3.0))
def test_cg_error_in_the_a_norm_never_grows(n, seed, log_condition):
    a, b = spd(n, seed, log_condition)
    exact = th.linalg.solve(a, b)
    errors = []
    for k in range(1, n + 1):
        e = conjugate_gradient(lambda v: a @ v, b, max_iter=k, residual_tol=0.0).x - exact
        errors.append(float(e @ a @ e))
    assert all(later <= earlier * (1 + 1e-6) + 1e-12 for earlier, later in itertools.pairwise(errors))


@settings(max_examples=30, deadline=None)
@given(space=st.sampled_from(sorted(ACTION_SPACES)), seed=st.integers(0, 10_000), n=st.integers(1, 24))
def test_fisher_product_is_symmetric_and_positive_semidefinite(space, seed, n):
    policy = tiny_policy(ACTION_SPACES[space], seed=seed)
    obs, actions = sample_batch(policy, n=n, seed=seed)
    actor = ActorView(policy, obs)
    theta = actor.flat().requires_grad_(True)
    written_out = mlp_fisher_product(actor, obs, damping=0.0)
    assert written_out is not None
    for fisher in (JacobianFisherProduct(theta, actor.evaluate(theta, obs, actions).params, damping=0.0), written_out):
        generator = th.Generator().manual_seed(seed)
        v, w = th.randn(actor.size, generator=generator), th.randn(actor.size, generator=generator)
        fv, fw = fisher(v), fisher(w)
        scale = float(fv.norm() * w.norm() + fw.norm() * v.norm()) + 1e-12
        assert abs(float(w @ fv) - float(v @ fw)) <= 1e-4 * scale
        assert float(v @ fv) >= -1e-5 * float(fv.norm() * v.norm() + 1e-12)


special = st.sampled_from([math.nan, math.inf, -math.inf, 0.0])
values = st.one_of(st.floats(-1.0, 1.0), special)


@settings(max_examples=300, deadline=None)
@given(
    trials=st.lists(st.tuples(values, st.one_of(st.floats(0.0, 0.05), special)), min_size=1, max_size=15),
    max_step=st.floats(1e-6, 10.0),
    shrink=st.floats(0.05, 0.95),
    max_kl=st.floats(1e-4, 0.05),
)
def test_line_search_accepts_exactly_the_first_step_meeting_the_rule(trials, max_step, shrink, max_kl):
    asked: list[float] = []

    def evaluate(coefficient: float) -> Trial:
        asked.append(coefficient)
        improvement, kl = trials[len(asked) - 1]
        return Trial(improvement, kl)

    result = backtracking_line_search(evaluate, max_step, max_kl, shrinking_factor=shrink, max_iter=len(trials))
    # the rule, stated independently: finite, strictly better surrogate, KL within the region
    good = [i for i, (imp, kl) in enumerate(trials) if math.isfinite(imp) and math.isfinite(kl) and imp > 0 and kl <= max_kl]
    if good:
        k = good[0]
        assert result.accepted
        assert result.n_backtracks == k
        assert result.step_coefficient == asked[k]
        assert math.isclose(result.step_coefficient, max_step * shrink**k, rel_tol=1e-9)
        assert is_acceptable(result.trial, max_kl)
        assert len(asked) == k + 1  # nothing is evaluated after the accepted step
    else:
        assert not result.accepted
        assert result.step_coefficient == 0.0
        assert len(asked) == len(trials)
