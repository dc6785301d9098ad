"""``sb3-trpo zoo``: rl-zoo3's train, enjoy, -optimize and --trained-agent running sb3_trpo's classes and presets."""

import builtins
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch as th
import yaml

from sb3_trpo.cli.presets import DEFAULT, CliError, model_kwargs, preset_for
from sb3_trpo.cli.zoo import register_algorithms, with_preset_config, zoo_hyperparameters

pytest.importorskip("rl_zoo3")


ROOT = Path(__file__).resolve().parent.parent


def zoo(*arguments: str, cwd: Path) -> str:
    """Run ``python -m sb3_trpo zoo ...`` as a user would (rl-zoo3 parses sys.argv and sets global state); the tests'
    environments are importable (``--gym-packages tests.cli_envs...``)."""
    command = [sys.executable, "-m", "sb3_trpo", "zoo", *arguments]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def load_run(folder: Path, algo: str, env_id: str):
    import sb3_trpo

    class_name = {"trpo": "TRPO", "trpo_lstm": "RecurrentTRPO", "trpo_lstm_maskable": "MaskableRecurrentTRPO"}[algo]
    return getattr(sb3_trpo, class_name).load(folder / algo / f"{env_id}_1" / f"{env_id}.zip")


def test_train_enjoy_and_continue_training_with_sb3_trpos_trpo(tmp_path):
    out = zoo("train", "--algo", "trpo", "--env", "CartPole-v1", "-n", "1024", "-f", "logs", "--seed", "0", cwd=tmp_path)
    assert "hyperparameters for CartPole-v1 from sb3_trpo's presets" in out
    model = load_run(tmp_path / "logs", "trpo", "CartPole-v1")
    assert type(model).__module__ == "sb3_trpo.trpo"  # not sb3-contrib's TRPO
    preset = preset_for("CartPole-v1")
    assert (model.n_steps, model.n_envs, model.cg_max_steps) == (512, 2, 15)  # the preset, not rl-zoo3's trpo.yml
    assert model.batch_size == preset.hyperparams["batch_size"]
    saved = yaml.load((tmp_path / "logs/trpo/CartPole-v1_1/CartPole-v1/config.yml").read_text(), Loader=yaml.UnsafeLoader)
    assert dict(saved)["n_critic_updates"] == preset.hyperparams["n_critic_updates"]

    out = zoo("enjoy", "--algo", "trpo", "--env", "CartPole-v1", "-f", "logs", "-n", "200", "--no-render", cwd=tmp_path)
    assert "Episode Reward" in out or "Mean reward" in out

    # --trained-agent: training goes on from the saved parameters (rl-zoo3 restarts the timestep count); with no
    # critic epochs the critic stays exactly as saved and a tiny trust region keeps the actor within 1e-3 of it,
    # which a freshly initialised model would not be
    trained = str(tmp_path / "logs/trpo/CartPole-v1_1/CartPole-v1.zip")
    frozen = ["--hyperparams", "target_kl:1e-10", "n_critic_updates:0"]
    zoo("train", "--algo", "trpo", "--env", "CartPole-v1", "-n", "1024", "-f", "more", "-i", trained, *frozen, cwd=tmp_path)
    continued = load_run(tmp_path / "more", "trpo", "CartPole-v1")
    assert continued.num_timesteps == 1024
    for name, value in model.policy.state_dict().items():
        assert th.allclose(continued.policy.state_dict()[name], value, atol=1e-3), name
    assert th.equal(continued.policy.value_net.weight, model.policy.value_net.weight)


def test_recurrent_trpo_trains_and_enjoys_as_trpo_lstm(tmp_path):
    # the cell is a policy keyword: trpo_lstm trains a GRU too
    tiny = "policy_kwargs:dict(lstm_hidden_size=8, net_arch=[8], recurrent_layer_type='gru')"
    zoo("train", "--algo", "trpo_lstm", "--env", "CartPole-v1", "-n", "512", "-f", "logs", "--seed", "0",
        "--hyperparams", "n_steps:128", "batch_size:128", tiny, cwd=tmp_path)  # fmt: skip
    model = load_run(tmp_path / "logs", "trpo_lstm", "CartPole-v1")
    assert type(model).__name__ == "RecurrentTRPO"
    assert model.policy.lstm_actor.hidden_size == 8
    assert model.policy.recurrent_layer_type == "gru"
    out = zoo("enjoy", "--algo", "trpo_lstm", "--env", "CartPole-v1", "-f", "logs", "-n", "100", "--no-render", cwd=tmp_path)
    assert "Episode Reward" in out or "Mean reward" in out


def test_masks_and_memory_train_and_enjoy_as_trpo_lstm_maskable_with_the_environments_masks(tmp_path):
    # CliMasked-v0 keeps its masks in its infos; an illegal action pays -1 and ends the episode
    env = ["--env", "CliMasked-v0", "--gym-packages", "tests.cli_envs.masked"]
    tiny = "policy_kwargs:dict(lstm_hidden_size=8, net_arch=[8])"
    zoo("train", "--algo", "trpo_lstm_maskable", *env, "-n", "512", "-f", "logs", "--seed", "0",
        "--hyperparams", "n_steps:128", "batch_size:128", tiny, cwd=tmp_path)  # fmt: skip
    model = load_run(tmp_path / "logs", "trpo_lstm_maskable", "CliMasked-v0")
    assert type(model).__name__ == "MaskableRecurrentTRPO"
    out = zoo("enjoy", "--algo", "trpo_lstm_maskable", *env, "-f", "logs", "-n", "200", "--no-render", cwd=tmp_path)
    rewards = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("Episode Reward")]
    assert rewards, out[-2000:]
    assert min(rewards) >= 0.0  # every action legal: the masks were passed to predict


@pytest.mark.slow
def test_a_two_trial_optimisation_with_rl_zoo3s_trpo_sampler(tmp_path):
    # rl-zoo3 seeds its random sampler with --seed: seed 6 draws two cheap trials (n_steps 128 and 512)
    zoo("train", "--algo", "trpo", "--env", "CartPole-v1", "-n", "2048", "-f", "logs", "--seed", "6", "-optimize",
        "--n-trials", "2", "--n-jobs", "1", "--sampler", "random", "--pruner", "none", "--eval-episodes", "2",
        "--n-evaluations", "1", cwd=tmp_path)  # fmt: skip
    reports = list((tmp_path / "logs/trpo").glob("report_CartPole-v1_2-trials-*.csv"))
    assert len(reports) == 1
    assert len(reports[0].read_text().strip().splitlines()) == 3  # a header and the 2 trials


def test_a_users_conf_file_wins():
    arguments = ["--algo", "trpo", "--env", "CartPole-v1", "-conf", "mine.yml"]
    assert with_preset_config(arguments) == arguments
    other = ["--algo", "ppo", "--env", "CartPole-v1"]  # not sb3_trpo's: rl-zoo3's own settings
    assert with_preset_config(other) == other


@pytest.mark.parametrize("env_id", ["Ant-v5", "HalfCheetah-v5"])
def test_the_preset_is_written_as_an_rl_zoo3_hyperparameter_file(capsys, env_id):
    arguments = with_preset_config(["--algo", "trpo", "--env", env_id])
    assert arguments[-2] == "--conf-file"
    entry = yaml.safe_load(Path(arguments[-1]).read_text())[env_id]
    preset = preset_for(env_id)
    if env_id == "Ant-v5":
        assert entry["learning_rate"] == "lin_0.001"  # {"linear": [0.001, 0.0]} as rl-zoo3 writes it
    else:  # the network, discount and GAE lambda of SB3's tuned PPO entry
        assert (entry["gamma"], entry["gae_lambda"], entry["target_kl"]) == (0.98, 0.92, 0.24)
    assert (entry["n_envs"], entry["n_timesteps"], entry["normalize"]) == (preset.n_envs, preset.n_timesteps, True)
    assert entry.get("env_kwargs", {}) == preset.env_kwargs
    from torch import nn

    expected = model_kwargs(preset.hyperparams)["policy_kwargs"]
    assert eval(entry["policy_kwargs"], {"nn": nn}) == expected  # rl-zoo3 evaluates it with nn in scope
    assert "sb3_trpo's presets" in capsys.readouterr().out


def test_policies_follow_the_algorithm():
    cartpole, novel = preset_for("CartPole-v1"), preset_for("CartPoleNoVel-v1")
    assert zoo_hyperparameters(cartpole, recurrent=True)["policy"] == "MlpLstmPolicy"
    feed_forward = zoo_hyperparameters(novel, recurrent=False)
    assert feed_forward["policy"] == "MlpPolicy"
    assert "lstm_hidden_size" not in feed_forward["policy_kwargs"]
    assert "activation_fn=nn.ReLU" in zoo_hyperparameters(novel, recurrent=True)["policy_kwargs"]
    assert zoo_hyperparameters(DEFAULT, recurrent=False) == {
        "policy": "MlpPolicy", "n_envs": 1, "n_timesteps": 1e6, "normalize": False
    }  # fmt: skip


def test_a_schedule_rl_zoo3_cannot_write_is_refused():
    preset = DEFAULT._replace(hyperparams={"target_kl": {"linear": [0.05, 0.01]}})
    with pytest.raises(CliError, match="rl-zoo3 writes schedules only as learning_rate lin_"):
        zoo_hyperparameters(preset, recurrent=False)


def test_without_rl_zoo3_the_error_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_zoo(name, *args, **kwargs):
        if name.startswith("rl_zoo3"):
            raise ImportError("No module named 'rl_zoo3'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zoo)
    with pytest.raises(CliError, match=r"pip install 'sb3-trpo\[zoo\]'"):
        register_algorithms()
