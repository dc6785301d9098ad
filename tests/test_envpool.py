"""EnvPoolVecEnv: EnvPool's MuJoCo tasks against gymnasium's, and SB3's VecEnv conventions against DummyVecEnv's."""

import json
import signal
import warnings
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

pytest.importorskip("envpool")
pytest.importorskip("mujoco")

from sb3_trpo import TRPO, envpool_env
from sb3_trpo.cli import checkpointing, main
from sb3_trpo.envpool_env import EnvPoolVecEnv, check_same_spaces
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent

# EnvPool's own alignment test against its reference MuJoCo environments (envpool/mujoco/gym/mujoco_gym_align_test.py)
OBS_ATOL = 3e-4
REWARD_ATOL = 1e-4
#: wider, measured bounds where contacts make one step differ more: the state is set here without MuJoCo's solver warm
#: start, which EnvPool's environment carries from its previous step, and the contact solver's answer depends on it
#: (measured: Ant's forward reward differs by up to 0.023 and its contact cost by 0.003-0.009, in multiples of 0.003,
#: i.e. 6 more or fewer clipped contact-force entries; Humanoid's observed contact forces and inertias by up to 0.05)
#: The third bound is the info entries': velocities are position differences over dt (0.05 s for Ant), 20x those.
WIDER = {"Ant-v5": (3e-3, 3e-2, 0.1), "Humanoid-v5": (5e-2, 5e-3, 0.1)}
#: the tasks that clip the joint velocities they observe to +-10 (the state cannot be read back beyond)
CLIPPED_VELOCITIES = {"Hopper-v5", "Walker2d-v5"}

#: the MuJoCo tasks with a command-line preset, with the preset's env_kwargs
PRESET_TASKS = [
    ("Hopper-v5", {}),
    ("HalfCheetah-v5", {}),
    ("Walker2d-v5", {}),
    ("Ant-v5", {"include_cfrc_ext_in_observation": False}),
    ("Swimmer-v5", {}),
    ("Humanoid-v5", {}),
    ("InvertedDoublePendulum-v5", {}),
]


@pytest.fixture(autouse=True)
def _quiet_mujoco():
    # gymnasium's Box casts EnvPool's float64 bounds; MuJoCo warns about a deprecated attribute of Humanoid's model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def gym_state(env_id: str, obs: np.ndarray, info: dict, model) -> tuple[np.ndarray, np.ndarray]:
    """:return: the MuJoCo state (qpos, qvel) behind an observation of a v5 task and its info's positions"""
    nq, nv = model.nq, model.nv
    if env_id == "InvertedDoublePendulum-v5":  # [x, sin θ1, sin θ2, cos θ1, cos θ2, qvel, constraint forces]
        qpos = np.array([obs[0], np.arctan2(obs[1], obs[3]), np.arctan2(obs[2], obs[4])])
        return qpos, obs[5 : 5 + nv]
    # the other tasks leave out the x (and for the 3-D ones y) position, which their info gives
    positions = [info["x_position"]] + ([info["y_position"]] if "y_position" in info else [])
    k = len(positions)
    return np.concatenate([positions, obs[: nq - k]]), obs[nq - k : nq - k + nv]


def set_gym_state(env: gym.Env, qpos: np.ndarray, qvel: np.ndarray) -> None:
    """Put a gymnasium MuJoCo environment in a state from scratch (no solver warm start), as EnvPool's test does."""
    import mujoco

    unwrapped = env.unwrapped
    mujoco.mj_resetData(unwrapped.model, unwrapped.data)
    unwrapped.set_state(qpos, qvel)


@pytest.mark.parametrize(("env_id", "env_kwargs"), PRESET_TASKS, ids=[t for t, _ in PRESET_TASKS])
def test_one_step_from_the_same_state_matches_gymnasium(env_id, env_kwargs):
    """From each state an EnvPool episode visits, gymnasium's step with the same action gives the same observation,
    reward and termination, within EnvPool's own tolerances. (Whole trajectories drift apart on the contact-rich
    tasks: a difference in the last bits grows over a few dozen steps, as between two MuJoCo builds.)"""
    pool = EnvPoolVecEnv(env_id, 1, seed=3, env_kwargs=env_kwargs)
    env = gym.make(env_id, **env_kwargs)
    env.reset(seed=0)
    model = env.unwrapped.model
    assert pool.observation_space.shape == env.observation_space.shape
    check_same_spaces(pool, DummyVecEnv([lambda: env]), env_id)
    obs_atol, reward_atol, info_atol = WIDER.get(env_id, (OBS_ATOL, REWARD_ATOL, OBS_ATOL))
    rng = np.random.default_rng(0)
    obs, info = pool.reset()[0], pool.reset_infos[0]
    compared = 0
    for _ in range(200):
        qpos, qvel = gym_state(env_id, obs, info, model)
        if env_id in CLIPPED_VELOCITIES and np.abs(qvel).max() >= 10:
            break
        set_gym_state(env, qpos, qvel)
        np.testing.assert_allclose(env.unwrapped._get_obs()[:5], obs[:5], atol=1e-12)  # the state was read right
        # moderate actions keep Hopper and Walker2d below their velocity clip for a while
        action = rng.uniform(-0.5, 0.5, env.action_space.shape).astype(np.float32) * env.action_space.high
        next_obs, rewards, dones, infos = pool.step(action[None])
        gym_obs, gym_reward, terminated, _, gym_info = env.step(action)
        if dones[0]:
            np.testing.assert_allclose(infos[0]["terminal_observation"], gym_obs, atol=obs_atol)
            assert terminated == (not infos[0]["TimeLimit.truncated"])
            break
        assert not terminated
        np.testing.assert_allclose(next_obs[0], gym_obs, atol=obs_atol)
        np.testing.assert_allclose(rewards[0], gym_reward, atol=reward_atol, rtol=1e-6)
        # absolute positions left out: EnvPool's reset info reports x = y = 0 and Humanoid's is its centre of mass,
        # so the state set here may be shifted (the dynamics do not depend on where the body stands)
        for key in (set(gym_info) & set(infos[0])) - {"x_position", "y_position", "distance_from_origin"}:
            np.testing.assert_allclose(infos[0][key], gym_info[key], atol=info_atol)
        obs, info = next_obs[0], infos[0]
        compared += 1
    assert compared >= 4


def test_episodes_as_dummy_vec_env_reports_them():
    """Two Hopper-v5 environments with a 30-step limit, stepped with the same actions as DummyVecEnv over
    Monitor-wrapped gymnasium environments, whose states are set to EnvPool's at every reset: the same observations,
    rewards, dones, terminal observations, truncation flags and Monitor episode records."""
    env_id, n_envs, limit = "Hopper-v5", 2, 30
    pool = EnvPoolVecEnv(env_id, n_envs, seed=1, env_kwargs={"max_episode_steps": limit})
    dummy = make_vec_env(env_id, n_envs=n_envs, seed=0, env_kwargs={"max_episode_steps": limit})
    model = dummy.envs[0].unwrapped.model

    def sync(rows):
        for idx in rows:
            qpos, qvel = gym_state(env_id, obs[idx], pool.reset_infos[idx], model)
            set_gym_state(dummy.envs[idx], qpos, qvel)

    obs = pool.reset()
    dummy.reset()
    sync(range(n_envs))
    rng = np.random.default_rng(1)
    ends = {"terminated": 0, "truncated": 0}
    for _ in range(150):
        # small actions keep some episodes alive up to the time limit; larger ones topple the hopper
        actions = rng.uniform(-1, 1, (n_envs, 3)).astype(np.float32) * rng.choice([0.05, 1.0])
        obs, rewards, dones, infos = pool.step(actions)
        d_obs, d_rewards, d_dones, d_infos = dummy.step(actions)
        assert rewards.dtype == d_rewards.dtype == np.float32
        np.testing.assert_array_equal(dones, d_dones)
        np.testing.assert_allclose(rewards, d_rewards, atol=REWARD_ATOL)
        for idx in range(n_envs):
            assert infos[idx]["TimeLimit.truncated"] == d_infos[idx]["TimeLimit.truncated"]
            if not dones[idx]:
                np.testing.assert_allclose(obs[idx], d_obs[idx], atol=OBS_ATOL)
                assert "episode" not in infos[idx]
                assert "terminal_observation" not in infos[idx]
                continue
            mine, theirs = infos[idx], d_infos[idx]
            np.testing.assert_allclose(mine["terminal_observation"], theirs["terminal_observation"], atol=OBS_ATOL)
            assert mine["TimeLimit.truncated"] == theirs["TimeLimit.truncated"]
            assert mine["episode"]["l"] == theirs["episode"]["l"]
            np.testing.assert_allclose(mine["episode"]["r"], theirs["episode"]["r"], atol=1e-3)
            assert set(mine["episode"]) == set(theirs["episode"])
            ends["truncated" if mine["TimeLimit.truncated"] else "terminated"] += 1
        sync(np.flatnonzero(dones))
    assert ends["terminated"] >= 2, ends
    assert ends["truncated"] >= 2, ends


def test_seeds_reproduce():
    """The same seed gives the same episodes; seed() takes effect at the next reset, as SB3's VecEnv seeds."""

    def episode(env, seed=None):
        if seed is not None:
            env.seed(seed)
        first = env.reset()
        steps = [env.step(np.full((2, 3), 0.3, np.float32))[0] for _ in range(5)]
        return np.concatenate([first, *steps])

    a, b = EnvPoolVecEnv("Hopper-v5", 2, seed=7), EnvPoolVecEnv("Hopper-v5", 2, seed=7)
    np.testing.assert_array_equal(episode(a), episode(b))
    np.testing.assert_array_equal(episode(a, seed=11), episode(EnvPoolVecEnv("Hopper-v5", 2, seed=11)))
    assert not np.array_equal(episode(a, seed=12), episode(b, seed=11))
    assert a.seed(3) == [3, 4]


def test_trains_under_vec_normalize_and_reports_episodes():
    """TRPO learns on it inside VecNormalize, and SB3's episode bookkeeping (rollout/ep_rew_mean) reads its infos."""
    env = VecNormalize(EnvPoolVecEnv("Hopper-v5", 2, seed=0))
    model = TRPO("MlpPolicy", env, n_steps=256, batch_size=128, seed=0).learn(1024)
    assert len(model.ep_info_buffer) > 0
    assert all(set(info) == {"r", "l", "t"} for info in model.ep_info_buffer)
    assert env.env_is_wrapped(Monitor) == [True, True]
    env.close()


def test_refusals():
    with pytest.raises(ValueError, match="EnvPool has no task 'NoSuchTask-v0'"):
        EnvPoolVecEnv("NoSuchTask-v0")
    with pytest.raises(ValueError, match="n_envs=0"):
        EnvPoolVecEnv("Hopper-v5", 0)
    with pytest.raises(ValueError, match="cannot make 'Hopper-v5' with env_kwargs"):
        EnvPoolVecEnv("Hopper-v5", 1, env_kwargs={"no_such_keyword": 1})
    pool = EnvPoolVecEnv("Hopper-v5", 1)
    with pytest.raises(AttributeError, match="no Python attribute 'model'"):
        pool.get_attr("model")
    pong = EnvPoolVecEnv("Pong-v5", 1)
    with pytest.raises(ValueError, match="another observation space"):
        check_same_spaces(pong, DummyVecEnv([lambda: gym.make("CartPole-v1")]), "Pong-v5")


def test_lean_collection_over_envpool_is_sb3s():
    """The lean loop over EnvPoolVecEnv (in VecNormalize, with time-limit truncations bootstrapped) collects
    exactly what SB3's loop collects over it."""
    from tests.test_collection import assert_identical_collection

    def make(fast: bool) -> TRPO:
        env = VecNormalize(EnvPoolVecEnv("Hopper-v5", 2, seed=0, env_kwargs={"max_episode_steps": 20}))
        return TRPO("MlpPolicy", env, n_steps=64, batch_size=64, seed=0, fast_collection=fast)

    result = assert_identical_collection(make, n_rollouts=3)
    assert len(result["episodes"]) > 5


# ---- the command line: --vec-env envpool ------------------------------------------------------------------------


#: 4 environments x 16 steps; an evaluation every 128 timesteps, a checkpoint every 256
CLI_RUN = [
    *["--vec-env", "envpool", "--envpool-threads", "2", "--n-envs", "4", "--timesteps", "1024", "--seed", "3"],
    *["--eval-freq", "128", "--eval-episodes", "1", "--checkpoint-freq", "256", "--no-progress-bar"],
    *["--hyperparams", "n_steps=16", "batch_size=64", "n_critic_updates=2"],
]


def test_cli_trains_on_envpool_and_resumes_after_a_kill(tmp_path):
    """Killed (SIGKILL) during its 9th update, the run resumes from its latest checkpoint on EnvPool, finishes its
    budget, and its model evaluates on gymnasium's environment."""
    output = tmp_path / "run"
    doom = {"DOOMED_MARKER": str(tmp_path / "killed"), "DOOMED_UPDATE": "9"}
    # tests.cli_envs.doomed kills the process at the start of the chosen update
    killed = run_cli(
        "train", "Hopper-v5", "--output", str(output), *CLI_RUN, "--gym-packages", "tests.cli_envs.doomed", env=doom
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    config = json.loads((output / "config.json").read_text())
    assert config["vec_env"] == "envpool"
    assert config["n_envs"] == 4
    assert checkpointing.latest_checkpoint(output) == output / "checkpoints" / "512"
    resumed = run_cli("train", "--resume", str(output), "--no-progress-bar", env=doom)
    assert resumed.returncode == 0, resumed.stderr
    assert "From the checkpoint at 512 timesteps" in resumed.stdout
    with zipfile.ZipFile(output / "model.zip") as archive:
        assert json.loads(archive.read("data"))["num_timesteps"] == 1024
    assert list(np.load(output / "evaluations.npz")["timesteps"]) == list(range(128, 1025, 128))
    evaluated = run_cli("eval", str(output), "--episodes", "2")
    assert evaluated.returncode == 0, evaluated.stderr


@pytest.mark.parametrize(
    ("env_id", "message"),
    [
        ("Taxi-v4", "EnvPool has no task 'Taxi-v4'"),
        ("Blackjack-v1", "EnvPool's Blackjack-v1 has another observation space"),
        ("tests.cli_envs.tiny:CliTiny-v0", "runs EnvPool's own tasks, not 'tests.cli_envs.tiny:CliTiny-v0'"),
    ],
)
def test_cli_refuses_what_envpool_cannot_stand_in_for(env_id, message, tmp_path, capsys):
    assert main(["train", env_id, "--vec-env", "envpool", "--output", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert message in error
    assert "Traceback" not in error


def test_cli_says_how_to_install_envpool(monkeypatch, tmp_path, capsys):
    def missing() -> None:
        raise ImportError('EnvPool is not installed (no module named envpool): `pip install "sb3-trpo[envpool]"`')

    monkeypatch.setattr(envpool_env, "import_envpool", missing)
    assert main(["train", "Hopper-v5", "--vec-env", "envpool", "--output", str(tmp_path / "run")]) == 2
    assert 'pip install "sb3-trpo[envpool]"' in capsys.readouterr().err
    assert main(["train", "Hopper-v5", "--envpool-threads", "0", "--vec-env", "envpool", "--output", str(tmp_path / "r")]) == 2
    assert "--envpool-threads 0: must be at least 1" in capsys.readouterr().err
