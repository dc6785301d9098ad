"""The numerics of one trust-region step, as small pure functions over flat tensors.

Schulman et al. 2015, "Trust Region Policy Optimization" (https://arxiv.org/abs/1502.05477), Appendix C:
solve ``F x = g`` approximately with conjugate gradient, scale ``x`` so that the quadratic model of the KL
reaches the trust-region radius, then backtrack along that direction until the real surrogate improves and
the real KL stays inside the region.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch as th


class CGResult(NamedTuple):
    """Outcome of :func:`conjugate_gradient`.

    :param x: the approximate solution of ``A x = b``
    :param a_x: ``A x``, accumulated along the iteration (so the caller needs no extra product)
    :param residual_norm: ``||b - A x||`` as tracked by the iteration
    :param n_iterations: matrix-vector products used
    :param breakdown: the curvature ``pᵀAp`` that stopped the iteration when it was not positive and finite
        (``None`` if the iteration ended normally)
    """

    x: th.Tensor
    a_x: th.Tensor
    residual_norm: float
    n_iterations: int
    breakdown: float | None = None


def conjugate_gradient(
    matvec: Callable[[th.Tensor], th.Tensor],
    b: th.Tensor,
    max_iter: int = 10,
    residual_tol: float = 1e-10,
) -> CGResult:
    """Approximately solve ``A x = b`` for a symmetric positive-definite ``A`` known only through ``matvec``.

    Starts from ``x = 0`` and stops after ``max_iter`` products, or as soon as the squared residual norm is
    below ``residual_tol``. A direction of non-positive or non-finite curvature ends the iteration early
    (``A`` is only approximately SPD in float arithmetic), keeping the last good iterate.

    :param matvec: ``v -> A v``
    :param b: right-hand side, a flat vector
    :param max_iter: maximum number of matrix-vector products
    :param residual_tol: threshold on ``||r||²`` for stopping early
    :return: solution, residual norm and iteration count
    """
    x = th.zeros_like(b)
    a_x = th.zeros_like(b)
    r = b.clone()
    p = b.clone()
    r_dot_r = float(r @ r)
    n_iterations = 0
    breakdown = None
    while n_iterations < max_iter and r_dot_r > residual_tol:
        a_p = matvec(p)
        n_iterations += 1
        curvature = float(p @ a_p)
        if not math.isfinite(curvature) or curvature <= 0.0:
            breakdown = curvature
            break
        alpha = r_dot_r / curvature
        x = x + alpha * p
        a_x = a_x + alpha * a_p
        r = r - alpha * a_p
        new_r_dot_r = float(r @ r)
        p = r + (new_r_dot_r / r_dot_r) * p
        r_dot_r = new_r_dot_r
    residual_norm = math.sqrt(r_dot_r) if math.isfinite(r_dot_r) else math.inf
    return CGResult(x=x, a_x=a_x, residual_norm=residual_norm, n_iterations=n_iterations, breakdown=breakdown)


def max_step_size(direction: th.Tensor, matvec_direction: th.Tensor, max_kl: float) -> float:
    """Largest multiple ``β`` of ``direction`` allowed by the quadratic model of the KL.

    With ``KL(θ + βx) ≈ ½ β² xᵀFx``, setting it equal to ``max_kl`` gives ``β = sqrt(2 δ / xᵀFx)``
    (TRPO paper, Appendix C).

    :param direction: the search direction ``x``
    :param matvec_direction: ``F x``
    :param max_kl: the trust-region radius ``δ``
    :return: ``β``, or ``0.0`` when the curvature ``xᵀFx`` is not positive and finite (no safe step exists)
    """
    curvature = float(direction @ matvec_direction)
    if not math.isfinite(curvature) or curvature <= 0.0:
        return 0.0
    step = math.sqrt(2.0 * max_kl / curvature)
    return step if math.isfinite(step) else 0.0


class Trial(NamedTuple):
    """What the line search needs to know about one candidate step.

    :param improvement: surrogate at the candidate minus surrogate at the old parameters
    :param kl: mean KL(old || candidate) over the states
    """

    improvement: float
    kl: float


class LineSearchResult(NamedTuple):
    """Outcome of :func:`backtracking_line_search`.

    :param accepted: whether some step met the acceptance rule
    :param step_coefficient: multiple of the direction that was accepted (``0.0`` if none)
    :param n_backtracks: how many times the step was shrunk (``max_iter`` if none was accepted)
    :param trial: the accepted trial, or ``None``
    """

    accepted: bool
    step_coefficient: float
    n_backtracks: int
    trial: Trial | None


def is_acceptable(trial: Trial, max_kl: float) -> bool:
    """The acceptance rule: the surrogate strictly improves and the KL stays within the trust region.

    Non-finite values are never acceptable.

    :param trial: the candidate's improvement and KL
    :param max_kl: the trust-region radius ``δ``
    """
    return math.isfinite(trial.improvement) and math.isfinite(trial.kl) and trial.improvement > 0.0 and trial.kl <= max_kl


def backtracking_line_search(
    evaluate: Callable[[float], Trial],
    max_step: float,
    max_kl: float,
    shrinking_factor: float = 0.5,
    max_iter: int = 15,
) -> LineSearchResult:
    """Try the steps ``max_step · shrinking_factor^k`` for ``k = 0 … max_iter - 1`` and accept the first that
    satisfies :func:`is_acceptable`.

    :param evaluate: ``coefficient -> Trial`` for the candidate ``θ_old + coefficient · x``
    :param max_step: the first coefficient tried (``β``)
    :param max_kl: the trust-region radius ``δ``
    :param shrinking_factor: factor in (0, 1) applied after each rejected trial
    :param max_iter: number of trials
    :return: which step was accepted, if any
    """
    coefficient = max_step
    if max_step > 0.0:
        for k in range(max_iter):
            trial = evaluate(coefficient)
            if is_acceptable(trial, max_kl):
                return LineSearchResult(accepted=True, step_coefficient=coefficient, n_backtracks=k, trial=trial)
            coefficient *= shrinking_factor
    return LineSearchResult(accepted=False, step_coefficient=0.0, n_backtracks=max_iter, trial=None)
