"""A lean ``VecNormalize.step``: the same statistics, observations and rewards as SB3's ``VecNormalize``, bit for bit,
at a fraction of its cost.

SB3's ``VecNormalize`` spends most of a step in numpy's Python layers rather than in arithmetic: ``np.mean`` and
``np.var`` count items and allocate through ``numpy/_core/_methods.py``, ``np.clip`` and ``deepcopy`` wrap their
work, and ``RunningMeanStd`` runs twice (observations, returns). :class:`LeanNormalizer` performs the same floating-
point operations in the same order (so every bit agrees) with the ufuncs called directly:

- a batch's mean and variance as numpy computes them: ``add.reduce`` over the batch divided by its size, and the
  mean of the squared deviations from that mean;
- ``RunningMeanStd.update_from_moments``'s expression, term by term (the returns' scalar statistics in Python
  floats: IEEE double arithmetic, as numpy's float64 scalars do it);
- the normalization ``clip((x - mean) / sqrt(var + epsilon))`` with ``clip`` as ``minimum(maximum(x, lo), hi)``,
  which is what numpy's ``clip`` computes, NaN included.

It works on the ``VecNormalize`` object itself (its ``obs_rms``, ``ret_rms``, ``returns``, ``old_obs``,
``old_reward``), so ``save``/``load``, ``get_original_obs``, ``sync_envs_normalization`` and ``EvalCallback`` see what
they would have seen, and the pickle is SB3's. The lean collection loops step through it whenever the training
environment is a plain ``VecNormalize`` over Box observations (:func:`lean_step`).
"""

from collections.abc import Callable
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecNormalize
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

Step = Callable[[np.ndarray], VecEnvStepReturn]


def lean_normalizer_gap(env: VecEnv) -> str | None:
    """:return: why :class:`LeanNormalizer` does not cover ``env``, or ``None`` if it does"""
    if type(env) is not VecNormalize:
        return f"the environment is a {type(env).__name__}, not SB3's VecNormalize itself"
    if not isinstance(env.observation_space, spaces.Box) or isinstance(getattr(env, "obs_rms", None), dict):
        return "Dict observations (VecNormalize normalizes them key by key)"
    return None


def lean_dummy_gap(env: VecEnv) -> str | None:
    """:return: why :class:`LeanDummyStep` does not cover ``env``, or ``None`` if it does"""
    if type(env) is not DummyVecEnv:
        return f"the environment is a {type(env).__name__}, not SB3's DummyVecEnv itself"
    if list(env.keys) != [None]:
        return "Dict or Tuple observations (DummyVecEnv buffers them key by key)"
    return None


def lean_step(env: VecEnv) -> Step:
    """:return: ``env.step``, or the same step done leanly where :class:`LeanNormalizer` (a plain VecNormalize over
    Box observations) or :class:`LeanDummyStep` (a plain DummyVecEnv over Box observations, also under the
    VecNormalize) covers ``env``"""
    if lean_normalizer_gap(env) is None:
        assert isinstance(env, VecNormalize)
        return LeanNormalizer(env, lean_step(env.venv)).step
    if lean_dummy_gap(env) is None:
        assert isinstance(env, DummyVecEnv)
        return LeanDummyStep(env)
    return env.step


def batch_moments(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:return: ``np.mean(batch, axis=0)`` and ``np.var(batch, axis=0)``, bit for bit: numpy sums with the same
    reduction, divides by the count, and takes the mean of the squared deviations from that mean"""
    count = batch.shape[0]
    mean = np.add.reduce(batch, axis=0)
    mean /= count
    deviations = batch - mean
    np.multiply(deviations, deviations, out=deviations)
    var = np.add.reduce(deviations, axis=0)
    var /= count
    return mean, var


def update_running_stats(rms: RunningMeanStd, batch: np.ndarray) -> None:
    """``rms.update(batch)`` for array statistics (an observation's), bit for bit: ``update_from_moments`` term by
    term, in its order of operations."""
    batch_mean, batch_var = batch_moments(batch)
    batch_count = batch.shape[0]
    count = rms.count
    tot_count = count + batch_count
    delta = batch_mean - rms.mean
    new_mean = delta * batch_count
    new_mean /= tot_count
    new_mean += rms.mean
    m_2 = rms.var * count
    m_2 += batch_var * batch_count
    correction = np.square(delta)
    correction *= count
    correction *= batch_count
    correction /= count + batch_count
    m_2 += correction
    m_2 /= count + batch_count
    rms.mean, rms.var, rms.count = new_mean, m_2, batch_count + count


def update_scalar_running_stats(rms: RunningMeanStd, batch: np.ndarray) -> None:
    """``rms.update(batch)`` for scalar statistics (the returns'), bit for bit: the batch's moments as numpy computes
    them, the update in Python floats (IEEE doubles, as numpy's float64 scalars), stored as numpy float64 scalars as
    ``update_from_moments`` leaves them."""
    batch_count = batch.shape[0]
    batch_mean = float(np.add.reduce(batch)) / batch_count
    deviations = batch - batch_mean
    np.multiply(deviations, deviations, out=deviations)
    batch_var = float(np.add.reduce(deviations)) / batch_count
    mean, var, count = float(rms.mean), float(rms.var), rms.count
    delta = batch_mean - mean
    tot_count = count + batch_count
    new_mean = mean + delta * batch_count / tot_count
    m_2 = var * count + batch_var * batch_count + delta * delta * count * batch_count / (count + batch_count)
    # numpy float64 scalars, as update_from_moments leaves a scalar's statistics (RunningMeanStd annotates arrays)
    rms.mean, rms.var = np.float64(new_mean), np.float64(m_2 / (count + batch_count))  # type: ignore[assignment]
    rms.count = batch_count + count


class LeanNormalizer:
    """``VecNormalize.step`` on a ``VecNormalize``'s own state, bit for bit (see the module's description).

    :param vec_normalize: SB3's ``VecNormalize`` over Box observations (:func:`lean_normalizer_gap` says which)
    :param inner_step: the step of the environments it wraps (default: their ``step``), e.g. a :class:`LeanDummyStep`
    """

    def __init__(self, vec_normalize: VecNormalize, inner_step: Step | None = None) -> None:
        gap = lean_normalizer_gap(vec_normalize)
        if gap is not None:
            raise ValueError(f"LeanNormalizer covers SB3's VecNormalize over Box observations only: {gap}")
        self.vec_normalize = vec_normalize
        self.inner_step = vec_normalize.venv.step if inner_step is None else inner_step

    def normalize_obs(self, obs: np.ndarray) -> np.ndarray:
        """:return: ``VecNormalize.normalize_obs(obs)`` for Box observations"""
        vn = self.vec_normalize
        if not vn.norm_obs:
            return obs.copy()  # VecNormalize returns a deep copy
        rms = vn.obs_rms
        assert isinstance(rms, RunningMeanStd)
        normalized = obs - rms.mean
        normalized /= np.sqrt(rms.var + vn.epsilon)
        np.maximum(normalized, -vn.clip_obs, out=normalized)
        np.minimum(normalized, vn.clip_obs, out=normalized)
        return normalized.astype(np.float32)

    def step(self, actions: np.ndarray) -> VecEnvStepReturn:
        """:return: what ``vec_normalize.step(actions)`` returns, with the same effect on its state"""
        vn = self.vec_normalize
        obs, rewards, dones, infos = self.inner_step(actions)
        assert isinstance(obs, np.ndarray)
        vn.old_obs, vn.old_reward = obs, rewards
        if vn.training and vn.norm_obs:
            assert isinstance(vn.obs_rms, RunningMeanStd)
            update_running_stats(vn.obs_rms, obs)
        normalized_obs = self.normalize_obs(obs)
        if vn.training:
            vn.returns = vn.returns * vn.gamma + rewards
            update_scalar_running_stats(vn.ret_rms, vn.returns)
        normalized_rewards = rewards
        if vn.norm_reward:
            # as VecNormalize writes it (the types decide the precision: a float32 reward over float64 statistics)
            normalized_rewards = rewards / np.sqrt(vn.ret_rms.var + vn.epsilon)
            np.maximum(normalized_rewards, -vn.clip_reward, out=normalized_rewards)
            np.minimum(normalized_rewards, vn.clip_reward, out=normalized_rewards)
        normalized_rewards = normalized_rewards.astype(np.float32)
        if np.count_nonzero(dones):
            for idx in np.flatnonzero(dones):
                if "terminal_observation" in infos[idx]:
                    infos[idx]["terminal_observation"] = self.normalize_obs(infos[idx]["terminal_observation"])
            vn.returns[dones] = 0
        return normalized_obs, normalized_rewards, dones, infos


class LeanDummyStep:
    """``DummyVecEnv.step`` over Box observations, with the same effect on the DummyVecEnv's buffers and the same
    outputs, without its per-step overheads: the observation buffer is copied directly (not through
    ``copy_obs_dict``/``dict_to_obs``), and the infos are handed out as new dicts holding the step's values (not a
    ``deepcopy``: each step's info dicts and arrays are new objects the DummyVecEnv never changes later, so a copy of
    the dict is enough for a caller to change its entries, as VecNormalize does with ``terminal_observation``).

    :param venv: SB3's ``DummyVecEnv`` over Box observations (:func:`lean_dummy_gap` says which)
    """

    def __init__(self, venv: DummyVecEnv) -> None:
        gap = lean_dummy_gap(venv)
        if gap is not None:
            raise ValueError(f"LeanDummyStep covers SB3's DummyVecEnv over Box observations only: {gap}")
        self.venv = venv

    def __call__(self, actions: np.ndarray) -> VecEnvStepReturn:
        """:return: what ``venv.step(actions)`` returns, with the same effect on its buffers and environments"""
        venv = self.venv
        venv.actions = actions  # step_async
        observations = venv.buf_obs[None]  # type: ignore[index]  # the one buffer of a Box space, under key None
        infos: list[dict[str, Any]] = venv.buf_infos
        for env_idx, env in enumerate(venv.envs):
            obs, venv.buf_rews[env_idx], terminated, truncated, info = env.step(actions[env_idx])
            infos[env_idx] = info
            venv.buf_dones[env_idx] = done = terminated or truncated
            info["TimeLimit.truncated"] = truncated and not terminated
            if done:
                info["terminal_observation"] = obs
                obs, venv.reset_infos[env_idx] = env.reset()
            observations[env_idx] = obs
        return observations.copy(), venv.buf_rews.copy(), venv.buf_dones.copy(), [dict(info) for info in infos]
