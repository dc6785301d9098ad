"""A user's own environment on the command line: gymnasium's ``MODULE:ENV_ID`` and rl-zoo3's ``--gym-packages``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium
import pytest

from sb3_trpo.cli import main
from sb3_trpo.cli.presets import preset_for
from sb3_trpo.cli.runs import CONFIG, MODEL
from tests.cli_envs.tiny import ENV_ID, EPISODE_STEPS

MODULE = "tests.cli_envs.tiny"
# a few instant updates: the tiny environment needs no learning to be trained and evaluated
TINY = [
    *["--timesteps", "64", "--eval-freq", "32", "--eval-episodes", "1", "--seed", "0", "--no-progress-bar"],
    *["--hyperparams", "n_steps=32", "batch_size=32", "n_critic_updates=1"],
]


def forget_the_environment() -> None:
    """Un-import the module and unregister its environment: registration is process-wide, so only a fresh import
    shows that the command line imported the module itself."""
    sys.modules.pop(MODULE, None)
    gymnasium.registry.pop(ENV_ID, None)


@pytest.fixture
def unregistered():
    forget_the_environment()
    assert ENV_ID not in gymnasium.registry
    yield
    forget_the_environment()


def test_train_and_eval_of_an_environment_given_as_module_colon_id(unregistered, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(["train", f"{MODULE}:{ENV_ID}", "--output", str(output), *TINY]) == 0
    assert (output / MODEL).is_file()
    config = json.loads((output / CONFIG).read_text())
    assert config["env_id"] == f"{MODULE}:{ENV_ID}"  # eval of the run imports the module again from it
    capsys.readouterr()

    forget_the_environment()  # as in a new process
    assert main(["eval", str(output), "--episodes", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{MODULE}:{ENV_ID}: return ")
    assert f"episode length {EPISODE_STEPS:.1f}" in out

    forget_the_environment()  # a model file with the environment given explicitly in the same form
    assert main(["eval", str(output / MODEL), f"{MODULE}:{ENV_ID}", "--episodes", "1"]) == 0


def test_train_and_eval_with_gym_packages(unregistered, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(["train", ENV_ID, "--gym-packages", MODULE, "--output", str(output), *TINY]) == 0
    config = json.loads((output / CONFIG).read_text())
    assert config["env_id"] == ENV_ID
    assert config["gym_packages"] == [MODULE]
    capsys.readouterr()

    forget_the_environment()  # eval of the run imports the packages config.json records
    assert main(["eval", str(output), "--episodes", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"{ENV_ID}: return ")

    forget_the_environment()  # a model file: the packages given to eval
    assert main(["eval", str(output / MODEL), ENV_ID, "--gym-packages", MODULE, "--episodes", "1"]) == 0


def test_gym_packages_may_come_before_env_id_when_ended_by_a_double_dash(unregistered, tmp_path):
    output = tmp_path / "run"
    assert main(["train", "--output", str(output), *TINY, "--gym-packages", MODULE, "--", ENV_ID]) == 0
    assert json.loads((output / CONFIG).read_text())["gym_packages"] == [MODULE]


@pytest.mark.parametrize(
    "argv",
    [
        ["train", f"no_such_module_for_sb3_trpo:{ENV_ID}"],
        ["train", ENV_ID, "--gym-packages", "no_such_module_for_sb3_trpo"],
        ["eval", "RUN", f"no_such_module_for_sb3_trpo:{ENV_ID}"],
        ["eval", "RUN", ENV_ID, "--gym-packages", "no_such_module_for_sb3_trpo"],
    ],
)
def test_an_unimportable_module_is_one_line_and_exit_status_2(argv, unregistered, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / MODEL).write_bytes(b"")  # never read: the module is imported before the model is loaded
    argv = [str(run) if arg == "RUN" else arg for arg in argv]
    before = sorted(tmp_path.rglob("*"))
    assert main([*argv, "--output", str(tmp_path / "out")] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "cannot import 'no_such_module_for_sb3_trpo'" in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_a_module_that_does_not_register_the_id_is_an_unknown_environment(unregistered, tmp_path, capsys):
    assert main(["train", "json:NotRegisteredByJson-v0", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unknown environment 'json:NotRegisteredByJson-v0'" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_preset_is_found_by_the_id_part_of_module_colon_id():
    assert preset_for("gymnasium.envs:CartPole-v1") == preset_for("CartPole-v1")
    assert preset_for("my_package.envs:Hopper-v4") == preset_for("Hopper-v5")


USER_MODULE = """
import gymnasium as gym
import numpy as np
from gymnasium import spaces


class Coin(gym.Env):
    metadata = {"render_modes": ["rgb_array"]}
    observation_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, render_mode=None):
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), float(action), False, False, {}


gym.register("UserCoin-v0", entry_point=Coin, max_episode_steps=8)
"""


@pytest.mark.parametrize("form", ["module-colon-id", "gym-packages"])
def test_the_console_script_finds_a_module_in_the_working_directory(tmp_path, form):
    """``python -m`` puts the working directory on the import path, a console script does not: a user's module beside
    them must be found by ``sb3-trpo`` all the same, as ``gymnasium.make("my_envs:...")`` finds it in their script."""
    (tmp_path / "my_envs.py").write_text(USER_MODULE)
    script = Path(sys.executable).with_name("sb3-trpo")
    env = ["my_envs:UserCoin-v0"] if form == "module-colon-id" else ["UserCoin-v0", "--gym-packages", "my_envs"]
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    train = subprocess.run(
        [str(script), "train", *env, "--output", "run", *TINY], cwd=tmp_path, capture_output=True, text=True, env=environment
    )
    assert train.returncode == 0, train.stderr
    evaluation = subprocess.run(
        [str(script), "eval", "run", "--episodes", "1"], cwd=tmp_path, capture_output=True, text=True, env=environment
    )
    assert evaluation.returncode == 0, evaluation.stderr
    assert evaluation.stdout.startswith(f"{env[0]}: return ")


@pytest.mark.parametrize("form", ["module-colon-id", "gym-packages"])
def test_environments_in_subprocesses_are_registered_there_too(form, unregistered, tmp_path):
    # a SubprocVecEnv worker starts without the registrations of this process: it imports the module itself
    output = tmp_path / "run"
    env = [f"{MODULE}:{ENV_ID}"] if form == "module-colon-id" else [ENV_ID, "--gym-packages", MODULE]
    assert main(["train", *env, "--output", str(output), "--vec-env", "subproc", "--n-envs", "2", *TINY]) == 0
    assert json.loads((output / CONFIG).read_text())["vec_env"] == "subproc"
    default = tmp_path / "default"
    assert main(["train", *env, "--output", str(default), *TINY]) == 0
    assert json.loads((default / CONFIG).read_text())["vec_env"] == "dummy"  # measured faster: the default
