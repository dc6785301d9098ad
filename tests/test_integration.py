"""SB3 machinery works with TRPO: callbacks, save/load, VecNormalize, SubprocVecEnv, progress bar, evaluation,
parameter access and swapping environments."""

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CheckpointCallback,
    EvalCallback,
    ProgressBarCallback,
    StopTrainingOnRewardThreshold,
)
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

from sb3_trpo import TRPO
from tests.helpers import ACTION_SPACES, BOX_OBS, RandomEnv

SMALL = dict(n_steps=64, batch_size=32, n_critic_updates=2, policy_kwargs=dict(net_arch=[16]))


def cartpole(n_envs: int = 1, seed: int = 0):
    return make_vec_env("CartPole-v1", n_envs=n_envs, seed=seed)


class CountingCallback(BaseCallback):
    def __init__(self) -> None:
        super().__init__()
        self.steps = 0
        self.rollouts = 0
        self.started = False

    def _on_training_start(self) -> None:
        self.started = True

    def _on_rollout_end(self) -> None:
        self.rollouts += 1

    def _on_step(self) -> bool:
        self.steps += 1
        return True


def test_callbacks_eval_checkpoint_custom(tmp_path):
    model = TRPO("MlpPolicy", cartpole(), seed=0, **SMALL)
    eval_callback = EvalCallback(
        cartpole(seed=1), eval_freq=128, n_eval_episodes=2, best_model_save_path=str(tmp_path / "best"), log_path=str(tmp_path)
    )
    checkpoints = CheckpointCallback(save_freq=128, save_path=str(tmp_path / "ckpt"), name_prefix="trpo")
    counting = CountingCallback()
    model.learn(256, callback=[eval_callback, checkpoints, counting])
    assert counting.started
    assert counting.steps == 256
    assert counting.rollouts == 4
    assert len(np.load(tmp_path / "evaluations.npz")["timesteps"]) == 2
    assert (tmp_path / "best" / "best_model.zip").exists()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["trpo_128_steps.zip", "trpo_256_steps.zip"]
    TRPO.load(tmp_path / "ckpt" / "trpo_256_steps.zip")


def test_stop_training_on_reward_threshold():
    model = TRPO("MlpPolicy", cartpole(), seed=0, **SMALL)
    stop = StopTrainingOnRewardThreshold(reward_threshold=1.0, verbose=0)
    callback = EvalCallback(cartpole(seed=1), callback_on_new_best=stop, eval_freq=64, n_eval_episodes=1)
    model.learn(10_000, callback=callback)
    assert model.num_timesteps == 64


def observations(n: int = 20) -> np.ndarray:
    BOX_OBS.seed(3)
    return np.stack([BOX_OBS.sample() for _ in range(n)])


@pytest.mark.parametrize("kwargs", [{}, {"use_sde": True}], ids=["gaussian", "gsde"])
def test_save_load_round_trip_and_continued_training(tmp_path, kwargs):
    env = DummyVecEnv([lambda: RandomEnv(BOX_OBS, ACTION_SPACES["box"])])
    model = TRPO("MlpPolicy", env, seed=0, tensorboard_log=str(tmp_path / "tb"), **SMALL, **kwargs)
    model.learn(128)
    obs = observations()
    actions, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "model")

    loaded = TRPO.load(tmp_path / "model", env=env)
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], actions)
    for name in ("cg_max_steps", "cg_damping", "line_search_shrinking_factor", "line_search_max_iter", "target_kl"):
        assert getattr(loaded, name) == getattr(model, name)
    assert loaded.num_timesteps == 128
    # the critic's optimizer state comes back too
    saved_state = model.policy.optimizer.state_dict()["state"]
    loaded_state = loaded.policy.optimizer.state_dict()["state"]
    assert saved_state.keys() == loaded_state.keys()
    for key in saved_state:
        th.testing.assert_close(saved_state[key]["exp_avg"], loaded_state[key]["exp_avg"])

    before = loaded.policy.parameters_to_vector()
    loaded.learn(128, reset_num_timesteps=False)
    assert loaded.num_timesteps == 256
    assert loaded._n_updates == 4
    assert not np.array_equal(before, loaded.policy.parameters_to_vector())


def test_vecnormalize(tmp_path):
    env = VecNormalize(cartpole(n_envs=2), norm_obs=True, norm_reward=True)
    model = TRPO("MlpPolicy", env, seed=0, **SMALL)
    model.learn(256)
    assert env.obs_rms.count == pytest.approx(2 + 256, abs=1e-3)  # the 2 first observations, then every step
    assert env.ret_rms.count == pytest.approx(256, abs=1e-3)
    model.save(tmp_path / "model")
    env.save(str(tmp_path / "vecnormalize.pkl"))
    eval_env = VecNormalize.load(str(tmp_path / "vecnormalize.pkl"), cartpole(seed=5))
    eval_env.training = False
    eval_env.norm_reward = False
    # the saved statistics normalize as the training env did, and the loaded model acts as the trained one
    raw = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    expected = np.clip((raw - env.obs_rms.mean) / np.sqrt(env.obs_rms.var + env.epsilon), -env.clip_obs, env.clip_obs)
    np.testing.assert_allclose(eval_env.normalize_obs(raw), expected, rtol=1e-6)
    loaded = TRPO.load(tmp_path / "model")
    np.testing.assert_array_equal(
        loaded.predict(eval_env.normalize_obs(raw), deterministic=True)[0],
        model.predict(env.normalize_obs(raw), deterministic=True)[0],
    )
    # evaluation sees the true rewards: CartPole's return is its episode length
    returns, lengths = evaluate_policy(loaded, eval_env, n_eval_episodes=2, return_episode_rewards=True)
    assert returns == [float(length) for length in lengths]


def test_subproc_vec_env():
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0, vec_env_cls=SubprocVecEnv)
    try:
        model = TRPO("MlpPolicy", env, seed=0, **SMALL)
        model.learn(256)
        assert model.num_timesteps == 256
    finally:
        env.close()


def test_progress_bar(capsys):
    model = TRPO("MlpPolicy", cartpole(n_envs=2), seed=0, **SMALL)
    set_up = model._init_callback
    built = []
    model._init_callback = lambda *args, **kwargs: built.append(set_up(*args, **kwargs)) or built[-1]  # type: ignore[method-assign]
    model.learn(256, progress_bar=True)
    (bar,) = [c for c in built[0].callbacks if isinstance(c, ProgressBarCallback)]
    assert bar.pbar.total == 256
    assert bar.pbar.n == 256  # it advanced with every step of both environments, to the end


def test_evaluate_policy_returns_per_episode_rewards():
    model = TRPO("MlpPolicy", cartpole(), seed=0, **SMALL)
    model.learn(128)
    rewards, lengths = evaluate_policy(model, cartpole(seed=2), n_eval_episodes=3, return_episode_rewards=True)
    assert len(rewards) == len(lengths) == 3
    assert rewards == [float(length) for length in lengths]  # CartPole: one point per step
    # the first episode, played by hand with the model's deterministic actions from the same seed
    env = cartpole(seed=2)
    obs, done, total = env.reset(), False, 0.0
    while not done:
        action, _ = model.predict(obs, deterministic=True)
        obs, reward, dones, _ = env.step(action)
        total, done = total + float(reward[0]), bool(dones[0])
    assert rewards[0] == total


def test_get_and_set_parameters():
    a = TRPO("MlpPolicy", cartpole(), seed=0, **SMALL)
    b = TRPO("MlpPolicy", cartpole(), seed=1, **SMALL)
    obs = np.zeros((1, 4), dtype=np.float32)
    with th.no_grad():
        assert not th.equal(a.policy.action_net.weight, b.policy.action_net.weight)
    b.set_parameters(a.get_parameters())
    np.testing.assert_array_equal(a.policy.parameters_to_vector(), b.policy.parameters_to_vector())
    np.testing.assert_array_equal(a.predict(obs, deterministic=True)[0], b.predict(obs, deterministic=True)[0])
    b.learn(64)  # trains from the parameters it was given


def test_set_env():
    model = TRPO("MlpPolicy", cartpole(), seed=0, **SMALL)
    model.learn(64)
    new_env = cartpole(seed=7)
    model.set_env(new_env)
    assert model.get_env() is new_env
    model.learn(128, reset_num_timesteps=False)
    assert model.num_timesteps == 64 + 128
    with pytest.raises(ValueError, match="Observation spaces do not match"):
        model.set_env(DummyVecEnv([lambda: RandomEnv(BOX_OBS, ACTION_SPACES["discrete"])]))
