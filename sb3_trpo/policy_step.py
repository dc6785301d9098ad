"""The trust-region policy step, shared by TRPO, MaskableTRPO and RecurrentTRPO.

One step over one batch: gradient of the surrogate → conjugate gradient on the Fisher-vector product → largest step
of the quadratic KL model → backtracking line search on the real surrogate and KL → one commit of the accepted
parameters (TRPO paper, Section 6 and Appendix C). It knows nothing of how the batch was collected: an *evaluator*
gives the action distributions of the batch at any actor parameters θ, the Fisher-vector product at the old ones,
and, for batches with padding (sequences of a recurrent policy), the weight of every row.

Means over the batch are weighted means when the evaluator has weights: a padded row (weight 0) counts in no
surrogate, KL, entropy or Fisher matrix. In data-parallel training each rank's means are scaled by its share of the
global weight, so that the means over ranks are the means over all real rows of all ranks.
"""

import math
from typing import NamedTuple, Protocol

import torch as th
from stable_baselines3.common.type_aliases import PyTorchObs

from sb3_trpo.actor import ActorView, PolicyEvaluation, RecurrentContext, mlp_fisher_product
from sb3_trpo.distributed import Replica
from sb3_trpo.distributions import kl_divergence
from sb3_trpo.fisher import FisherProduct, JacobianFisherProduct
from sb3_trpo.observations import index_obs
from sb3_trpo.solvers import Trial, backtracking_line_search, conjugate_gradient, max_step_size

__all__ = ["Evaluator", "FeedForwardEvaluator", "PolicyStepResult", "StepSettings", "trust_region_step", "weighted_mean"]


class RolloutBatch(NamedTuple):
    """The whole rollout buffer as tensors on the device, ready for one update.

    :param observations: observations (tensor or dict of tensors)
    :param actions: actions in the shape the distribution's ``log_prob`` expects
    :param old_log_prob: log-probabilities of the actions under the policy that collected them
    :param advantages: GAE advantages, normalized if requested
    :param returns: regression targets of the critic
    :param old_values: the critic's predictions at collection time, for the same states as ``returns``
    :param action_masks: the valid actions of each state when the rollout was collected with masks
        (:class:`~sb3_trpo.maskable.MaskableTRPO`), ``None`` otherwise
    :param context: for a recurrent policy (:class:`~sb3_trpo.recurrent.RecurrentTRPO`), the LSTM states at the start
        of each sequence and the episode starts; ``None`` otherwise
    :param weights: 1 for a real step, 0 for padding (sequences of a recurrent policy); ``None``: no padding
    """

    observations: PyTorchObs
    actions: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    old_values: th.Tensor
    action_masks: th.Tensor | None = None
    context: RecurrentContext | None = None
    weights: th.Tensor | None = None


class StepSettings(NamedTuple):
    """The algorithm's settings of one policy step.

    :param target_kl: the trust-region radius δ of this update (0: no step)
    :param cg_max_steps: conjugate-gradient iterations (Fisher-vector products)
    :param line_search_shrinking_factor: factor by which each backtrack shrinks the step
    :param line_search_max_iter: candidates the line search tries at most
    """

    target_kl: float
    cg_max_steps: int
    line_search_shrinking_factor: float
    line_search_max_iter: int


class PolicyStepResult(NamedTuple):
    """Diagnostics of one trust-region policy step (the documentation's "The algorithm" page explains each: docs/algorithm.md).

    :param policy_objective: surrogate at the new parameters (the old ones if the step was rejected)
    :param kl_divergence: mean KL(old || new) of the accepted step, 0 if rejected
    :param accepted: whether the line search accepted a step
    :param surrogate_improvement: actual surrogate change, 0 if rejected
    :param expected_improvement: first-order prediction ``g · Δθ`` of the accepted step, 0 if rejected
    :param line_search_steps: number of backtracks taken
    :param step_size: multiple of the natural-gradient direction that was applied, 0 if rejected
    :param cg_residual: ``||g - (F + λI) x|| / ||g||`` after conjugate gradient
    :param entropy: mean entropy of the policy after the step
    :param skip_reason: why a numerical fault made the step meaningless (the policy is unchanged), or ``None``
    """

    policy_objective: float
    kl_divergence: float
    accepted: bool
    surrogate_improvement: float
    expected_improvement: float
    line_search_steps: int
    step_size: float
    cg_residual: float
    entropy: float
    skip_reason: str | None = None

    @classmethod
    def unchanged(
        cls, objective: float, line_search_steps: int, cg_residual: float, entropy: float, skip_reason: str | None = None
    ) -> "PolicyStepResult":
        """The diagnostics of a step that kept the old policy."""
        return cls(
            policy_objective=objective,
            kl_divergence=0.0,
            accepted=False,
            surrogate_improvement=0.0,
            expected_improvement=0.0,
            line_search_steps=line_search_steps,
            step_size=0.0,
            cg_residual=cg_residual,
            entropy=entropy,
            skip_reason=skip_reason,
        )


class Evaluator(Protocol):
    """The batch of one policy step, as the step sees it.

    ``actor`` holds the parameters; ``weights`` (``None``: every row counts once) weigh the rows in every mean.
    """

    actor: ActorView
    weights: th.Tensor | None

    @property
    def needs_graph(self) -> bool:
        """Whether :meth:`fisher_product` runs on the graph of the gradient's forward pass (which is then kept)."""
        ...

    def evaluate(self, theta: th.Tensor) -> PolicyEvaluation:
        """The action distributions of the batch, and the log-probabilities of its actions, at actor parameters θ."""
        ...

    def fisher_product(self, theta: th.Tensor, current: PolicyEvaluation) -> FisherProduct:
        """``v ↦ (F + λI) v`` of this process's batch at the old parameters.

        :param theta: the leaf θ of ``current``'s graph
        :param current: :meth:`evaluate` at θ with its graph (kept if :attr:`needs_graph`)
        """
        ...


def weighted_mean(values: th.Tensor, weights: th.Tensor | None) -> th.Tensor:
    """:return: the mean of ``values`` over rows with ``weights`` (the plain mean without); rows of weight 0 are left
    out whatever they hold (selected away, not multiplied by 0: ``inf · 0`` is NaN)"""
    if weights is None:
        return values.mean()
    return th.where(weights > 0, values * weights, 0.0).sum() / weights.sum()


class FeedForwardEvaluator:
    """The evaluator of a flat rollout batch (TRPO, MaskableTRPO): every row a state, no padding.

    The Fisher matrix may be estimated on every k-th state ("cheap Fisher", Schulman's thesis pp. 40-42); for SB3's
    MLP actor its products are written out, otherwise they run on autograd's graph.

    :param actor: the actor view
    :param obs: the batch's observations
    :param actions: its actions
    :param action_masks: its action masks (``None``: no masking)
    :param sub_sampling_factor: ``k``
    :param damping: λ
    """

    weights: th.Tensor | None = None

    def __init__(
        self,
        actor: ActorView,
        obs: PyTorchObs,
        actions: th.Tensor,
        action_masks: th.Tensor | None,
        sub_sampling_factor: int,
        damping: float,
    ) -> None:
        self.actor = actor
        self._obs, self._actions, self._masks = obs, actions, action_masks
        self._damping = damping
        self._fisher_rows = slice(None, None, sub_sampling_factor)
        self._sub_sampled = sub_sampling_factor > 1
        self._fisher_obs = index_obs(obs, self._fisher_rows) if self._sub_sampled else obs
        self._fisher_masks = None if action_masks is None else action_masks[self._fisher_rows]
        # prepared before the gradient, so that its forward pass need not keep its graph
        self._written_out = mlp_fisher_product(actor, self._fisher_obs, damping, self._fisher_masks)

    @property
    def needs_graph(self) -> bool:
        return self._written_out is None and not self._sub_sampled

    def evaluate(self, theta: th.Tensor) -> PolicyEvaluation:
        return self.actor.evaluate(theta, self._obs, self._actions, self._masks)

    def fisher_product(self, theta: th.Tensor, current: PolicyEvaluation) -> FisherProduct:
        if self._written_out is not None:
            return self._written_out
        if not self._sub_sampled:
            return JacobianFisherProduct(theta, current.params, damping=self._damping)
        # a forward pass on the sub-sampled states
        fisher_theta = theta.detach().clone().requires_grad_(True)
        actions = self._actions[self._fisher_rows]
        fisher_params = self.actor.evaluate(fisher_theta, self._fisher_obs, actions, self._fisher_masks).params
        return JacobianFisherProduct(fisher_theta, fisher_params, damping=self._damping)


def _entropy(evaluation: PolicyEvaluation, weights: th.Tensor | None) -> th.Tensor:
    """Mean entropy of this process's batch; for tanh-squashed Gaussians (no closed form) the estimate -log π(a|s)."""
    entropy = evaluation.entropy if evaluation.entropy is not None else -evaluation.log_prob
    return weighted_mean(entropy.detach(), weights)


def trust_region_step(
    evaluator: Evaluator,
    old_log_prob: th.Tensor,
    advantages: th.Tensor,
    settings: StepSettings,
    replica: Replica,
) -> PolicyStepResult:
    """One trust-region step: gradient → conjugate gradient → max step → line search → commit.

    The actor's parameters change only in the final commit, and only if a step was accepted. A numerical fault
    (non-finite gradient, Fisher product or solution, non-positive curvature) keeps the old policy and says why in
    :attr:`PolicyStepResult.skip_reason`.

    :param evaluator: the batch
    :param old_log_prob: log-probabilities of the batch's actions under the policy that collected them
    :param advantages: their advantages (normalized if asked for)
    :param settings: the step's settings
    :param replica: this process's data-parallel context (every rank takes the same step)
    """
    actor, weights, device = evaluator.actor, evaluator.weights, old_log_prob.device
    theta_old = actor.flat()
    # data parallel with weighted batches: this rank's means count with its share of the weight of all ranks (the
    # recurrent rollouts of equal size hold equal numbers of real steps, so the share is 1 there; it is what keeps
    # the means global for batches whose weights differ between ranks)
    share = 1.0
    if weights is not None and replica.is_distributed:
        own = float(weights.sum())
        (total,) = replica.sum_of_floats([own], device)
        share = own * replica.world_size / total

    real = None if weights is None else weights > 0
    if real is not None:  # a padded row's advantage is whatever the buffer left there: none enters the surrogate
        advantages = th.where(real, advantages, 0.0)

    def surrogate(log_prob: th.Tensor) -> th.Tensor:
        # L(θ) = E[π_θ(a|s) / π_old(a|s) · A] (TRPO paper, eq. 14)
        log_ratio = log_prob - old_log_prob
        if real is not None:
            # a padded row's ratio is taken as 1 before the exponential: its stored log-probability and action are
            # padding (sb3-contrib pads them with 0), and exp of their difference may overflow to inf, whose
            # gradient (inf · 0) would be NaN even where the mean selects the row away
            log_ratio = th.where(real, log_ratio, 0.0)
        return weighted_mean(th.exp(log_ratio) * advantages, weights)

    # 1. gradient of the surrogate w.r.t. the actor parameters; the forward pass is kept for the Fisher product
    theta = theta_old.clone().requires_grad_(True)
    current = evaluator.evaluate(theta)
    objective = surrogate(current.log_prob)
    (gradient,) = th.autograd.grad(objective, theta, retain_graph=evaluator.needs_graph)
    # data parallel: the global surrogate, its gradient and the entropy are the means over ranks (one all-reduce)
    local = th.cat([gradient, objective.detach().reshape(1), _entropy(current, weights).reshape(1).to(gradient.dtype)])
    reduced = replica.mean(local if share == 1.0 else share * local)
    gradient, old_objective, old_entropy = reduced[:-2], reduced[-2].item(), reduced[-1].item()
    old_params = current.params.detach()
    if not math.isfinite(old_objective) or not bool(th.isfinite(gradient).all()):
        return PolicyStepResult.unchanged(
            old_objective, 0, math.nan, old_entropy, "the surrogate or its gradient is not finite"
        )
    if settings.target_kl == 0.0:  # a schedule that reached 0: no step, as asked (not a skipped step)
        return PolicyStepResult.unchanged(old_objective, 0, math.nan, old_entropy)

    # 2. natural-gradient direction x ≈ (F + λI)⁻¹ g
    local_fisher = evaluator.fisher_product(theta, current)
    if share != 1.0:
        unscaled = local_fisher
        local_fisher = lambda vector: share * unscaled(vector)  # noqa: E731
    # data parallel: the Fisher matrix of the global batch is the mean of the ranks' (weighted by their shares)
    fisher_product = replica.averaged(local_fisher)
    cg = conjugate_gradient(fisher_product, gradient, max_iter=settings.cg_max_steps)
    del fisher_product, local_fisher, current  # free the retained graph before the line search
    gradient_norm = gradient.norm().item()
    cg_residual = cg.residual_norm / gradient_norm if gradient_norm > 0 else 0.0
    if cg.n_iterations == 0 and cg.breakdown is None:
        # the gradient is already below conjugate gradient's tolerance (a converged policy, advantages near 0): there
        # is no direction to step in, which is no numerical fault (its curvature would underflow to 0)
        return PolicyStepResult.unchanged(old_objective, 0, cg_residual, old_entropy)

    # 3. largest step whose quadratic KL model reaches the trust-region radius
    if cg.breakdown is not None and not math.isfinite(cg.breakdown):
        reason = f"the Fisher-vector product is not finite (pᵀ(F + λI)p = {cg.breakdown})"
        return PolicyStepResult.unchanged(old_objective, 0, math.nan, old_entropy, reason)
    if not bool(th.isfinite(cg.x).all()) or not bool(th.isfinite(cg.a_x).all()):
        return PolicyStepResult.unchanged(
            old_objective, 0, math.nan, old_entropy, "the conjugate-gradient solution is not finite"
        )
    max_step = max_step_size(cg.x, cg.a_x, settings.target_kl)
    if max_step == 0.0 and gradient_norm > 0:
        reason = f"the curvature xᵀ(F + λI)x = {float(cg.x @ cg.a_x):.3g} is not positive and finite"
        return PolicyStepResult.unchanged(old_objective, 0, math.nan, old_entropy, reason)

    # 4. backtracking line search on the real surrogate and KL (on the whole batch)
    entropies: list[float] = []  # of every candidate, over all ranks: the search stops at the accepted one

    def trial(coefficient: float) -> Trial:
        with th.no_grad():
            candidate = evaluator.evaluate(theta_old + coefficient * cg.x)
            objective, kl, entropy = replica.mean_of_floats(
                [
                    share * surrogate(candidate.log_prob).item(),
                    share * weighted_mean(kl_divergence(old_params, candidate.params), weights).item(),
                    share * _entropy(candidate, weights).item(),
                ],
                device,
            )
            entropies.append(entropy)
            return Trial(improvement=objective - old_objective, kl=kl)

    search = backtracking_line_search(
        trial,
        max_step=max_step,
        max_kl=settings.target_kl,
        shrinking_factor=settings.line_search_shrinking_factor,
        max_iter=settings.line_search_max_iter,
    )

    # 5. commit the accepted parameters in one assignment, or keep the old policy
    if search.accepted and search.trial is not None:
        actor.commit(theta_old + search.step_coefficient * cg.x)
        return PolicyStepResult(
            policy_objective=old_objective + search.trial.improvement,
            kl_divergence=search.trial.kl,
            accepted=True,
            surrogate_improvement=search.trial.improvement,
            expected_improvement=search.step_coefficient * float(gradient @ cg.x),
            line_search_steps=search.n_backtracks,
            step_size=search.step_coefficient,
            cg_residual=cg_residual,
            entropy=entropies[-1],
        )
    return PolicyStepResult.unchanged(old_objective, search.n_backtracks, cg_residual, old_entropy)
