"""The ``sb3-trpo`` command line: train, eval and plot on short runs, and their error paths."""

import ast
import inspect
import json
import pathlib
import pickle
import shutil
import subprocess
import sys

import gymnasium
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.vec_env import VecNormalize

from sb3_trpo import TRPO
from sb3_trpo.cli import main, runs
from sb3_trpo.cli.presets import DEFAULT, CliError, algorithm_for, apply_overrides, load_presets, model_kwargs, preset_for
from sb3_trpo.cli.runs import BEST_MODEL, BEST_VEC_NORMALIZE, CONFIG, EVALUATIONS, MODEL, VEC_NORMALIZE
from tests.helpers import without_embedded_statistics

SHORT = ["--timesteps", "2048", "--eval-freq", "1024", "--eval-episodes", "2", "--seed", "0", "--no-progress-bar"]
SMALL = ["--hyperparams", "n_steps=256", "batch_size=128", "n_critic_updates=2"]


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    """One short CartPole run through the command line, shared by the tests that read what it left."""
    output = tmp_path_factory.mktemp("runs") / "cartpole"
    assert main(["train", "CartPole-v1", "--output", str(output), *SHORT, *SMALL]) == 0
    return output


def test_train_saves_the_final_and_best_models_the_evaluations_and_its_settings(cartpole_run, capsys):
    for name in (MODEL, BEST_MODEL, EVALUATIONS, CONFIG):
        assert (cartpole_run / name).is_file(), name
    config = json.loads((cartpole_run / CONFIG).read_text())
    assert config["env_id"] == "CartPole-v1"
    assert config["seed"] == 0
    assert config["n_envs"] == 2  # from the preset
    assert config["threads"] == 1  # the CLI's default: one torch thread
    assert config["hyperparams"]["n_steps"] == 256  # overridden
    assert config["hyperparams"]["cg_damping"] == 0.001  # from the preset
    model = TRPO.load(cartpole_run / MODEL)
    assert model.num_timesteps == 2048
    assert model.n_steps == 256
    evaluations = np.load(cartpole_run / EVALUATIONS)
    assert list(evaluations["timesteps"]) == [1024, 2048]


def test_train_prints_progress_and_a_summary(tmp_path, capsys, monkeypatch):
    import sb3_trpo.cli.train

    monkeypatch.setattr(sb3_trpo.cli.train, "_rich_progress_bar_available", lambda: False)  # as without tqdm and rich
    output = tmp_path / "run"
    with_progress = [arg for arg in SHORT if arg != "--no-progress-bar"]
    assert main(["train", "CartPole-v1", "--output", str(output), *with_progress, *SMALL, "--n-envs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "50%  1,024 / 2,048 timesteps" in printed
    assert "100%" in printed
    assert "Summary" in printed
    assert "final return" in printed
    assert str(output / MODEL) in printed


@pytest.fixture(scope="module")
def acrobot_run(tmp_path_factory):
    """A short run of a normalized preset (Acrobot-v1: normalize=true), evaluated every 512 timesteps."""
    output = tmp_path_factory.mktemp("runs") / "acrobot"
    short = [*SHORT[:2], "--eval-freq", "512", *SHORT[4:]]
    assert main(["train", "Acrobot-v1", "--output", str(output), *short, *SMALL]) == 0
    return output


def _evaluated_env(monkeypatch, argv):
    """Run ``sb3-trpo eval`` with ``argv`` and return the environment it evaluated on."""
    import sb3_trpo.cli.runs

    seen = []

    def recording_evaluate(model, env, episodes, deterministic, masked):
        seen.append(env)
        return [0.0], [1]

    monkeypatch.setattr(sb3_trpo.cli.runs, "evaluate", recording_evaluate)
    assert main(["eval", *argv]) == 0
    (env,) = seen
    return env


def _statistics(path):
    with open(path, "rb") as file:
        return pickle.load(file)


def test_train_with_normalize_saves_the_vec_normalize_statistics_and_eval_uses_them(acrobot_run, monkeypatch):
    saved = _statistics(acrobot_run / VEC_NORMALIZE)
    # obs_rms counts the n_envs first observations and n_envs per step (plus its epsilon): the end of training
    assert saved.obs_rms.count == pytest.approx(2048 + 2, abs=1e-3)
    env = _evaluated_env(monkeypatch, [str(acrobot_run), "--episodes", "2"])
    assert isinstance(env, VecNormalize)
    np.testing.assert_array_equal(env.obs_rms.mean, saved.obs_rms.mean)
    np.testing.assert_array_equal(env.obs_rms.var, saved.obs_rms.var)
    assert not env.training
    assert not env.norm_reward


def test_eval_best_uses_the_statistics_saved_with_the_best_model(acrobot_run, monkeypatch):
    evaluations = np.load(acrobot_run / EVALUATIONS)
    best_timestep = int(evaluations["timesteps"][np.argmax(evaluations["results"].mean(axis=1))])
    assert best_timestep < 2048, "the test needs a best model saved before the end of training"
    best = _statistics(acrobot_run / BEST_VEC_NORMALIZE)
    assert best.obs_rms.count == pytest.approx(best_timestep + 2, abs=1e-3)  # the statistics of that moment
    final = _statistics(acrobot_run / VEC_NORMALIZE)
    assert not np.allclose(best.obs_rms.mean, final.obs_rms.mean)
    env = _evaluated_env(monkeypatch, [str(acrobot_run), "--best", "--episodes", "2"])
    np.testing.assert_array_equal(env.obs_rms.mean, best.obs_rms.mean)
    np.testing.assert_array_equal(env.obs_rms.var, best.obs_rms.var)
    # the best model given as a file finds its statistics too
    env = _evaluated_env(monkeypatch, [str(acrobot_run / BEST_MODEL), "--episodes", "2"])
    np.testing.assert_array_equal(env.obs_rms.mean, best.obs_rms.mean)


def test_the_model_files_carry_their_statistics_and_eval_prefers_them(acrobot_run, tmp_path, monkeypatch):
    # a kill after a new best model was written but before its statistics: the .pkl beside it is another moment's
    torn = tmp_path / "torn"
    shutil.copytree(acrobot_run, torn)
    shutil.copyfile(torn / VEC_NORMALIZE, torn / BEST_VEC_NORMALIZE)
    best, final = _statistics(acrobot_run / BEST_VEC_NORMALIZE), _statistics(acrobot_run / VEC_NORMALIZE)
    for model_file, statistics in ((BEST_MODEL, best), (MODEL, final)):
        carried = pickle.loads(runs.embedded_statistics(torn / model_file))
        np.testing.assert_array_equal(carried.obs_rms.mean, statistics.obs_rms.mean)
        assert carried.obs_rms.count == statistics.obs_rms.count
    env = _evaluated_env(monkeypatch, [str(torn), "--best", "--episodes", "2"])
    np.testing.assert_array_equal(env.obs_rms.mean, best.obs_rms.mean)  # the best model's, not the .pkl's
    TRPO.load(torn / BEST_MODEL)  # still an ordinary SB3 model file


def test_eval_best_of_a_normalized_run_without_best_statistics_is_refused(acrobot_run, tmp_path, capsys):
    old_run = tmp_path / "old"
    shutil.copytree(acrobot_run, old_run)
    (old_run / BEST_VEC_NORMALIZE).unlink()  # as runs made before the best model's statistics were saved
    without_embedded_statistics(old_run / BEST_MODEL)
    assert main(["eval", str(old_run), "--best", "--episodes", "2"]) == 2
    message = capsys.readouterr().err
    assert BEST_VEC_NORMALIZE in message
    assert "without --best" in message


def test_eval_prints_mean_and_std_over_n_episodes(cartpole_run, capsys):
    assert main(["eval", str(cartpole_run), "--episodes", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CartPole-v1: return ")
    assert "+/-" in out
    assert "over 3 episodes (deterministic)" in out


def test_eval_of_a_model_file_with_an_explicit_environment(cartpole_run, capsys):
    assert main(["eval", str(cartpole_run / BEST_MODEL), "CartPole-v1", "--episodes", "2", "--stochastic"]) == 0
    assert "(stochastic)" in capsys.readouterr().out


def test_plot_writes_a_png_of_several_runs(cartpole_run, tmp_path, capsys):
    second = tmp_path / "second"
    seed_1 = [*SHORT[:-3], "--seed", "1", "--no-progress-bar"]
    assert main(["train", "CartPole-v1", "--output", str(second), *seed_1, *SMALL]) == 0
    figure = tmp_path / "curves.png"
    assert main(["plot", str(cartpole_run), str(second), "--output", str(figure)]) == 0
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert "2 run(s), 1 curve(s)" in capsys.readouterr().out  # two seeds of one environment: one curve


def test_eval_records_one_video_per_episode(cartpole_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")  # no display here
    videos = tmp_path / "videos"
    assert main(["eval", str(cartpole_run), "--episodes", "2", "--video", str(videos)]) == 0
    assert sorted(p.name for p in videos.glob("*.mp4")) == ["rl-video-episode-0.mp4", "rl-video-episode-1.mp4"]
    assert f"videos in {videos}" in capsys.readouterr().out


def test_python_dash_m_runs_the_command_line():
    result = subprocess.run([sys.executable, "-m", "sb3_trpo", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "train" in result.stdout
    assert "eval" in result.stdout
    assert "plot" in result.stdout


def error_of(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "NoSuchEnv-v0"], "unknown environment 'NoSuchEnv-v0'"),
        (["train", "CartPole-v1", "--hyperparams", "n_stepz=10"], "unknown hyperparameter 'n_stepz'. Allowed: "),
        (["train", "CartPole-v1", "--hyperparams", "n_steps"], "expected key=value"),
        (["train", "CartPole-v1", "--hyperparams", "n_steps=abc"], "n_steps='abc' is not allowed: n_steps must be an integer"),
        (["train", "CartPole-v1", "--hyperparams", "gamma=[0.9]"], "gamma=[0.9] is not allowed"),
        (["train", "CartPole-v1", "--hyperparams", "normalize=1"], "normalize must be True or False"),
        (["train", "CartPole-v1", "--hyperparams", "seed=3"], "use --seed for it"),
        (["train", "CartPole-v1", "--hyperparams", "distributed=True"], "needs a script launched with torchrun"),
        (["train", "CartPole-v1", "--hyperparams", "policy=Foo"], "policy must be one of MlpPolicy, CnnPolicy"),
        (
            ["train", "CartPole-v1", "--hyperparams", "policy_kwargs={'activation_fn': 'Nope'}"],
            "not a torch.nn activation",
        ),
        (["train", "CartPole-v1", "--hyperparams", "env_kwargs=3"], "env_kwargs must be a dict of gymnasium.make keywords"),
        (["train", "CartPole-v1", "--hyperparams", "env_kwargs={'nope': 1}"], "does not take env_kwargs {'nope': 1}"),
        (["train", "CartPole-v1", "--timesteps", "0"], "--timesteps 0: must be >= 1"),
        (["train", "CartPole-v1", "--threads", "0"], "--threads 0: must be >= 1"),
        (["eval", "does/not/exist"], "does/not/exist does not exist"),
        (["plot", "does/not/exist"], "does/not/exist is not a folder"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is written where the tests run from
    assert message in error_of(argv, capsys)
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_eval_of_a_folder_without_a_model(tmp_path, capsys):
    assert "no model in" in error_of(["eval", str(tmp_path)], capsys)


def test_eval_of_a_model_without_config_needs_the_environment(cartpole_run, tmp_path, capsys):
    lone = tmp_path / "lone.zip"
    lone.write_bytes((cartpole_run / MODEL).read_bytes())
    assert "ENV_ID is needed" in error_of(["eval", str(lone)], capsys)


def test_eval_of_a_damaged_model_file(tmp_path, capsys):
    damaged = tmp_path / "model.zip"
    damaged.write_bytes(b"not a zip")
    assert "truncated or damaged" in error_of(["eval", str(damaged), "CartPole-v1"], capsys)


def test_plot_of_a_folder_without_evaluations(tmp_path, capsys):
    assert f"has no {EVALUATIONS}" in error_of(["plot", str(tmp_path)], capsys)


def test_plot_without_matplotlib_says_how_to_install_it(cartpole_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert 'pip install "sb3-trpo[plot]"' in error_of(["plot", str(cartpole_run)], capsys)


def test_eval_video_without_moviepy_says_how_to_install_it(cartpole_run, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "moviepy" else real(name, *a))
    assert "pip install moviepy" in error_of(["eval", str(cartpole_run), "--video", "videos"], capsys)


def test_every_preset_is_valid_for_its_algorithm():
    presets = load_presets()
    assert {"CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1", "LunarLander-v3", "Hopper-v5"} <= set(presets)
    for env_id in presets:
        preset = preset_for(env_id)
        assert preset.source
        assert preset.n_envs >= 1
        assert preset.n_timesteps >= 1
        algorithm = algorithm_for(preset.policy)  # RecurrentTRPO for an LSTM policy
        algorithm(preset.policy, None, **model_kwargs(preset.hyperparams), _init_setup_model=False)  # accepted and valid


def test_other_versions_share_a_preset_and_unknown_environments_get_defaults():
    assert preset_for("Hopper-v4") == preset_for("Hopper-v5")
    assert preset_for("Blackjack-v1") == DEFAULT


def test_a_presets_env_kwargs_apply_to_the_version_it_was_measured_on_only(monkeypatch):
    import sb3_trpo.cli.presets as presets_module

    entry = {"source": "measured", "n_envs": 1, "normalize": False, "n_timesteps": 10, "hyperparams": {}}
    keywords = {"include_cfrc_ext_in_observation": False}
    monkeypatch.setattr(presets_module, "load_presets", lambda: {"Ant-v5": {**entry, "env_kwargs": keywords}})
    assert preset_for("Ant-v5").env_kwargs == keywords
    older = preset_for("Ant-v4")  # Ant-v4 has no such keyword: the hyperparameters only, and the source says so
    assert older.env_kwargs == {}
    assert "not applied to Ant-v4" in str(older.source)
    assert apply_overrides(preset_for("Ant-v5"), ["env_kwargs={}"]).env_kwargs == {}


@pytest.mark.skipif(int(gymnasium.__version__.split(".")[0]) < 1, reason="sutton_barto_reward needs gymnasium >= 1.0")
def test_env_kwargs_reach_the_training_and_evaluation_environments(tmp_path, capsys):
    """CartPole's Sutton-Barto reward (0 per step, -1 when the pole falls) makes every return -1 or 0, where the
    default reward gives +1 per step: train's periodic evaluations and ``eval`` of the run both show it."""
    output = tmp_path / "run"
    keywords = "env_kwargs={'sutton_barto_reward': True}"
    assert main(["train", "CartPole-v1", "--output", str(output), *SHORT, *SMALL, keywords]) == 0
    assert "Environment keywords: {'sutton_barto_reward': True}" in capsys.readouterr().out
    assert json.loads((output / CONFIG).read_text())["env_kwargs"] == {"sutton_barto_reward": True}
    assert np.all(np.load(output / EVALUATIONS)["results"] <= 0)
    assert main(["eval", str(output), "--episodes", "3"]) == 0
    assert "CartPole-v1: return -" in capsys.readouterr().out  # rebuilt with the keywords from config.json


def test_overrides_parse_python_literals():
    preset = apply_overrides(
        DEFAULT, ["gamma=0.98", "use_sde=True", "normalize=True", "n_envs=4", "policy_kwargs={'net_arch': [32, 32]}"]
    )
    assert preset.hyperparams == {"gamma": 0.98, "use_sde": True, "policy_kwargs": {"net_arch": [32, 32]}}
    assert preset.normalize is True
    assert preset.n_envs == 4


def test_threads_sets_torchs_thread_count_for_the_run(tmp_path, monkeypatch):
    chosen = []
    monkeypatch.setattr(th, "set_num_threads", chosen.append)
    short = ["--timesteps", "256", "--eval-freq", "0", "--hyperparams", "n_steps=128", "batch_size=128"]
    assert main(["train", "CartPole-v1", "--output", str(tmp_path / "run"), "--threads", "3", *short]) == 0
    assert chosen == [3]
    assert json.loads((tmp_path / "run" / CONFIG).read_text())["threads"] == 3


MUJOCO_TASKS = ("Hopper", "HalfCheetah", "Walker2d", "Ant", "Swimmer", "Humanoid", "InvertedDoublePendulum")
LEARNING_RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "learning"


def _with_defaults(hyperparams: dict) -> dict:
    defaults = {name: p.default for name, p in inspect.signature(TRPO.__init__).parameters.items() if p.default is not p.empty}
    return {**defaults, **hyperparams}


@pytest.mark.parametrize("task", MUJOCO_TASKS)
def test_a_measured_preset_is_what_its_benchmark_ran_and_its_source_quotes_the_result(task):
    """A preset that names its learning-benchmark runs must be exactly the settings those runs used (3 seeds at the
    preset's budget), and its ``source`` must quote their mean final return."""
    env_id = f"{task}-v5"
    entry = load_presets().get(env_id)
    if entry is None or "benchmark" not in entry:
        pytest.skip(f"{env_id}: no measured preset yet")
    # the runs are in benchmarks/results/learning unless the preset names another results directory
    results = LEARNING_RESULTS.parent / entry.get("results", LEARNING_RESULTS.name)
    runs = [json.loads(p.read_text()) for p in sorted((results / entry["benchmark"]).glob("seed*/result.json"))]
    # the preset is chosen on seeds 0-2; further seeds run later (e.g. beside a peer) are evidence, not its quote
    runs = [r for r in runs if r["seed"] in (0, 1, 2)]
    assert sorted(r["seed"] for r in runs) == [0, 1, 2]
    preset = preset_for(env_id)
    for run in runs:
        assert run["env"] == env_id
        assert run["timesteps"] == preset.n_timesteps
        assert run["settings"]["n_envs"] == preset.n_envs
        assert bool(run["settings"]["normalize"]) == preset.normalize
        assert run["settings"].get("env_kwargs", {}) == preset.env_kwargs
        assert _with_defaults(run["settings"]["kwargs"]) == _with_defaults(preset.hyperparams)
    mean_final = float(np.mean([r["final_return_mean"] for r in runs]))
    assert f"{mean_final:.0f}" in preset.source


def test_a_linear_schedule_in_hyperparams_becomes_sb3s_linear_schedule():
    preset = apply_overrides(
        preset_for("Hopper-v5"), ["target_kl={'linear': [0.05, 0.01]}", "learning_rate={'linear': [1e-3, 0]}"]
    )
    kwargs = model_kwargs(preset.hyperparams)
    assert kwargs["target_kl"](1.0) == pytest.approx(0.05)
    assert kwargs["target_kl"](0.0) == pytest.approx(0.01)
    assert kwargs["learning_rate"](0.5) == pytest.approx(5e-4)
    assert preset.hyperparams["target_kl"] == {"linear": [0.05, 0.01]}  # the JSON form is what config.json records
    TRPO("MlpPolicy", None, **kwargs, _init_setup_model=False)


@pytest.mark.parametrize("bad", ["{'linear': [0.05]}", "{'cosine': [0.05, 0.01]}", "{'linear': ['a', 0.01]}"])
def test_a_malformed_schedule_says_how_to_write_one(bad):
    preset = apply_overrides(DEFAULT, [f"target_kl={bad}"])
    with pytest.raises(CliError, match=r"target_kl=.*: a schedule is written \{'linear': \[start, end\]\}"):
        model_kwargs(preset.hyperparams)


PARTIAL_OBSERVABILITY_RESULTS = LEARNING_RESULTS.parent / "partial_observability"


@pytest.mark.parametrize("env_id", ["CartPoleNoVel-v1", "PendulumNoVel-v1", "MountainCarContinuousNoVel-v0"])
def test_a_recurrent_preset_is_what_its_benchmark_ran_and_its_source_quotes_the_result(env_id, monkeypatch):
    """As for the MuJoCo presets: a partially observed task's preset is exactly what RecurrentTRPO ran in
    ``benchmarks/partial_observability.py`` (3 seeds), and its ``source`` quotes their mean final return."""
    entry = load_presets().get(env_id)
    if entry is None:
        pytest.skip(f"{env_id}: no measured preset")
    monkeypatch.syspath_prepend(str(LEARNING_RESULTS.parents[1]))  # the benchmark script imports its neighbours
    from partial_observability import LSTM_NET, TASKS

    runs = [
        json.loads(p.read_text())
        for p in sorted((PARTIAL_OBSERVABILITY_RESULTS / entry["benchmark"]).glob("seed*/result.json"))
    ]
    assert sorted(r["seed"] for r in runs) == [0, 1, 2]
    preset = preset_for(env_id)
    task = TASKS[env_id]
    assert (preset.policy, preset.normalize) == ("MlpLstmPolicy", True)  # the script always normalizes
    expected_policy_kwargs = {**task.get("policy", LSTM_NET), **({"activation_fn": th.nn.ReLU} if task["relu"] else {})}
    if "cell" in task:
        expected_policy_kwargs["recurrent_layer_type"] = task["cell"]
    kwargs = model_kwargs(preset.hyperparams)
    assert kwargs.pop("policy_kwargs") == expected_policy_kwargs
    for run in runs:
        assert (run["task"], run["algorithm"]) == (env_id, "recurrent_trpo")
        assert int(run["settings"]["timesteps"]) == preset.n_timesteps
        assert int(run["settings"]["n_envs"]) == preset.n_envs
        assert ast.literal_eval(run["settings"]["trpo"]) == kwargs
    mean_final = float(np.mean([r["final_return"] for r in runs]))
    assert f"{mean_final:.1f}" in preset.source


POPGYM_RESULTS = LEARNING_RESULTS.parent / "popgym"
POPGYM_TASKS = ["RepeatPreviousEasy", "CountRecallEasy", "PositionOnlyCartPoleEasy", "NoisyPositionOnlyPendulumEasy"]


@pytest.mark.parametrize("task", POPGYM_TASKS)
def test_a_popgym_preset_is_what_its_benchmark_ran_and_its_source_quotes_the_result(task, monkeypatch):
    """A POPGym task's preset is exactly what RecurrentTRPO ran in ``benchmarks/popgym_tasks.py`` (3 seeds, with the cell
    the preset names), and its ``source`` quotes their mean final return."""
    entry = load_presets().get(f"popgym-{task}-v0")
    if entry is None:
        pytest.skip(f"{task}: no measured preset")
    monkeypatch.syspath_prepend(str(LEARNING_RESULTS.parents[1]))
    from popgym_tasks import LSTM_NET, N_ENVS, TASKS, TRPO

    runs = [json.loads(p.read_text()) for p in sorted((POPGYM_RESULTS / entry["benchmark"]).glob("seed*/result.json"))]
    assert sorted(r["seed"] for r in runs) == [0, 1, 2]
    preset = preset_for(f"popgym-{task}-v0")
    assert (preset.policy, preset.normalize, preset.n_envs) == ("MlpLstmPolicy", False, N_ENVS)
    assert preset.n_timesteps == TASKS[task]["timesteps"]
    kwargs = model_kwargs(preset.hyperparams)
    cell = kwargs["policy_kwargs"]["recurrent_layer_type"]
    assert entry["benchmark"] == f"{task}/recurrent_trpo_{cell}"
    assert kwargs.pop("policy_kwargs") == dict(LSTM_NET, recurrent_layer_type=cell)
    assert kwargs == TRPO
    for run in runs:
        assert (run["task"], run["algorithm"]) == (task, f"recurrent_trpo_{cell}")
        assert ast.literal_eval(run["settings"]["task"])["timesteps"] == preset.n_timesteps
    mean_final = float(np.mean([r["final_return"] for r in runs]))
    assert f"{mean_final:.3f}" in preset.source


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_an_lstm_policy_trains_recurrent_trpo_and_eval_loads_it(cell, tmp_path, capsys):
    output = tmp_path / "run"
    net = f"{{'lstm_hidden_size': 8, 'net_arch': [8], 'recurrent_layer_type': '{cell}'}}"
    lstm = ["policy=MlpLstmPolicy", f"policy_kwargs={net}"]
    assert main(["train", "CartPole-v1", "--output", str(output), *SHORT, *SMALL, *lstm]) == 0
    assert "Training RecurrentTRPO on CartPole-v1" in capsys.readouterr().out
    assert json.loads((output / CONFIG).read_text())["algorithm"] == "RecurrentTRPO"
    model = algorithm_for("MlpLstmPolicy").load(output / "model.zip")
    assert type(model).__name__ == "RecurrentTRPO"
    assert model.policy.recurrent_layer_type == cell
    assert main(["eval", str(output), "--episodes", "2"]) == 0  # the run folder: config.json names the algorithm
    assert main(["eval", str(output / "model.zip"), "CartPole-v1", "--episodes", "2"]) == 0  # the file alone
    assert capsys.readouterr().out.count("CartPole-v1: return") == 2


def test_a_policy_that_cannot_read_the_observations_is_refused_for_lstm_policies_too(tmp_path, capsys):
    error = error_of(
        ["train", "CartPole-v1", "--output", str(tmp_path / "run"), "--hyperparams", "policy=CnnLstmPolicy"], capsys
    )
    assert "policy=CnnLstmPolicy is for image observations" in error
    assert "use MlpLstmPolicy" in error


def test_an_lstm_policy_without_sb3_contrib_names_the_install_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_contrib(name, *args, **kwargs):
        if name.startswith("sb3_contrib") or name == "sb3_trpo.recurrent":
            raise ImportError('install it with `pip install "sb3-trpo[recurrent]"`')
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_contrib)
    with pytest.raises(CliError, match=r"policy=MlpLstmPolicy trains RecurrentTRPO: .*sb3-trpo\[recurrent\]"):
        algorithm_for("MlpLstmPolicy")
