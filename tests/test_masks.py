"""Where masks come from (the vectorised environment's ``action_masks()``, each environment's, the infos of steps and
resets), what a valid mask is, and that every source gives the rollout the classic ``action_masks()`` gives."""

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from sb3_trpo.masks import INFO_KEY, VecActionMasks, checked_action_masks, mask_sizes, with_action_masks
from tests.helpers import import_sb3_contrib

import_sb3_contrib()  # a dev dependency: required in CI, skipped elsewhere without it

from sb3_trpo import MaskableTRPO  # noqa: E402

N_ACTIONS = 5


class Rules(gym.Env):
    """A counter the agent moves; which of the 5 actions are legal depends on the state (2 or 3 of them), and the
    mask is offered by ``legal()`` and, with ``in_info``, in every step's and reset's info."""

    observation_space = spaces.Box(0.0, 1.0, (2,), np.float32)
    action_space = spaces.Discrete(N_ACTIONS)

    def __init__(self, in_info: bool = False) -> None:
        self.in_info = in_info
        self.state = 0
        self.t = 0

    def legal(self) -> np.ndarray:
        mask = np.zeros(N_ACTIONS, dtype=bool)
        mask[[self.state % N_ACTIONS, (self.state * 3 + 1) % N_ACTIONS]] = True
        if self.state % 2:
            mask[(self.state + 2) % N_ACTIONS] = True
        return mask

    def _obs(self) -> np.ndarray:
        return np.array([self.state / 10.0, self.t / 20.0], dtype=np.float32)

    def _info(self) -> dict[str, Any]:
        return {INFO_KEY: self.legal().astype(np.int8)} if self.in_info else {}  # gymnasium's Taxi gives int8

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.state, self.t = int(self.np_random.integers(10)), 0
        return self._obs(), self._info()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        assert self.legal()[int(action)], f"illegal action {action} in state {self.state}"
        self.state = (self.state + int(action) + 1) % 10
        self.t += 1
        return self._obs(), float(action == self.state % N_ACTIONS), False, self.t >= 9, self._info()


class WithMethod(Rules):
    """sb3-contrib's convention: each environment's ``action_masks()``."""

    def action_masks(self) -> np.ndarray:
        return self.legal()


class NativeVecEnv(DummyVecEnv):
    """Stands for a natively vectorised environment: the masks of all its environments from one method."""

    def action_masks(self) -> np.ndarray:
        return np.stack([env.unwrapped.legal() for env in self.envs])  # type: ignore[attr-defined]


SOURCES = {
    "each environment's action_masks()": lambda: make_vec_env(WithMethod, n_envs=2, seed=0),
    "the vectorised environment's action_masks()": lambda: make_vec_env(Rules, n_envs=2, seed=0, vec_env_cls=NativeVecEnv),
    "info['action_mask']": lambda: make_vec_env(Rules, n_envs=2, seed=0, env_kwargs=dict(in_info=True)),
}


def rollout(make_env: Any) -> dict[str, np.ndarray]:
    model = MaskableTRPO("MlpPolicy", make_env(), n_steps=32, batch_size=64, seed=3)
    model.learn(64)  # episodes of 9 steps: automatic resets inside the rollout
    buffer = model.rollout_buffer
    return {name: np.array(getattr(buffer, name)) for name in ("observations", "actions", "action_masks", "log_probs")}


def test_every_source_gives_the_rollout_of_each_environments_action_masks():
    rollouts = {name: rollout(make) for name, make in SOURCES.items()}
    reference = rollouts.pop("each environment's action_masks()")
    masks = reference["action_masks"].reshape(-1, N_ACTIONS)
    assert len(np.unique(masks, axis=0)) > 3  # the masks change with the state
    assert not masks.all()
    for name, other in rollouts.items():
        for key, array in reference.items():
            np.testing.assert_array_equal(other[key], array, err_msg=f"{name}: {key}")


def test_the_environment_is_wrapped_only_when_sb3_contrib_could_not_read_its_masks():
    per_env = make_vec_env(WithMethod, n_envs=2)
    assert with_action_masks(per_env) is per_env  # read as sb3-contrib reads it: nothing changes for those users
    native = with_action_masks(make_vec_env(Rules, n_envs=2, vec_env_cls=NativeVecEnv))
    assert isinstance(native, VecActionMasks)
    assert native.source == "the vectorised environment's action_masks()"
    # through a VecNormalize too: the masks of the observations it normalizes
    info = with_action_masks(VecNormalize(make_vec_env(Rules, n_envs=2, env_kwargs=dict(in_info=True))))
    assert isinstance(info, VecActionMasks)
    assert info.source == "info['action_mask']"
    info.reset()
    expected = np.stack([env.unwrapped.legal() for env in info.unwrapped.envs])  # type: ignore[attr-defined]
    np.testing.assert_array_equal(info.action_masks(), expected)
    assert info.has_attr("action_masks")
    np.testing.assert_array_equal(np.stack(info.env_method("action_masks", indices=[1])), expected[1:])


def test_an_environment_without_masks_says_where_they_may_come_from():
    model = MaskableTRPO("MlpPolicy", make_vec_env(Rules, n_envs=2), n_steps=32, batch_size=64, seed=0)
    with pytest.raises(ValueError, match=r"No action masks for environment\(s\) \[0, 1\].*info\['action_mask'\]"):
        model.learn(64)


class BadMasks(WithMethod):
    def __init__(self, mask: list[bool]) -> None:
        super().__init__()
        self.mask = mask

    def action_masks(self) -> np.ndarray:
        return np.array(self.mask)


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        ([True, False, True], r"have shape \(2, 3\), but 2 environment\(s\) with actions Discrete\(5\) need 5 booleans"),
        ([False] * N_ACTIONS, r"of environment 0 leaves no valid action: every sub-space of Discrete\(5\) needs"),
    ],
)
def test_a_mask_of_the_wrong_size_or_with_no_valid_action_is_refused(mask, match):
    model = MaskableTRPO("MlpPolicy", make_vec_env(lambda: BadMasks(mask), n_envs=2), n_steps=32, batch_size=64)
    with pytest.raises(ValueError, match=match):
        model.learn(64)


@pytest.mark.parametrize(
    ("space", "masks", "error"),
    [
        (spaces.Discrete(3), [[1, 0, 1]], None),
        (spaces.MultiDiscrete([2, 3]), [[1, 0, 0, 1, 1]], None),
        (spaces.MultiDiscrete([2, 3]), [(np.array([1, 0]), np.array([0, 1, 1]))], None),  # gymnasium's tuple form
        (spaces.MultiDiscrete([2, 3]), [[1, 0, 0, 0, 0]], "in sub-space 1"),
        (spaces.MultiBinary(2), [[1, 1, 0, 1]], None),  # per dimension: may it be 0, may it be 1
        (spaces.MultiBinary(2), [[1, 1, 0, 0]], "in sub-space 1"),
        (spaces.MultiBinary(2), [[1, 1]], "need 4 booleans"),
    ],
)
def test_checked_action_masks(space, masks, error):
    if error is None:
        checked = checked_action_masks(masks, space, 1, "a test")
        assert checked.dtype == bool
        assert checked.shape == (1, sum(mask_sizes(space)))
    else:
        with pytest.raises(ValueError, match=error):
            checked_action_masks(masks, space, 1, "a test")


def test_box_actions_cannot_be_masked():
    with pytest.raises(ValueError, match=r"cannot be masked: masks exist for Discrete, MultiDiscrete and MultiBinary"):
        mask_sizes(spaces.Box(-1.0, 1.0, (2,)))


class ManyActions(gym.Env):
    """2,000 actions, 10 of them legal, drawn anew at every step; an illegal action fails the test at once. Rewards
    the lowest legal action, so the policy sharpens over a long run (where sb3-contrib's users report masked
    categoricals failing torch's simplex validation, sb3-contrib #322)."""

    N, LEGAL = 2000, 10
    observation_space = spaces.Box(-1.0, 1.0, (4,), np.float32)
    action_space = spaces.Discrete(N)

    def __init__(self) -> None:
        self.legal = np.zeros(self.N, dtype=bool)
        self.t = 0

    def _draw(self) -> None:
        self.legal[:] = False
        self.legal[self.np_random.choice(self.N, self.LEGAL, replace=False)] = True

    def action_masks(self) -> np.ndarray:
        return self.legal.copy()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t = 0
        self._draw()
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        assert self.legal[int(action)], f"illegal action {action}"
        reward = float(int(action) == int(np.flatnonzero(self.legal)[0]))
        self.t += 1
        self._draw()
        return self.observation_space.sample(), reward, False, self.t >= 50, {}


LONG_RUNS = [("MaskableTRPO", "MlpPolicy", 100_000), ("MaskableRecurrentTRPO", "MlpLstmPolicy", 30_000)]


@pytest.mark.slow
@pytest.mark.parametrize(("algorithm", "policy", "timesteps"), LONG_RUNS)
def test_a_long_run_over_2000_actions_with_masks_changing_every_step_never_fails(algorithm, policy, timesteps):
    import sb3_trpo

    env = make_vec_env(ManyActions, n_envs=4, seed=0)
    model = getattr(sb3_trpo, algorithm)(policy, env, n_steps=256, batch_size=256, seed=0)
    model.learn(timesteps)  # an illegal action, a failed validation or a skipped step (a warning) fails the test
    assert model.num_timesteps >= timesteps
    assert model._skipped_policy_steps == 0
    # it learned: the lowest legal action is chosen more often than 1 in 10 (a return of 5 per 50 steps); measured
    # 8.2 for both
    assert np.mean([info["r"] for info in model.ep_info_buffer]) > 6.5
