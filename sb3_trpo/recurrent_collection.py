"""The recurrent classes' collection: ``RecurrentPPO.collect_rollouts`` step for step, lean where it can be.

``RecurrentPPO``'s loop spends most of a step around the recurrent layers rather than in them: each of the actor's and
the critic's ``_process_sequence`` reshapes its input into sequences, synchronises on ``th.all(episode_starts == 0)``
to choose between one layer call and a Python loop over time, and goes through ``nn.LSTM``'s checks; then come the
usual ``nn.Module`` calls, a validated ``torch.distributions`` object, and a buffer ``add`` that copies every field
(four state tensors included) into new arrays first. With a policy and buffer it covers
(:func:`lean_recurrent_collection_gap`), :class:`LeanRecurrentForward` runs the same ops directly: one step of each
layer through the op its module calls (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``/``rnn_relu``), the
states reset by ``(1 - episode_start)`` as sb3-contrib resets them (a product by 1 leaves a state bit for bit as it
is, so it is applied at every step instead of only at steps with a start), and :class:`~sb3_trpo.lean_forward.LeanForward`'s
heads and samplers; the buffer's arrays are written once. The data, LSTM states, random numbers and callback locals
are RecurrentPPO's (tested bit for bit); anything else falls back to the policy's own call and the buffer's ``add``.
"""

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

try:
    from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
    from sb3_contrib.common.recurrent.type_aliases import RNNStates
except ImportError as error:  # pragma: no cover - exercised in a subprocess without sb3-contrib
    raise ImportError(
        "The recurrent collection reuses sb3-contrib's recurrent pieces, and sb3-contrib is not installed: install it "
        'with `pip install "sb3-trpo[recurrent]"` (or `pip install sb3-contrib`).'
    ) from error

from sb3_trpo.collection import _store
from sb3_trpo.lean_forward import LeanForward, _layer, lean_collection_gap
from sb3_trpo.normalization import lean_step
from sb3_trpo.recurrent_policies import PairStateGRU, PairStateRNN

__all__ = ["LeanRecurrentForward", "lean_recurrent_collection_gap", "recurrent_collect_rollouts"]

State = tuple[th.Tensor, th.Tensor]
CellStep = Callable[[th.Tensor, th.Tensor, State], tuple[th.Tensor, State]]
#: the layers whose one step the lean forward runs (exact types), by the op their ``forward`` calls
_CELL_OPS: dict[type[nn.Module], Callable[..., Any]] = {nn.LSTM: th.lstm, PairStateGRU: th.gru}


def _cell_op(layer: Any) -> Callable[..., Any] | None:
    """:return: the op ``layer.forward`` runs on a tensor and its state, or ``None`` for a layer it does not know"""
    if type(layer) is PairStateRNN:
        return {"tanh": th.rnn_tanh, "relu": th.rnn_relu}.get(layer.nonlinearity)
    return _CELL_OPS.get(type(layer))


def _layer_gap(name: str, layer: Any) -> str | None:
    """Why one step of ``layer`` cannot be run directly, or ``None`` if it can (or there is no layer)."""
    if layer is None:
        return None
    if _cell_op(layer) is None:
        return f"the policy's {name} is a {type(layer).__name__}, not an nn.LSTM or one of sb3_trpo's GRU and RNN layers"
    if layer.batch_first or layer.bidirectional or getattr(layer, "proj_size", 0):
        return f"the policy's {name} is batch-first, bidirectional or projected"
    return None


def lean_recurrent_collection_gap(
    policy: RecurrentActorCriticPolicy,
    rollout_buffer: RolloutBuffer,
    reference: type[RecurrentActorCriticPolicy],
    buffer_classes: tuple[type[RolloutBuffer], ...],
) -> str | None:
    """Why the lean recurrent forward and store cannot stand in for the policy's call and the buffer's ``add``, or
    ``None`` if they can: what :func:`~sb3_trpo.lean_forward.lean_collection_gap` requires of the heads, distribution
    and buffer, the sequence forward of ``reference``, and recurrent layers it runs directly.

    :param policy: the model's policy
    :param rollout_buffer: the buffer to fill
    :param reference: the recurrent policy class whose forward is repeated
    :param buffer_classes: the recurrent buffer classes whose ``add`` is repeated (exact types)
    """
    gap = lean_collection_gap(policy, rollout_buffer, reference, buffer_classes)
    if gap is not None:
        return gap
    if type(policy)._process_sequence is not reference._process_sequence:
        return f"the policy class {type(policy).__name__} overrides _process_sequence"
    if policy.critic is not None and type(policy.critic) is not nn.Linear:
        return "the policy's critic is not an nn.Linear"
    return _layer_gap("lstm_actor", policy.lstm_actor) or _layer_gap("lstm_critic", policy.lstm_critic)


def _cell_step(layer: Any) -> CellStep:
    """One step of a recurrent layer, as its module computes it for a sequence of length 1, from states reset where
    ``keep`` is 0 (``(1 - episode_start)``, shaped ``(1, n_envs, 1)``)."""
    op = _cell_op(layer)
    assert op is not None
    weights = layer._flat_weights
    # the arguments nn.LSTM / nn.GRU / nn.RNN pass after the weights (training as the collection has set it)
    settings = (layer.bias, layer.num_layers, float(layer.dropout), layer.training, False, False)

    if type(layer) is nn.LSTM:

        def lstm_step(x: th.Tensor, keep: th.Tensor, state: State) -> tuple[th.Tensor, State]:
            output, hidden, cell = op(x.unsqueeze(0), (state[0] * keep, state[1] * keep), weights, *settings)
            return output[0], (hidden, cell)

        return lstm_step

    def one_state_step(x: th.Tensor, keep: th.Tensor, state: State) -> tuple[th.Tensor, State]:
        # the second state passes through (see sb3_trpo.recurrent_policies), reset as sb3-contrib resets it
        output, hidden = op(x.unsqueeze(0), state[0] * keep, weights, *settings)
        return output[0], (hidden, state[1] * keep)

    return one_state_step


class LeanRecurrentForward(LeanForward):
    """``RecurrentActorCriticPolicy.forward`` for one collection step, as the same ops on the policy's own parameters
    (see the module's docstring). Built once per rollout, after the policy is set to evaluation mode.

    :param policy: a policy for which :func:`lean_recurrent_collection_gap` found nothing
    """

    def __init__(self, policy: RecurrentActorCriticPolicy) -> None:
        super().__init__(policy)
        self._actor_step = _cell_step(policy.lstm_actor)
        self._critic_step = None if policy.lstm_critic is None else _cell_step(policy.lstm_critic)
        self._critic_linear = None if policy.critic is None else _layer(policy.critic)

    def step(
        self, obs: Any, states: Any, episode_starts: th.Tensor, action_masks: np.ndarray | None = None
    ) -> tuple[np.ndarray, th.Tensor, th.Tensor, RNNStates]:
        """:return: actions (the numpy array RecurrentPPO makes of them), values, log-probabilities and the new
        states, as ``policy(obs, states, episode_starts)`` computes them (with ``action_masks`` for a maskable one)"""
        policy: Any = self.policy
        pi_features, vf_features = self._step_features(obs, action_masks)
        keep = (1.0 - episode_starts).view(1, -1, 1)
        latent_pi, states_pi = self._actor_step(pi_features, keep, states.pi)
        if self._critic_step is not None:
            latent_vf, states_vf = self._critic_step(vf_features, keep, states.vf)
        elif policy.shared_lstm:  # the actor's output and states (sb3-contrib detaches them: no graph here anyway)
            latent_vf, states_vf = latent_pi, states_pi
        else:
            assert self._critic_linear is not None
            latent_vf, states_vf = self._critic_linear(vf_features), states_pi
        values = self._value_head(self._critic_mlp(latent_vf))
        actions, log_prob = self._sample(self._actor_mlp(latent_pi))
        return actions.reshape(self._action_shape), values, log_prob, RNNStates(states_pi, states_vf)


def _store_states(buffer: Any, states: Any) -> None:
    """What sb3-contrib's recurrent ``add`` stores of the states before a step (call before :func:`_store`)."""
    pos = buffer.pos
    buffer.hidden_states_pi[pos] = states.pi[0].cpu().numpy()
    buffer.cell_states_pi[pos] = states.pi[1].cpu().numpy()
    buffer.hidden_states_vf[pos] = states.vf[0].cpu().numpy()
    buffer.cell_states_vf[pos] = states.vf[1].cpu().numpy()


def recurrent_collect_rollouts(
    model: Any,
    env: VecEnv,
    callback: BaseCallback,
    rollout_buffer: RolloutBuffer,
    n_rollout_steps: int,
    action_masks_of: Callable[[VecEnv], np.ndarray] | None = None,
    lean: bool = False,
) -> bool:
    """``RecurrentPPO.collect_rollouts``: the same data, LSTM states, random numbers, callbacks and callback locals,
    step for step, with invalid-action masks when ``action_masks_of`` is given.

    Each step feeds the policy the observations, the states its previous step returned and the episode starts (the
    states of environments whose episode starts there are reset), stores the states it started from with the step,
    and with masks reads them before the step, samples among the valid actions and stores them too.

    :param model: the algorithm (RecurrentTRPO: its policy, last observations, episode starts and LSTM states,
        counters, settings)
    :param env: the training environment
    :param callback: called at the rollout's start, at every step, and at its end
    :param rollout_buffer: a recurrent buffer (a maskable one with masks)
    :param n_rollout_steps: steps to collect per environment
    :param action_masks_of: ``env -> masks of every environment`` (:func:`sb3_trpo.masks.masks_of`); ``None``: none
    :param lean: run :class:`LeanRecurrentForward` and write the buffer directly (the caller has found no
        :func:`lean_recurrent_collection_gap`); otherwise the policy's call and the buffer's ``add``
    :return: ``False`` if a callback stopped the rollout early
    """
    assert model._last_obs is not None, "No previous observation was provided"
    policy = model.policy
    policy.set_training_mode(False)
    box_actions = isinstance(model.action_space, spaces.Box)
    n_steps = 0
    rollout_buffer.reset()
    if model.use_sde:
        policy.reset_noise(env.num_envs)
    callback.on_rollout_start()
    lean_forward = LeanRecurrentForward(policy) if lean else None
    step = lean_step(env) if lean else env.step  # VecNormalize's step done leanly, bit for bit, where it covers env
    lstm_states = copy.deepcopy(model._last_lstm_states)
    # RecurrentPPO's locals from its bootstrap loop (after a first step; terminal_* after a first truncation): the
    # callbacks see them as its locals() gives them
    loop_locals: dict[str, Any] = {}

    while n_steps < n_rollout_steps:
        if model.use_sde and model.sde_sample_freq > 0 and n_steps % model.sde_sample_freq == 0:
            policy.reset_noise(env.num_envs)
        masks = None if action_masks_of is None else action_masks_of(env)
        with th.no_grad():
            obs_tensor: Any = obs_as_tensor(model._last_obs, model.device)
            episode_starts = th.tensor(model._last_episode_starts, dtype=th.float32, device=model.device)
            if lean_forward is not None:
                actions, values, log_probs, lstm_states = lean_forward.step(obs_tensor, lstm_states, episode_starts, masks)
            else:
                mask_argument = {} if masks is None else {"action_masks": masks}
                actions, values, log_probs, lstm_states = policy(obs_tensor, lstm_states, episode_starts, **mask_argument)
        if lean_forward is None:
            actions = actions.cpu().numpy()  # type: ignore[attr-defined]  # the policy's call gives a tensor
        elif np.isnan(log_probs.cpu().numpy()).any():
            # torch.distributions refuse NaN parameters (validation); NaN log-probabilities are their trace here
            raise ValueError(
                "The policy's action distribution has NaN parameters (means or logits), so no action can be sampled: "
                "the observations or the policy's parameters are not finite."
            )
        clipped_actions = np.clip(actions, model.action_space.low, model.action_space.high) if box_actions else actions

        new_obs, rewards, dones, infos = step(clipped_actions)
        model.num_timesteps += env.num_envs
        step_locals = {
            "self": model,
            "env": env,
            "callback": callback,
            "rollout_buffer": rollout_buffer,
            "n_rollout_steps": n_rollout_steps,
            "n_steps": n_steps,
            "lstm_states": lstm_states,
            "obs_tensor": obs_tensor,
            "episode_starts": episode_starts,
            "actions": actions,
            "values": values,
            "log_probs": log_probs,
            "clipped_actions": clipped_actions,
            "new_obs": new_obs,
            "rewards": rewards,
            "dones": dones,
            "infos": infos,
            **loop_locals,
        }
        if masks is not None:
            step_locals["action_masks"] = masks
        callback.update_locals(step_locals)
        if not callback.on_step():
            return False
        model._update_info_buffer(infos, dones)
        n_steps += 1
        if isinstance(model.action_space, spaces.Discrete):
            actions = actions.reshape(-1, 1)

        # a truncated episode's last reward is bootstrapped with the value of its terminal observation (SB3 #633), from
        # the critic's state after that step
        for idx, done_ in enumerate(dones):
            if done_ and infos[idx].get("terminal_observation") is not None and infos[idx].get("TimeLimit.truncated", False):
                terminal_obs = policy.obs_to_tensor(infos[idx]["terminal_observation"])[0]
                with th.no_grad():
                    terminal_lstm_state = (
                        lstm_states.vf[0][:, idx : idx + 1, :].contiguous(),
                        lstm_states.vf[1][:, idx : idx + 1, :].contiguous(),
                    )
                    not_a_start = th.tensor([False], dtype=th.float32, device=model.device)
                    terminal_value = policy.predict_values(terminal_obs, terminal_lstm_state, not_a_start)[0]
                rewards[idx] += model.gamma * terminal_value
                loop_locals.update(terminal_obs=terminal_obs, terminal_lstm_state=terminal_lstm_state)
                loop_locals.update(terminal_value=terminal_value)
        loop_locals.update(idx=idx, done_=done_)

        stored = {} if masks is None else {"action_masks": masks}
        if lean_forward is not None:
            _store_states(rollout_buffer, model._last_lstm_states)
            _store(rollout_buffer, model._last_obs, actions, rewards, model._last_episode_starts, values, log_probs, masks)
        else:
            add: Any = rollout_buffer.add  # sb3-contrib's recurrent buffers take the states (and masks) as keywords
            add(
                model._last_obs,
                actions,
                rewards,
                model._last_episode_starts,
                values,
                log_probs,
                lstm_states=model._last_lstm_states,
                **stored,
            )
        model._last_obs = new_obs
        model._last_episode_starts = dones
        model._last_lstm_states = lstm_states

    with th.no_grad():
        episode_starts = th.tensor(dones, dtype=th.float32, device=model.device)
        values = policy.predict_values(obs_as_tensor(new_obs, model.device), lstm_states.vf, episode_starts)  # type: ignore[arg-type]
    rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
    callback.on_rollout_end()
    return True
