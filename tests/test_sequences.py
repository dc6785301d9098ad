"""The recurrent buffers with index padding hand out exactly sb3-contrib's samples: the same sequences, padding,
states and dtypes, bit for bit, for every batch size, vector and Dict observations, and with masks."""

from typing import Any

import numpy as np
import pytest
import torch as th
from gymnasium import spaces

from tests.helpers import import_sb3_contrib

import_sb3_contrib()  # a dev dependency: required in CI, skipped elsewhere without it

from sb3_contrib.common.recurrent.buffers import RecurrentDictRolloutBuffer, RecurrentRolloutBuffer  # noqa: E402
from sb3_contrib.common.recurrent.type_aliases import RNNStates  # noqa: E402

from sb3_trpo.sequences import PaddedSequences, SequenceDictRolloutBuffer, SequenceRolloutBuffer  # noqa: E402

N_STEPS, N_ENVS, LAYERS, HIDDEN = 13, 3, 2, 4
ACTION_SPACES = {
    "box": spaces.Box(-1, 1, (2,), np.float32),
    "discrete": spaces.Discrete(3),
    "multibinary": spaces.MultiBinary(3),
}
OBS = spaces.Box(-1, 1, (3,), np.float32)
DICT_OBS = spaces.Dict({"a": OBS, "b": spaces.MultiDiscrete([2, 3])})


def filled(buffer_class: Any, obs_space: spaces.Space, action_space: spaces.Space, seed: int) -> Any:
    """A buffer filled with random steps (episode starts included), the same for every class given the seed."""
    rng = np.random.default_rng(seed)
    obs_space.seed(seed)
    action_space.seed(seed)
    buffer = buffer_class(N_STEPS, obs_space, action_space, (N_STEPS, LAYERS, N_ENVS, HIDDEN), "cpu", n_envs=N_ENVS)
    for _ in range(N_STEPS):
        obs = obs_space.sample()
        obs = {k: np.stack([v] * N_ENVS) for k, v in obs.items()} if isinstance(obs, dict) else np.stack([obs] * N_ENVS)
        actions = np.stack([action_space.sample() for _ in range(N_ENVS)])
        states = [th.as_tensor(rng.normal(size=(LAYERS, N_ENVS, HIDDEN)), dtype=th.float32) for _ in range(4)]
        buffer.add(
            obs,
            actions,
            rng.normal(size=N_ENVS).astype(np.float32),
            rng.random(N_ENVS) < 0.25,
            th.as_tensor(rng.normal(size=(N_ENVS, 1)), dtype=th.float32),
            th.as_tensor(rng.normal(size=N_ENVS), dtype=th.float32),
            lstm_states=RNNStates((states[0], states[1]), (states[2], states[3])),
        )
    buffer.compute_returns_and_advantage(th.zeros(N_ENVS, 1), np.zeros(N_ENVS, dtype=bool))
    return buffer


def assert_same_samples(ours: Any, theirs: Any) -> None:
    assert type(ours).__name__ == type(theirs).__name__
    for name, a in ours._asdict().items():
        b = getattr(theirs, name)
        if isinstance(a, dict):
            for key in a:
                assert a[key].dtype == b[key].dtype, (name, key)
                assert th.equal(a[key], b[key]), (name, key)
        elif isinstance(a, tuple):
            for x, y in zip(th.utils._pytree.tree_leaves(a), th.utils._pytree.tree_leaves(b), strict=True):
                assert th.equal(x, y), name
        else:
            assert a.dtype == b.dtype, name
            assert a.shape == b.shape, name
            assert th.equal(a, b), name


@pytest.mark.parametrize("batch_size", [None, 7, 16, 39])
@pytest.mark.parametrize("action_name", sorted(ACTION_SPACES))
@pytest.mark.parametrize("dict_obs", [False, True], ids=["vector", "dict"])
def test_the_samples_are_sb3_contribs_bit_for_bit(batch_size, action_name, dict_obs):
    obs_space = DICT_OBS if dict_obs else OBS
    ours_class, theirs_class = (
        (SequenceDictRolloutBuffer, RecurrentDictRolloutBuffer)
        if dict_obs
        else (SequenceRolloutBuffer, RecurrentRolloutBuffer)
    )
    for seed in range(3):
        ours = filled(ours_class, obs_space, ACTION_SPACES[action_name], seed)
        theirs = filled(theirs_class, obs_space, ACTION_SPACES[action_name], seed)
        assert ours.episode_starts.any(), "degenerate test: no episode start inside the rollout"
        for draw in range(2):  # a second get() reads the flattened arrays, with another random cut
            np.random.seed(10 * seed + draw)
            ours_samples = list(ours.get(batch_size))
            np.random.seed(10 * seed + draw)
            theirs_samples = list(theirs.get(batch_size))
            assert len(ours_samples) == len(theirs_samples)
            for a, b in zip(ours_samples, theirs_samples, strict=True):
                assert_same_samples(a, b)
            np.testing.assert_array_equal(ours.seq_start_indices, theirs.seq_start_indices)


def test_padding_takes_the_value_asked_for_and_keeps_the_dtype():
    sequences = PaddedSequences(np.array([0, 0, 1, 0, 0, 0], dtype=np.float32), np.zeros(6), th.device("cpu"))
    np.testing.assert_array_equal(sequences.start_indices, [0, 2])
    assert sequences.max_length == 4
    padded = sequences.pad(np.arange(6, dtype=np.int8), padding_value=-1)
    assert padded.dtype == th.int8
    assert padded.tolist() == [[0, 1, -1, -1], [2, 3, 4, 5]]
    assert sequences.pad_and_flatten(np.ones(6, dtype=np.float32)).tolist() == [1, 1, 0, 0, 1, 1, 1, 1]
