"""The step ``train()`` takes, against an independent computation of the TRPO step on a tiny network.

The reference is written out here in float64 from the equations of Schulman et al. 2015 (Appendix C), sharing
no code with sb3_trpo: the policy's forward pass by hand, the Fisher matrix as the explicit Hessian of the mean
KL (``torch.autograd.functional.hessian``, KL by ``torch.distributions``), ``x`` by a direct solve of
``(F + λI) x = g``, ``β = sqrt(2δ / xᵀ(F + λI)x)``, and the first ``k`` with ``β · shrinkᵏ`` that improves the
surrogate and keeps the KL within δ. ``train()`` must take exactly ``Δθ = β · shrinkᵏ · x`` (to float32
rounding) and log that ``k``; plain gradient ascent under the same line search, or a wrong damping, must not.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch as th
from stable_baselines3.common.logger import Logger

import sb3_trpo.actor
import sb3_trpo.policy_step
from sb3_trpo import TRPO
from sb3_trpo.solvers import CGResult
from tests.helpers import ACTION_SPACES, BOX_OBS, RandomEnv

N_STEPS = 64
SHRINK = 0.5
MAX_ITER = 15


class Reference(NamedTuple):
    delta: th.Tensor  # the accepted change of the flat actor parameters
    k: int  # the accepted line-search step
    beta: float


def _actor_tensors(model: TRPO) -> list[th.Tensor]:
    """The actor's parameters, picked by hand: hidden layer, distribution head, and log-std for Box actions."""
    policy = model.policy
    tensors = [*policy.mlp_extractor.policy_net.parameters(), *policy.action_net.parameters()]
    if hasattr(policy, "log_std"):
        tensors.append(policy.log_std)
    return tensors


def _flat(tensors: list[th.Tensor]) -> th.Tensor:
    return th.cat([t.detach().reshape(-1) for t in tensors]).double()


def _rollout(model: TRPO) -> None:
    """Collect one rollout into the model's buffer, as ``learn()`` would before its first ``train()``."""
    _, callback = model._setup_learn(N_STEPS)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, N_STEPS)
    model.set_logger(Logger(folder=None, output_formats=[]))


class Problem(NamedTuple):
    g: th.Tensor  # gradient of the surrogate at the old parameters
    damped_fisher: th.Tensor  # F + λI, explicitly
    surrogate: Callable[[th.Tensor], th.Tensor]
    mean_kl: Callable[[th.Tensor], th.Tensor]  # mean over states of KL(π_old ‖ π_θ)
    theta_old: th.Tensor


def _reference_problem(model: TRPO, damping: float) -> Problem:
    """The surrogate, the KL and their derivatives on the model's rollout, in float64 from the equations alone."""
    buffer = model.rollout_buffer
    obs = th.as_tensor(buffer.observations.reshape(N_STEPS, -1), dtype=th.float64)
    discrete = isinstance(model.action_space, type(ACTION_SPACES["discrete"]))
    actions = th.as_tensor(buffer.actions.reshape(N_STEPS, -1), dtype=th.float64)
    advantages = th.as_tensor(buffer.advantages.reshape(-1), dtype=th.float64)
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    shapes = [t.shape for t in _actor_tensors(model)]
    theta_old = _flat(_actor_tensors(model))

    def distribution(theta: th.Tensor) -> th.distributions.Distribution:
        parts, start = [], 0
        for shape in shapes:
            parts.append(theta[start : start + shape.numel()].reshape(shape))
            start += shape.numel()
        hidden = th.tanh(obs @ parts[0].T + parts[1])  # SB3's default MLP activation for TRPO: tanh
        out = hidden @ parts[2].T + parts[3]
        if discrete:
            return th.distributions.Categorical(logits=out)
        return th.distributions.Normal(out, parts[4].exp().expand_as(out))

    def log_prob(theta: th.Tensor) -> th.Tensor:
        dist = distribution(theta)
        return dist.log_prob(actions[:, 0].long()) if discrete else dist.log_prob(actions).sum(-1)

    old = distribution(theta_old)
    old_log_prob = log_prob(theta_old).detach()

    def surrogate(theta: th.Tensor) -> th.Tensor:
        return (th.exp(log_prob(theta) - old_log_prob) * advantages).mean()

    def mean_kl(theta: th.Tensor) -> th.Tensor:
        kl = th.distributions.kl_divergence(old, distribution(theta))
        return (kl if discrete else kl.sum(-1)).mean()

    g = th.autograd.functional.jacobian(surrogate, theta_old)
    fisher = th.autograd.functional.hessian(mean_kl, theta_old)
    damped = fisher + damping * th.eye(len(theta_old), dtype=th.float64)
    return Problem(g, damped, surrogate, mean_kl, theta_old)


def _reference_step(model: TRPO, target_kl: float, damping: float) -> Reference:
    """The TRPO step: ``x`` solved directly, scaled by ``β``, then the first acceptable ``β · shrinkᵏ · x``."""
    g, damped, surrogate, mean_kl, theta_old = _reference_problem(model, damping)
    x = th.linalg.solve(damped, g)
    beta = float(th.sqrt(2 * target_kl / (x @ damped @ x)))
    old_surrogate = float(surrogate(theta_old))
    with th.no_grad():
        for k in range(MAX_ITER):
            delta = beta * SHRINK**k * x
            if float(surrogate(theta_old + delta)) - old_surrogate > 0 and float(mean_kl(theta_old + delta)) <= target_kl:
                return Reference(delta, k, beta)
    raise AssertionError("the reference line search accepted no step: choose another case")


def _model(space_name: str, target_kl: float, damping: float, seed: int) -> TRPO:
    return TRPO(
        "MlpPolicy",
        RandomEnv(BOX_OBS, ACTION_SPACES[space_name]),
        n_steps=N_STEPS,
        batch_size=N_STEPS,
        n_critic_updates=1,
        target_kl=target_kl,
        cg_damping=damping,
        cg_max_steps=200,  # run to convergence (the actor has 41 parameters at most)
        line_search_shrinking_factor=SHRINK,
        line_search_max_iter=MAX_ITER,
        policy_kwargs=dict(net_arch=dict(pi=[5], vf=[4]), log_std_init=-0.3),
        seed=seed,
    )


def _step_error(space_name: str, target_kl: float, damping: float, seed: int) -> tuple[float, int, Reference]:
    """:return: ``‖Δθ − β·shrinkᵏ·x‖ / ‖β·shrinkᵏ·x‖`` for the step ``train()`` took, the logged k, the reference"""
    model = _model(space_name, target_kl, damping, seed)
    _rollout(model)
    reference = _reference_step(model, target_kl, damping)
    before = _flat(_actor_tensors(model))
    model.train()
    delta = _flat(_actor_tensors(model)) - before
    error = float((delta - reference.delta).norm() / reference.delta.norm())
    return error, int(model.logger.name_to_value["train/line_search_steps"]), reference


# (action space, target_kl, cg_damping, seed, whether the first step is rejected), the last found by the reference
CASES = [
    ("discrete", 0.01, 0.1, 0, False),
    ("discrete", 0.3, 0.001, 1, True),  # a small damping: β overshoots the real KL, the search backtracks
    ("box", 0.01, 0.1, 0, False),
    ("box", 0.3, 0.1, 1, True),
]


@pytest.mark.parametrize(("space_name", "target_kl", "damping", "seed", "backtracks"), CASES)
def test_the_accepted_step_is_the_scaled_natural_gradient(space_name, target_kl, damping, seed, backtracks):
    error, logged_k, reference = _step_error(space_name, target_kl, damping, seed)
    assert error < 1e-3, f"relative error {error:.2e} of the step (reference k={reference.k}, β={reference.beta:.3g})"
    assert logged_k == reference.k
    assert (reference.k > 0) == backtracks  # the cases keep checking both the full step and the shrinking


@pytest.mark.parametrize("cg_steps", [1, 2, 3])
@pytest.mark.parametrize("space_name", ["discrete", "box"])
def test_the_logged_cg_residual_is_the_relative_residual_of_the_direction(space_name, cg_steps):
    model = _model(space_name, 0.01, 0.1, 0)
    model.cg_max_steps = cg_steps
    _rollout(model)
    g, damped, *_ = _reference_problem(model, 0.1)
    # after k steps from 0, CG's iterate minimizes the (F + λI)-norm error over the Krylov space
    # span{g, Ag, ..., Aᵏ⁻¹g}: x_k = K (Kᵀ A K)⁻¹ Kᵀ g (Nocedal & Wright, Theorem 5.2)
    krylov = th.stack([th.linalg.matrix_power(damped, i) @ g for i in range(cg_steps)], dim=1)
    x = krylov @ th.linalg.solve(krylov.T @ damped @ krylov, krylov.T @ g)
    expected = float((g - damped @ x).norm() / g.norm())
    model.train()
    logged = model.logger.name_to_value["train/cg_residual"]
    assert logged == pytest.approx(expected, rel=1e-3)
    assert expected > 1e-3  # a residual that is really there, not the trivial 0 of a converged solve


def _gradient_instead_of_cg(matvec: Callable[[th.Tensor], th.Tensor], b: th.Tensor, **_: Any) -> CGResult:
    """A broken solver: x = g (plain gradient ascent, scaled and line-searched as TRPO's step)."""
    return CGResult(x=b, a_x=matvec(b), residual_norm=0.0, n_iterations=1)


class _TenfoldDamping(sb3_trpo.policy_step.JacobianFisherProduct):
    """A broken Fisher product: ten times the configured damping."""

    def __init__(self, *args: Any, damping: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, damping=10 * damping, **kwargs)


def _tenfold_damping_mlp(actor: Any, obs: Any, damping: float, action_masks: Any = None) -> Any:
    """The written-out MLP Fisher product, broken the same way."""
    return sb3_trpo.actor.mlp_fisher_product(actor, obs, 10 * damping, action_masks)


@pytest.mark.parametrize(
    "mutant",
    [
        [("conjugate_gradient", _gradient_instead_of_cg)],
        # both Fisher products (the MLP actor here uses the written-out one)
        [("JacobianFisherProduct", _TenfoldDamping), ("mlp_fisher_product", _tenfold_damping_mlp)],
    ],
    ids=["gradient-ascent", "wrong-damping"],
)
@pytest.mark.parametrize("space_name", ["discrete", "box"])
def test_a_broken_step_fails_the_comparison(space_name, mutant, monkeypatch):
    for name, replacement in mutant:
        monkeypatch.setattr(sb3_trpo.policy_step, name, replacement)
    error, _, _ = _step_error(space_name, 0.01, 0.1, 0)
    assert error > 0.05
