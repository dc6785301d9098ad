"""The lean normalizer against SB3's VecNormalize: the same statistics, observations, rewards and infos, bit for bit,
over long runs with episode ends, every switch, and both ways through save/load."""

import copy
import pickle
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from sb3_trpo.normalization import LeanNormalizer, batch_moments, lean_normalizer_gap, lean_step
from tests.helpers import RandomEnv


class NoisyEnv(gym.Env):
    """Observations on scales from 1e-3 to 1e3 (some beyond the clip), rewards on a scale of 100, episodes that end
    by termination at random or by truncation at 30 steps."""

    def __init__(self, dim: int = 11, seed: int = 0, reward_dtype: Any = np.float64) -> None:
        self.observation_space = spaces.Box(-np.inf, np.inf, (dim,), np.float64)
        self.action_space = spaces.Box(-1, 1, (2,), np.float32)
        self.rng = np.random.default_rng(seed)
        self.scales = np.logspace(-3, 3, dim)
        self.offsets = self.rng.normal(size=dim) * self.scales * 3
        self.reward_dtype = reward_dtype
        self.t = 0

    def _obs(self) -> np.ndarray:
        obs = self.offsets + self.rng.normal(size=self.scales.shape) * self.scales
        if self.rng.random() < 0.03:  # an outlier, which normalization clips
            obs[self.rng.integers(len(obs))] += 1e3 * self.scales.max()
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        self.t = 0
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, Any, bool, bool, dict]:
        self.t += 1
        reward = self.reward_dtype(self.rng.normal() * 100 + 20)
        return self._obs(), reward, bool(self.rng.random() < 0.05), self.t >= 30, {}


def make_env(n_envs: int, dim: int = 11, reward_dtype: Any = np.float64, seed: int = 0) -> DummyVecEnv:
    return DummyVecEnv([lambda i=i: NoisyEnv(dim, seed + i, reward_dtype) for i in range(n_envs)])


def assert_bits(a: Any, b: Any, where: str) -> None:
    """The same values to the bit, of the same types (arrays, numpy scalars, floats, dicts and lists of them)."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bits(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bits(x, y, f"{where}[{i}]")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype, f"{where}: {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{where}: {a.shape} vs {b.shape}"
        assert a.tobytes() == b.tobytes(), f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a} vs {b}"


def state(vn: VecNormalize, pickled: bool = False) -> dict[str, Any]:
    """Everything a VecNormalize step changes or saves (``pickled``: what its pickle keeps, without the returns)."""
    return {
        "obs_rms": vars(vn.obs_rms) if vn.norm_obs else None,
        "ret_rms": vars(vn.ret_rms),
        "returns": None if pickled else vn.returns,
        "old_obs": vn.old_obs,
        "old_reward": vn.old_reward,
    }


def run_both(
    n_envs: int, steps: int, settings: dict[str, Any], switch: Any = None, dim: int = 11, reward_dtype: Any = np.float64
) -> tuple[VecNormalize, VecNormalize]:
    """Step SB3's VecNormalize and the lean one side by side on identical environments, comparing every output and
    the whole state after every step; ``switch(step, vec_normalize)`` may change settings on both."""
    sb3, lean = (VecNormalize(make_env(n_envs, dim, reward_dtype), **settings) for _ in range(2))
    assert_bits(sb3.reset(), lean.reset(), "reset")
    normalizer = LeanNormalizer(lean)
    actions = np.zeros((n_envs, 2), np.float32)
    sb3.largest = 0.0  # the largest normalized observation returned (clipping reached or not)
    for step in range(steps):
        if switch is not None:
            switch(step, sb3)
            switch(step, lean)
        expected, got = sb3.step(actions), normalizer.step(actions)
        assert_bits(got, expected, f"step {step}")
        assert_bits(state(lean), state(sb3), f"state after step {step}")
        sb3.largest = max(sb3.largest, float(np.abs(expected[0]).max()))
    return sb3, lean


@pytest.mark.parametrize("n_envs", [1, 2, 3, 16, 33])
def test_a_long_run_matches_vec_normalize_bit_for_bit(n_envs):
    sb3, _ = run_both(n_envs, 600, {"gamma": 0.99})
    assert sb3.obs_rms.count > 600  # the statistics kept moving
    assert sb3.largest == 10.0  # some observations were clipped


@pytest.mark.parametrize(
    "settings",
    [
        {"norm_obs": False},
        {"norm_reward": False},
        {"training": False},
        {"clip_obs": 1.5, "clip_reward": 0.5, "epsilon": 1e-4, "gamma": 0.9},
        {"clip_obs": np.inf, "gamma": 1.0},
    ],
    ids=["no-obs", "no-reward", "not-training", "tight-clips", "no-clip"],
)
def test_every_setting_matches(settings):
    run_both(2, 200, settings)


def test_float32_rewards_and_one_dimension_match():
    # EnvPool's rewards are float32; a one-dimensional observation reduces to scalars
    run_both(4, 200, {}, reward_dtype=np.float32)
    run_both(4, 200, {}, dim=1)


def test_switching_training_and_reward_normalization_midway_matches():
    def switch(step: int, vn: VecNormalize) -> None:
        vn.training = step < 100 or step >= 200
        vn.norm_reward = step < 150

    run_both(3, 300, {}, switch=switch)


def test_non_finite_observations_propagate_as_vec_normalize_propagates_them():
    class Broken(NoisyEnv):
        def _obs(self) -> np.ndarray:
            obs = super()._obs()
            obs[self.t % 3] = [np.nan, np.inf, -np.inf][self.t % 3] if self.t % 5 == 4 else obs[self.t % 3]
            return obs

    sb3 = VecNormalize(DummyVecEnv([lambda: Broken(5, 0)]))
    lean = VecNormalize(DummyVecEnv([lambda: Broken(5, 0)]))
    sb3.reset(), lean.reset()
    normalizer = LeanNormalizer(lean)
    actions = np.zeros((1, 2), np.float32)
    with np.errstate(invalid="ignore"):  # NaN - NaN, inf - inf: numpy warns on both sides
        for step in range(20):
            assert_bits(normalizer.step(actions), sb3.step(actions), f"step {step}")
            assert_bits(state(lean), state(sb3), f"state after step {step}")


def test_save_and_load_both_ways():
    """Statistics saved by either continue identically in the other: SB3's pickle, both ways."""
    sb3, lean = run_both(2, 150, {})
    del sb3.largest  # the test's own record
    sb3_bytes, lean_bytes = pickle.dumps(sb3), pickle.dumps(lean)
    # the pickles hold the same state (the lean steps left nothing of their own on the object)
    assert_bits(state(pickle.loads(lean_bytes), True), state(pickle.loads(sb3_bytes), True), "pickled state")
    assert set(vars(pickle.loads(lean_bytes))) == set(vars(pickle.loads(sb3_bytes)))
    # SB3's statistics continued by the lean step, the lean statistics continued by SB3's step
    continued_lean, continued_sb3 = pickle.loads(sb3_bytes), pickle.loads(lean_bytes)
    continued_lean.set_venv(make_env(2, seed=100))
    continued_sb3.set_venv(make_env(2, seed=100))
    continued_lean.reset(), continued_sb3.reset()
    normalizer = LeanNormalizer(continued_lean)
    for step in range(150):
        actions = np.zeros((2, 2), np.float32)
        assert_bits(normalizer.step(actions), continued_sb3.step(actions), f"after loading, step {step}")
        assert_bits(state(continued_lean), state(continued_sb3), f"after loading, state {step}")


def test_batch_moments_are_numpys():
    rng = np.random.default_rng(0)
    for shape in [(1, 3), (2, 11), (7, 4), (8, 4), (9, 17), (64, 5), (33,)]:
        batch = rng.normal(size=shape) * rng.choice([1e-8, 1.0, 1e8])
        mean, var = batch_moments(batch)
        assert_bits(mean, np.mean(batch, axis=0), f"mean {shape}")
        assert_bits(var, np.var(batch, axis=0), f"var {shape}")


def test_what_it_covers():
    box = VecNormalize(make_env(1))
    assert lean_normalizer_gap(box) is None
    assert lean_step(box).__self__.vec_normalize is box  # type: ignore[attr-defined]
    dict_env = DummyVecEnv([lambda: RandomEnv(spaces.Dict({"a": spaces.Box(-1, 1, (2,))}), spaces.Box(-1, 1, (2,)))])
    assert "Dict observations" in lean_normalizer_gap(VecNormalize(dict_env))
    assert "not SB3's VecNormalize" in lean_normalizer_gap(make_env(1))
    assert lean_step(dict_env) == dict_env.step  # DummyVecEnv buffers Dict observations key by key: not covered

    class OwnDummy(DummyVecEnv):
        pass

    own = OwnDummy([lambda: NoisyEnv()])
    assert lean_step(own) == own.step  # its step may differ: not covered
    plain = make_env(1)

    class Subclass(VecNormalize):
        pass

    assert lean_normalizer_gap(Subclass(make_env(1))) is not None  # its step may differ: not covered
    with pytest.raises(ValueError, match="Box observations only"):
        LeanNormalizer(copy.copy(plain))  # type: ignore[arg-type]


def _infos_equal(a: list[dict], b: list[dict], where: str) -> None:
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.keys() == y.keys(), f"{where}[{i}]"
        for key in x:
            if key == "episode":  # Monitor's record: its wall time "t" differs between two runs
                assert {**x[key], "t": 0} == {**y[key], "t": 0}, f"{where}[{i}].{key}"
            else:
                assert_bits(np.asarray(x[key]), np.asarray(y[key]), f"{where}[{i}].{key}")


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_lean_dummy_step_is_dummy_vec_envs(env_id):
    """The same observations, rewards, dones and infos (values, Monitor's episodes, truncations and terminal
    observations), the same buffers and reset infos, as DummyVecEnv.step; a change to a returned info does not reach
    the next step's."""
    from stable_baselines3.common.env_util import make_vec_env

    from sb3_trpo.normalization import LeanDummyStep

    sb3 = make_vec_env(env_id, n_envs=3, seed=0, env_kwargs={"max_episode_steps": 40})
    mine = make_vec_env(env_id, n_envs=3, seed=0, env_kwargs={"max_episode_steps": 40})
    assert_bits(sb3.reset(), mine.reset(), "reset")
    step = LeanDummyStep(mine)
    rng = np.random.default_rng(0)
    ends = 0
    for t in range(300):
        actions = np.stack([sb3.action_space.sample() for _ in range(3)]) if t % 2 else rng.integers(0, 2, 3)
        if env_id == "Pendulum-v1":
            actions = rng.uniform(-2, 2, (3, 1)).astype(np.float32)
        expected, got = sb3.step(actions), step(actions)
        for part in range(3):
            assert_bits(got[part], expected[part], f"step {t} part {part}")
        _infos_equal(got[3], expected[3], f"step {t} infos")
        _infos_equal(mine.reset_infos, sb3.reset_infos, f"step {t} reset infos")
        assert_bits(mine.buf_obs[None], sb3.buf_obs[None], f"step {t} buffer")
        ends += int(got[2].sum())
        for info in got[3]:
            info["terminal_observation"] = "changed by the caller"
    assert ends >= 10


def test_the_lean_steps_compose_over_vec_normalize_and_dummy_vec_env():
    from sb3_trpo.normalization import LeanDummyStep

    env = VecNormalize(make_env(2))
    step = lean_step(env)
    assert isinstance(step.__self__.inner_step, LeanDummyStep)
    assert isinstance(lean_step(make_env(2)), LeanDummyStep)
    sb3, lean = VecNormalize(make_env(2)), VecNormalize(make_env(2))
    sb3.reset(), lean.reset()
    step = lean_step(lean)
    for t in range(200):
        actions = np.zeros((2, 2), np.float32)
        expected, got = sb3.step(actions), step(actions)
        for part in range(3):
            assert_bits(got[part], expected[part], f"step {t} part {part}")
        _infos_equal(got[3], expected[3], f"step {t} infos")
        assert_bits(state(lean), state(sb3), f"state after step {t}")
