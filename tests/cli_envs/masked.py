"""Registers ``CliMasked-v0`` on import: a task with rules about legal moves, whose masks come in the infos of its
steps and resets (gymnasium's convention), for the command-line tests of masks.

Each step shows a number; of 6 actions, 3 are legal (drawn anew each step), one of them the rewarded one. A legal
action pays 0.1 (1.1 if it is the rewarded one); an illegal action pays -1 and ends the episode. So a return below 0
means an illegal action was taken.
"""

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

ENV_ID = "CliMasked-v0"
N_ACTIONS, N_LEGAL, EPISODE_STEPS = 6, 3, 8


class MaskedEnv(gym.Env):
    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"]}
    observation_space = spaces.Box(0.0, 1.0, (N_ACTIONS,), np.float32)
    action_space = spaces.Discrete(N_ACTIONS)

    def __init__(self, render_mode: str | None = None) -> None:
        self.render_mode = render_mode
        self.legal = np.ones(N_ACTIONS, dtype=bool)
        self.target = 0

    def _draw(self) -> tuple[np.ndarray, dict[str, Any]]:
        legal = self.np_random.choice(N_ACTIONS, N_LEGAL, replace=False)
        self.legal[:] = False
        self.legal[legal] = True
        self.target = int(legal[0])
        obs = np.zeros(N_ACTIONS, dtype=np.float32)
        obs[self.target] = 1.0
        return obs, {"action_mask": self.legal.astype(np.int8)}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return self._draw()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if not self.legal[int(action)]:
            obs, info = self._draw()
            return obs, -1.0, True, False, info
        reward = 0.1 + float(int(action) == self.target)
        obs, info = self._draw()
        return obs, reward, False, False, info

    def render(self) -> np.ndarray:
        return np.zeros((8, 8, 3), dtype=np.uint8)


gym.register(id=ENV_ID, entry_point=MaskedEnv, max_episode_steps=EPISODE_STEPS)
