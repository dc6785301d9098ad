"""Rollout collection: a lean ``collect_rollouts`` that fills SB3's buffers with exactly what SB3's loop would,
and what TRPO checks and shares around collection (non-finite data, VecNormalize's running statistics).

SB3's loop spends most of a step on the policy's forward pass (module calls, a validated ``torch.distributions``
object; :mod:`sb3_trpo.lean_forward` runs its ops directly) and on copying buffer fields twice; none of that changes
what is collected.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv, unwrap_vec_normalize

from sb3_trpo.lean_forward import LeanForward
from sb3_trpo.normalization import lean_step


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


def non_finite_parameters_error(count: int) -> NonFiniteRolloutError:
    """:return: the error for a policy with ``count`` non-finite parameters, which cannot act"""
    return NonFiniteRolloutError(
        f"The policy's parameters contain {count} NaN or infinite values, so no action can be sampled and no rollout "
        "was collected: the model is unchanged. TRPO's update never writes such values; they were set from outside "
        "it (set_parameters, load_state_dict, a callback): load an earlier checkpoint or find what changed them."
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
    return ordered_running_stats(getattr(vec_normalize, "obs_rms", None), vec_normalize.ret_rms)


def ordered_running_stats(
    obs_rms: RunningMeanStd | dict[str, RunningMeanStd] | None, ret_rms: RunningMeanStd
) -> list[RunningMeanStd]:
    """:return: VecNormalize's running statistics in the order :func:`vec_normalize_running_stats` gives them

    :param obs_rms: the observations' (a dict of them for Dict spaces; ``None`` with ``norm_obs=False``)
    :param ret_rms: the returns'
    """
    obs_stats = [] if obs_rms is None else [obs_rms[k] for k in sorted(obs_rms)] if isinstance(obs_rms, dict) else [obs_rms]
    return [*obs_stats, ret_rms]


# ---------------------------------------------------------------------------------------------------------------
# The lean collection loop
# ---------------------------------------------------------------------------------------------------------------


def _store(
    buffer: RolloutBuffer,
    obs: np.ndarray | dict[str, np.ndarray],
    actions: np.ndarray,
    rewards: np.ndarray,
    episode_starts: np.ndarray,
    values: th.Tensor,
    log_probs: th.Tensor,
    action_masks: np.ndarray | None = None,
) -> None:
    """What ``RolloutBuffer.add`` / ``DictRolloutBuffer.add`` store, written once into their arrays (they copy each
    field into a new array first). The reshapes are theirs: Discrete observations and every action space. With
    ``action_masks``, also what sb3-contrib's maskable buffers store of them (their ``add`` writes them first)."""
    pos = buffer.pos
    if action_masks is not None:
        masks: np.ndarray = buffer.action_masks  # type: ignore[attr-defined]  # sb3-contrib's maskable buffers
        masks[pos] = action_masks.reshape(masks.shape[1:])
    if isinstance(buffer.observations, dict):
        assert isinstance(obs, dict)
        for key, array in buffer.observations.items():
            array[pos] = np.reshape(obs[key], array.shape[1:])
    else:
        assert isinstance(obs, np.ndarray)
        buffer.observations[pos] = np.reshape(obs, buffer.observations.shape[1:])
    buffer.actions[pos] = actions.reshape(buffer.actions.shape[1:])
    buffer.rewards[pos] = rewards
    buffer.episode_starts[pos] = episode_starts
    buffer.values[pos] = values.cpu().numpy().reshape(-1)
    buffer.log_probs[pos] = log_probs.cpu().numpy()
    buffer.pos += 1
    if buffer.pos == buffer.buffer_size:
        buffer.full = True


def lean_collect_rollouts(
    model: OnPolicyAlgorithm,
    env: VecEnv,
    callback: BaseCallback,
    rollout_buffer: RolloutBuffer,
    n_rollout_steps: int,
    maskable: bool = False,
    action_masks_of: Callable[[VecEnv], np.ndarray] | None = None,
) -> bool:
    """SB3's ``OnPolicyAlgorithm.collect_rollouts`` with the policy's forward done by :class:`LeanForward` and the
    buffer written directly: the same data, random numbers, callbacks and bookkeeping, step for step.

    With ``maskable`` it is sb3-contrib's ``MaskablePPO.collect_rollouts`` instead: masks read from the env before
    each step (with ``action_masks_of``), applied to the distribution and stored in the maskable buffer; its
    callback locals; no locals update at the rollout's end.

    The caller checks :func:`lean_collection_gap` first.

    :param model: the algorithm (its policy, last observation and episode starts, counters and settings)
    :param env: the training environment
    :param callback: called at the rollout's start, at every step (with SB3's local names), and at its end
    :param rollout_buffer: the buffer to fill (its GAE is computed by SB3 at the end)
    :param n_rollout_steps: steps to collect per environment
    :param maskable: follow ``MaskablePPO.collect_rollouts`` (a maskable policy and buffer)
    :param action_masks_of: ``env -> masks of every environment`` (sb3-contrib's ``get_action_masks``) to collect
        with invalid-action masks; ``None`` collects without (``use_masking=False``)
    :return: ``False`` if a callback stopped the rollout early, as SB3's returns
    """
    assert model._last_obs is not None, "No previous observation was provided"
    # an ActorCriticPolicy, or sb3-contrib's maskable policy (a BasePolicy with the same modules)
    policy: ActorCriticPolicy = model.policy
    policy.set_training_mode(False)
    forward = LeanForward(policy)
    box_actions = isinstance(model.action_space, spaces.Box)
    discrete_actions = isinstance(model.action_space, spaces.Discrete)
    low, high = (model.action_space.low, model.action_space.high) if box_actions else (None, None)  # type: ignore[attr-defined]
    step = lean_step(env)  # VecNormalize's step done leanly, bit for bit, where it covers the environment

    n_steps = 0
    # the locals SB3's loop has from its bootstrap loop on (idx and done after its first step, terminal_obs and
    # terminal_value after its first truncation): callbacks get them as SB3's locals() gives them
    loop_locals: dict[str, Any] = {}
    rollout_buffer.reset()
    if model.use_sde:
        policy.reset_noise(env.num_envs)
    callback.on_rollout_start()

    while n_steps < n_rollout_steps:
        if model.use_sde and model.sde_sample_freq > 0 and n_steps % model.sde_sample_freq == 0:
            policy.reset_noise(env.num_envs)
        with th.no_grad():
            obs_tensor = obs_as_tensor(model._last_obs, model.device)  # type: ignore[arg-type]
            action_masks = None if action_masks_of is None else action_masks_of(env)
            actions, values, log_probs = forward(obs_tensor, action_masks)
        if np.isnan(log_probs.cpu().numpy()).any():
            # SB3's torch.distributions refuse NaN parameters (validation); NaN log-probabilities are their trace here
            raise ValueError(
                "The policy's action distribution has NaN parameters (means or logits), so no action can be sampled: "
                "the observations or the policy's parameters are not finite."
            )
        clipped_actions = actions
        if box_actions:
            clipped_actions = policy.unscale_action(clipped_actions) if policy.squash_output else np.clip(actions, low, high)

        new_obs, rewards, dones, infos = step(clipped_actions)
        model.num_timesteps += env.num_envs

        # SB3 hands its locals() to the callbacks: these are the names and types callbacks read
        step_locals = {
            "self": model,
            "env": env,
            "callback": callback,
            "rollout_buffer": rollout_buffer,
            "n_rollout_steps": n_rollout_steps,
            "n_steps": n_steps,
            "obs_tensor": obs_tensor,
            "actions": actions,
            "values": values,
            "log_probs": log_probs,
            "new_obs": new_obs,
            "rewards": rewards,
            "dones": dones,
            "infos": infos,
        }
        if not maskable:
            step_locals["clipped_actions"] = clipped_actions
        else:  # MaskablePPO's names: no clipping (no Box actions), the masks and the flag
            step_locals.update(action_masks=action_masks, use_masking=action_masks_of is not None)
        step_locals.update(loop_locals)
        callback.update_locals(step_locals)
        if not callback.on_step():
            return False

        model._update_info_buffer(infos, dones)
        n_steps += 1
        if discrete_actions:
            actions = actions.reshape(-1, 1)

        # a truncated episode's last reward is bootstrapped with the value of its terminal observation (SB3 #633)
        for idx, done in enumerate(dones):
            if done and infos[idx].get("terminal_observation") is not None and infos[idx].get("TimeLimit.truncated", False):
                terminal_obs = policy.obs_to_tensor(infos[idx]["terminal_observation"])[0]
                with th.no_grad():
                    terminal_value = policy.predict_values(terminal_obs)[0]
                rewards[idx] += model.gamma * terminal_value
                loop_locals.update(terminal_obs=terminal_obs, terminal_value=terminal_value)
        loop_locals.update(idx=idx, done=done)

        _store(rollout_buffer, model._last_obs, actions, rewards, model._last_episode_starts, values, log_probs, action_masks)  # type: ignore[arg-type]
        model._last_obs = new_obs  # type: ignore[assignment]
        model._last_episode_starts = dones

    with th.no_grad():
        values = policy.predict_values(obs_as_tensor(new_obs, model.device))  # type: ignore[arg-type]
    rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
    if not maskable:  # SB3 hands its locals over once more, as they are at the end; MaskablePPO's loop does not
        callback.update_locals({**step_locals, **loop_locals, "actions": actions, "values": values, "n_steps": n_steps})
    callback.on_rollout_end()
    return True


def explain_collection_failure(last_obs: Any, policy: th.nn.Module) -> NonFiniteRolloutError | None:
    """The clear error for a rollout that torch stopped, if non-finite inputs are why.

    A policy cannot act on NaN observations or parameters: its distribution or sampler refuses them with a message
    about its own arguments. Either collection loop turns that into one :class:`NonFiniteRolloutError`.

    :param last_obs: the observations the policy was acting on (an array, or a dict of arrays)
    :param policy: the policy
    :return: the error to raise instead, or ``None`` if the observations and parameters are finite
    """
    last = last_obs.values() if isinstance(last_obs, dict) else [last_obs]
    count = sum(count_non_finite(np.asarray(o)) for o in last)
    if count:
        return non_finite_rollout_error("observations", count)
    count = sum(count_non_finite(p.detach()) for p in policy.parameters())
    if count:
        return non_finite_parameters_error(count)
    return None
