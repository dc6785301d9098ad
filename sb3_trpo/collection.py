"""Rollout collection: SB3's ``collect_rollouts`` is used as it is; this module holds what TRPO checks and
shares around it (non-finite data, VecNormalize's running statistics).
"""

import numpy as np
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecEnv, unwrap_vec_normalize


class NonFiniteRolloutError(ValueError):
    """The rollout holds NaN or infinite values, so no update can be computed from it."""


def non_finite_rollout_error(what: str, count: int) -> NonFiniteRolloutError:
    """:return: the error for ``count`` non-finite values of ``what`` in the rollout, saying how to find them"""
    return NonFiniteRolloutError(
        f"The rollout contains non-finite {what} ({count} NaN or infinite values), so no update was made: the "
        "model is unchanged and can still be saved. Wrap the environment in "
        "stable_baselines3.common.vec_env.VecCheckNan(env, raise_exception=True) to find the step that produces "
        "them (or in VecNormalize to tame very large rewards or observations)."
    )


def count_non_finite(values: np.ndarray | th.Tensor) -> int:
    """:return: the number of NaN or infinite entries (0 for integer arrays)"""
    if isinstance(values, th.Tensor):
        return 0 if not values.is_floating_point() else int((~th.isfinite(values)).sum())
    return 0 if not np.issubdtype(values.dtype, np.floating) else int((~np.isfinite(values)).sum())


def non_finite_counts(buffer: RolloutBuffer) -> dict[str, int]:
    """:return: how many NaN or infinite values each part of a filled rollout buffer holds"""
    observations = buffer.observations.values() if isinstance(buffer.observations, dict) else [buffer.observations]
    return {
        "observations": sum(count_non_finite(o) for o in observations),
        "rewards": count_non_finite(buffer.rewards),
        "value predictions": count_non_finite(buffer.values),
        "advantages or returns (computed from rewards and values)": count_non_finite(buffer.advantages)
        + count_non_finite(buffer.returns),
    }


def vec_normalize_running_stats(env: VecEnv | None) -> list[RunningMeanStd]:
    """VecNormalize's running statistics (observations, sorted by key for Dict spaces, then returns), if ``env``
    is normalized and training; otherwise none."""
    vec_normalize = unwrap_vec_normalize(env) if env is not None else None
    if vec_normalize is None or not vec_normalize.training:
        return []
    obs_rms = getattr(vec_normalize, "obs_rms", None)  # absent with norm_obs=False
    obs_stats = [] if obs_rms is None else [obs_rms[k] for k in sorted(obs_rms)] if isinstance(obs_rms, dict) else [obs_rms]
    return [*obs_stats, vec_normalize.ret_rms]
