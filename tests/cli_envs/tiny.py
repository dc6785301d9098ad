"""Registers ``CliTiny-v0`` on import, as a user's package registers its environments with Gymnasium.

The command line must import this module itself, for ``sb3-trpo train tests.cli_envs.tiny:CliTiny-v0`` or
``sb3-trpo train CliTiny-v0 --gym-packages tests.cli_envs.tiny``: nothing else in the tests imports it.
"""

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

ENV_ID = "CliTiny-v0"
EPISODE_STEPS = 8


class TinyEnv(gym.Env):
    """Guess the sign of a number in [-1, 1]: reward 1 for action 1 on a positive number or action 0 on a negative
    one; episodes of :data:`EPISODE_STEPS` steps (the registered time limit), so that training and evaluation are
    instant."""

    # SB3's make_vec_env asks for rgb_array rendering, which Gymnasium warns about (an error in the tests) if not listed
    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"]}
    observation_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, render_mode: str | None = None) -> None:
        self.render_mode = render_mode

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._observation = self._draw()
        return self._observation, {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        reward = float(bool(action) == bool(self._observation[0] > 0))
        self._observation = self._draw()
        return self._observation, reward, False, False, {}

    def render(self) -> np.ndarray:
        """:return: a grey square, as light as the observation is high"""
        return np.full((8, 8, 3), int(127.5 * (self._observation[0] + 1.0)), dtype=np.uint8)

    def _draw(self) -> np.ndarray:
        return self.np_random.uniform(-1.0, 1.0, (1,)).astype(np.float32)


gym.register(id=ENV_ID, entry_point=TinyEnv, max_episode_steps=EPISODE_STEPS)
