"""The ``train/*`` metrics every update logs, in one place (docs/algorithm.md, "Logged metrics", explains each)."""

import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.utils import explained_variance

from sb3_trpo.policy_step import PolicyStepResult


def record_update(
    logger: Logger,
    step: PolicyStepResult,
    target_kl: float,
    value_loss: float,
    rollout_buffer: RolloutBuffer,
    policy: BasePolicy,
    n_updates: int,
    skipped: tuple[int, int],
) -> None:
    """Record one update's metrics with SB3's logger (written at the next ``dump``, as SB3's algorithms do).

    :param logger: the model's logger
    :param step: the policy step's outcome
    :param target_kl: the trust-region radius of this update
    :param value_loss: the critic step's mean loss
    :param rollout_buffer: the rollout the update learned from (for the explained variance of its values)
    :param policy: the policy (its ``log_std``, when it has one, gives ``train/std``)
    :param n_updates: updates so far, this one included
    :param skipped: policy steps and critic steps skipped or undone so far
    """
    logger.record("train/skipped_policy_steps", skipped[0])
    logger.record("train/skipped_critic_steps", skipped[1])
    logger.record("train/policy_objective", step.policy_objective)
    logger.record("train/kl_divergence_loss", step.kl_divergence)
    logger.record("train/target_kl", target_kl)
    logger.record("train/is_line_search_success", float(step.accepted))
    logger.record("train/surrogate_improvement", step.surrogate_improvement)
    logger.record("train/expected_improvement", step.expected_improvement)
    logger.record("train/line_search_steps", step.line_search_steps)
    logger.record("train/step_size", step.step_size)
    logger.record("train/cg_residual", step.cg_residual)
    logger.record("train/entropy", step.entropy)
    logger.record("train/value_loss", value_loss)
    logger.record(
        "train/explained_variance",
        explained_variance(rollout_buffer.values.flatten(), rollout_buffer.returns.flatten()),
    )
    log_std = getattr(policy, "log_std", None)
    if isinstance(log_std, th.Tensor):
        logger.record("train/std", th.exp(log_std).mean().item())
    logger.record("train/n_updates", n_updates, exclude="tensorboard")
