"""Exact tests of the numerics: KL, conjugate gradient, maximal step (Fisher products: test_fisher.py)."""

import math

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import StateDependentNoiseDistribution

from sb3_trpo.distributions import DistributionParams, Family, distribution_params, kl_divergence
from sb3_trpo.solvers import conjugate_gradient, max_step_size
from tests.helpers import ACTION_SPACES, reference_kl, sample_batch, tiny_policy, torch_distributions

POLICIES = {
    **{name: (space, {}) for name, space in ACTION_SPACES.items()},
    "gsde": (ACTION_SPACES["box"], {"use_sde": True}),
}


@pytest.mark.parametrize("name", list(POLICIES))
def test_kl_matches_torch_distributions_summed_over_dimensions(name):
    space, kwargs = POLICIES[name]
    policy = tiny_policy(space, **kwargs)
    other = tiny_policy(space, seed=1, **kwargs)
    obs, _ = sample_batch(policy)
    if isinstance(policy.action_dist, StateDependentNoiseDistribution):
        other.action_dist.sample_weights(other.log_std)
    with th.no_grad():
        old_params = distribution_params(policy.get_distribution(obs))
        new_params = distribution_params(other.get_distribution(obs))
        expected = reference_kl(torch_distributions(policy, obs), torch_distributions(other, obs))
    actual = kl_divergence(old_params, new_params)
    assert actual.shape == (len(obs),)
    th.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert kl_divergence(old_params, old_params).abs().max() < 1e-6


def test_gaussian_kl_is_summed_not_averaged():
    # two 3-D Gaussians differing in every dimension by the same amount: the KL is 3x the 1-D KL
    mean = th.zeros(1, 3)
    std = th.ones(1, 3)
    old = distribution_params_from(Family.GAUSSIAN, mean, std)
    new = distribution_params_from(Family.GAUSSIAN, mean + 0.1, std)
    assert kl_divergence(old, new).item() == pytest.approx(3 * 0.5 * 0.1**2, rel=1e-5)


def distribution_params_from(family, *tensors):
    return DistributionParams(family, tensors)


def random_spd(n: int, seed: int, condition: float = 100.0) -> th.Tensor:
    generator = th.Generator().manual_seed(seed)
    q, _ = th.linalg.qr(th.randn(n, n, generator=generator, dtype=th.float64))
    eigenvalues = th.logspace(0, math.log10(condition), n, dtype=th.float64)
    return q @ th.diag(eigenvalues) @ q.T


@pytest.mark.parametrize("seed", range(5))
def test_conjugate_gradient_matches_direct_solve(seed):
    n = 12
    a = random_spd(n, seed)
    b = th.randn(n, generator=th.Generator().manual_seed(100 + seed), dtype=th.float64)
    result = conjugate_gradient(lambda v: a @ v, b, max_iter=3 * n, residual_tol=1e-24)
    th.testing.assert_close(result.x, th.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
    assert result.residual_norm == pytest.approx(float(th.linalg.norm(b - a @ result.x)), abs=1e-8)


def test_conjugate_gradient_is_exact_in_n_steps_and_respects_max_iter():
    n = 6
    a = random_spd(n, 7, condition=10.0)
    b = th.ones(n, dtype=th.float64)
    exact = conjugate_gradient(lambda v: a @ v, b, max_iter=n, residual_tol=0.0)
    th.testing.assert_close(exact.x, th.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
    calls = []

    def counting(v):
        calls.append(1)
        return a @ v

    truncated = conjugate_gradient(counting, b, max_iter=2, residual_tol=0.0)
    assert truncated.n_iterations == 2 == len(calls)
    assert truncated.residual_norm > exact.residual_norm


def test_conjugate_gradient_stops_on_tiny_residual():
    a = th.eye(4, dtype=th.float64) * 2
    zero = conjugate_gradient(lambda v: a @ v, th.zeros(4, dtype=th.float64), max_iter=10)
    assert zero.n_iterations == 0
    assert th.count_nonzero(zero.x) == 0
    # a multiple of the identity is solved in one step, then the residual is zero
    one = conjugate_gradient(lambda v: a @ v, th.ones(4, dtype=th.float64), max_iter=10)
    assert one.n_iterations == 1
    th.testing.assert_close(one.x, th.full((4,), 0.5, dtype=th.float64))


def test_conjugate_gradient_stops_on_non_positive_curvature():
    a = -th.eye(3, dtype=th.float64)
    result = conjugate_gradient(lambda v: a @ v, th.ones(3, dtype=th.float64), max_iter=10)
    assert result.n_iterations == 1
    assert th.count_nonzero(result.x) == 0
    assert result.breakdown == pytest.approx(-3.0)
    nan = conjugate_gradient(lambda v: v * float("nan"), th.ones(3, dtype=th.float64), max_iter=10)
    assert nan.breakdown is not None
    assert math.isnan(nan.breakdown)
    assert conjugate_gradient(lambda v: 2 * v, th.ones(3, dtype=th.float64)).breakdown is None


def test_max_step_size_reaches_trust_region_radius():
    a = random_spd(5, 3)
    x = th.randn(5, generator=th.Generator().manual_seed(1), dtype=th.float64)
    beta = max_step_size(x, a @ x, max_kl=0.01)
    # the quadratic model ½ (βx)ᵀ A (βx) equals δ
    assert 0.5 * beta**2 * float(x @ a @ x) == pytest.approx(0.01, rel=1e-10)


@pytest.mark.parametrize("curvature", [0.0, -1.0, float("nan"), float("inf")])
def test_max_step_size_guards_bad_curvature(curvature):
    x = th.ones(1)
    assert max_step_size(x, th.tensor([curvature]), max_kl=0.01) == 0.0


def test_unsupported_distribution_is_refused():
    class Strange:
        pass

    with pytest.raises(TypeError, match="cannot constrain a Strange: the policy must produce one of Categorical"):
        distribution_params(Strange())


def test_box_space_for_numerics_is_multidimensional():
    # the Gaussian cases above are only telling if the actions have several dimensions
    assert isinstance(ACTION_SPACES["box"], spaces.Box)
    assert np.prod(ACTION_SPACES["box"].shape) > 1
