"""Registers ``CliTupleActions-v0`` on import: the tiny task with a ``Tuple`` action space, which TRPO does not support
(the command line must say so in one line). Kept apart from :mod:`tests.cli_envs.tiny`, which some tests import
again after unregistering its environment."""

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from tests.cli_envs.tiny import EPISODE_STEPS, TinyEnv


class TupleActionsEnv(TinyEnv):
    """The tiny task, acting with the first part of a pair of actions."""

    action_space = spaces.Tuple((spaces.Discrete(2), spaces.Discrete(2)))

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        return super().step(action[0])


gym.register(id="CliTupleActions-v0", entry_point=TupleActionsEnv, max_episode_steps=EPISODE_STEPS)
