"""sb3-contrib's recurrent buffers, handing out their padded sequences faster.

``RecurrentRolloutBuffer`` and ``RecurrentDictRolloutBuffer`` cut each batch they hand out into sequences (at episode
starts and where the environment changes) and pad them to one length by making a tensor of every sequence of every
field, then ``pad_sequence``: a few hundred small tensors per batch, again for every minibatch of every critic epoch.
:class:`PaddedSequences` cuts the same sequences and pads each field with one numpy gather; the buffers below hand out
the same samples as sb3-contrib's, bit for bit (tested), with the same random cut and the same padding values.
"""

from typing import Any

import numpy as np
import torch as th

try:
    from sb3_contrib.common.recurrent.buffers import RecurrentDictRolloutBuffer, RecurrentRolloutBuffer
    from sb3_contrib.common.recurrent.type_aliases import (
        RecurrentDictRolloutBufferSamples,
        RecurrentRolloutBufferSamples,
        RNNStates,
    )
except ImportError as error:  # pragma: no cover - exercised in a subprocess without sb3-contrib
    raise ImportError(
        "The recurrent buffers build on sb3-contrib's, and sb3-contrib is not installed: install it with "
        '`pip install "sb3-trpo[recurrent]"` (or `pip install sb3-contrib`).'
    ) from error

__all__ = ["PaddedSequences", "SequenceDictRolloutBuffer", "SequenceRolloutBuffer"]


class PaddedSequences:
    """The sequences of one batch, as sb3-contrib's ``create_sequencers`` cuts them, and padding by index.

    :param episode_starts: the batch's episode starts, in the buffer's (environment-major) order
    :param env_change: 1 where the batch passes to another environment's steps
    :param device: where the padded tensors go
    """

    def __init__(self, episode_starts: np.ndarray, env_change: np.ndarray, device: th.device) -> None:
        starts = np.logical_or(episode_starts, env_change).flatten()
        starts[0] = True  # a batch's first step starts a sequence
        #: where each sequence starts in the batch
        self.start_indices = np.flatnonzero(starts)
        lengths = np.diff(np.append(self.start_indices, len(starts)))
        #: the padded length of every sequence
        self.max_length = int(lengths.max())
        steps = np.arange(self.max_length)
        self._real = steps < lengths[:, None]
        # each padded slot's row in the batch (any row for padding, overwritten with the padding value)
        self._rows = np.where(self._real, self.start_indices[:, None] + steps, 0)
        self._device = device

    def pad(self, array: np.ndarray, padding_value: float = 0.0) -> th.Tensor:
        """:return: ``array``'s rows as ``(n_seq, max_length, *shape)``, padded with ``padding_value``"""
        padded = array[self._rows]
        padded[~self._real] = padding_value
        return th.as_tensor(padded, device=self._device)

    def pad_and_flatten(self, array: np.ndarray, padding_value: float = 0.0) -> th.Tensor:
        """:return: ``array``'s rows padded as :meth:`pad` pads them, flattened to ``(n_seq * max_length,)``"""
        return self.pad(array, padding_value).flatten()


class _FastSequences:
    """``_get_samples`` of sb3-contrib's recurrent buffers, with :class:`PaddedSequences` (the fields, shapes and states
    are theirs; ``self.pad`` and ``self.pad_and_flatten`` are left set for the batch, as theirs are)."""

    def _get_samples(self: Any, batch_inds: np.ndarray, env_change: np.ndarray, env: Any = None) -> Any:
        sequences = PaddedSequences(self.episode_starts[batch_inds], env_change[batch_inds], self.device)
        self.seq_start_indices, self.pad, self.pad_and_flatten = (
            sequences.start_indices,
            sequences.pad,
            sequences.pad_and_flatten,
        )
        padded_rows = len(sequences.start_indices) * sequences.max_length

        def initial(states: np.ndarray) -> th.Tensor:
            # the states stored before each sequence's first step: (n_seq, layers, hidden) -> (layers, n_seq, hidden)
            return self.to_torch(states[batch_inds][sequences.start_indices].swapaxes(0, 1)).contiguous()

        fields = dict(
            actions=self.pad(self.actions[batch_inds]).reshape((padded_rows, *self.actions.shape[1:])),
            old_values=self.pad_and_flatten(self.values[batch_inds]),
            old_log_prob=self.pad_and_flatten(self.log_probs[batch_inds]),
            advantages=self.pad_and_flatten(self.advantages[batch_inds]),
            returns=self.pad_and_flatten(self.returns[batch_inds]),
            lstm_states=RNNStates(
                (initial(self.hidden_states_pi), initial(self.cell_states_pi)),
                (initial(self.hidden_states_vf), initial(self.cell_states_vf)),
            ),
            episode_starts=self.pad_and_flatten(self.episode_starts[batch_inds]),
            mask=self.pad_and_flatten(np.ones_like(self.returns[batch_inds])),
        )
        if isinstance(self.observations, dict):
            observations = {
                key: self.pad(obs[batch_inds]).reshape((padded_rows, *self.obs_shape[key]))
                for key, obs in self.observations.items()
            }
            return RecurrentDictRolloutBufferSamples(observations=observations, **fields)
        observations = self.pad(self.observations[batch_inds]).reshape((padded_rows, *self.obs_shape))
        return RecurrentRolloutBufferSamples(observations=observations, **fields)


class SequenceRolloutBuffer(_FastSequences, RecurrentRolloutBuffer):  # type: ignore[misc]  # the same samples
    """sb3-contrib's ``RecurrentRolloutBuffer``, padding its sequences with :class:`PaddedSequences`."""


class SequenceDictRolloutBuffer(_FastSequences, RecurrentDictRolloutBuffer):  # type: ignore[misc]  # the same samples
    """sb3-contrib's ``RecurrentDictRolloutBuffer``, padding its sequences with :class:`PaddedSequences`."""
