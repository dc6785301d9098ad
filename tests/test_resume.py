"""Resuming a killed run: ``sb3-trpo train --resume RUN_DIR`` and, for library scripts, SB3's ``CheckpointCallback``
with :func:`sb3_trpo.load_latest_checkpoint`.

What a checkpoint holds comes back exactly (parameters, the critic's optimizer state, VecNormalize's statistics, the
timestep count, the evaluation history and best model); the environments' own state does not, so a resumed run is
not compared with an uninterrupted one sample for sample.
"""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch as th
from stable_baselines3.common import callbacks as sb3_callbacks
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, CheckpointCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tests.cli_envs.tiny  # noqa: F401  (registers CliTiny-v0 for the library tests)
from sb3_trpo import TRPO, load_latest_checkpoint
from sb3_trpo.cli import checkpointing, main
from sb3_trpo.cli.runs import BEST_MODEL, CONFIG, EVALUATIONS, MODEL
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent
TINY = "tests.cli_envs.tiny:CliTiny-v0"
DOOMED = "tests.cli_envs.doomed:CliDoomed-v0"
BUDGET = 640
# 2 envs x 16 steps = rollouts of 32; an evaluation every 64 timesteps, a checkpoint every 128
RUN = [
    *["--timesteps", str(BUDGET), "--n-envs", "2", "--eval-freq", "64", "--eval-episodes", "2", "--seed", "3"],
    *["--checkpoint-freq", "128", "--hyperparams", "n_steps=16", "batch_size=16", "n_critic_updates=2", "normalize=True"],
]
EXPECTED_EVALUATIONS = list(range(64, BUDGET + 1, 64))


class KilledError(Exception):
    """Stands for SIGKILL in the in-process tests: nothing after it runs."""


def snapshot(model, evaluation) -> dict:
    """Everything a checkpoint must bring back, copied."""
    optimizer = model.policy.optimizer.state_dict()
    env = model.get_vec_normalize_env()
    return {
        "timesteps": model.num_timesteps,
        "n_updates": model._n_updates,
        "parameters": {k: v.clone() for k, v in model.policy.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer),
        "obs_rms": (env.obs_rms.mean.copy(), env.obs_rms.var.copy(), env.obs_rms.count),
        "ret_rms": (env.ret_rms.mean.copy(), env.ret_rms.var.copy(), env.ret_rms.count),
        "evaluations": (
            list(evaluation.evaluations_timesteps),
            [list(r) for r in evaluation.evaluations_results],
            [list(r) for r in evaluation.evaluations_length],
        ),
        "best_mean_reward": evaluation.best_mean_reward,
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert a["timesteps"] == b["timesteps"]
    assert a["n_updates"] == b["n_updates"]
    assert a["parameters"].keys() == b["parameters"].keys()
    for key in a["parameters"]:
        assert th.equal(a["parameters"][key], b["parameters"][key]), key
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert th.equal(value, b["optimizer"]["state"][index][key]), (index, key)
    for stat in ("obs_rms", "ret_rms"):
        for x, y in zip(a[stat], b[stat], strict=True):
            np.testing.assert_array_equal(x, y)
    assert a["evaluations"] == b["evaluations"]
    assert a["best_mean_reward"] == b["best_mean_reward"]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """A run killed during its rollout after 300 timesteps (its latest checkpoint is at 256), then resumed, in this
    process: the state at every checkpoint written and at the start of the resumed training is recorded."""
    output = tmp_path_factory.mktemp("resume") / "run"
    written: dict[int, dict] = {}
    monkeypatch = pytest.MonkeyPatch()
    write = checkpointing.RunCheckpoint.write

    def recording_write(self):
        folder = write(self)
        written[self.model.num_timesteps] = snapshot(self.model, self.eval_callback)
        return folder

    class KillAt(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps >= 300:
                raise KilledError
            return True

    learn = TRPO.learn
    monkeypatch.setattr(checkpointing.RunCheckpoint, "write", recording_write)
    monkeypatch.setattr(
        TRPO, "learn", lambda self, *a, callback, **k: learn(self, *a, callback=CallbackList([callback, KillAt()]), **k)
    )
    with pytest.raises(KilledError):
        main(["train", TINY, "--output", str(output), "--tensorboard-log", str(output / "tb"), *RUN, "--no-progress-bar"])
    killed_evaluations = dict(np.load(output / EVALUATIONS))
    killed_best = (output / BEST_MODEL).read_bytes()

    resumed: dict = {}
    progress: list[tuple[int, int]] = []

    def recording_learn(self, total_timesteps, callback, **kwargs):
        evaluation = next(c for c in callback.callbacks if isinstance(c, sb3_callbacks.EvalCallback))
        resumed["state"] = snapshot(self, evaluation)
        resumed["best_model"] = (output / BEST_MODEL).read_bytes()
        resumed["learn"] = (total_timesteps, kwargs)
        return learn(self, total_timesteps, callback=callback, **kwargs)

    class FakeBar:
        def __init__(self, total, initial):
            progress.append((total, initial))

        def update(self, n):
            pass

        def refresh(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(TRPO, "learn", recording_learn)
    monkeypatch.setattr(sb3_callbacks, "tqdm", FakeBar)
    assert main(["train", "--resume", str(output)]) == 0
    monkeypatch.undo()
    return output, written, killed_evaluations, killed_best, resumed, progress


def test_the_resumed_run_starts_from_exactly_the_state_of_its_last_checkpoint(killed_and_resumed):
    _, written, _, _, resumed, _ = killed_and_resumed
    assert sorted(written) == [128, 256, 384, 512, BUDGET]  # 384 and later by the resumed part
    assert resumed["state"]["timesteps"] == 256
    assert_same_state(resumed["state"], written[256])
    # SB3's own resumption: the remaining budget, the timestep count kept
    assert resumed["learn"][0] == BUDGET - 256
    assert resumed["learn"][1]["reset_num_timesteps"] is False


def test_the_evaluation_history_goes_on_without_duplicated_or_lost_rows(killed_and_resumed):
    output, _, killed, killed_best, resumed, _ = killed_and_resumed
    # the killed run had evaluated at 288 (after its checkpoint at 256): that row is made again, not kept twice
    assert list(killed["timesteps"]) == [64, 128, 192, 256]
    evaluations = np.load(output / EVALUATIONS)
    assert list(evaluations["timesteps"]) == EXPECTED_EVALUATIONS
    np.testing.assert_array_equal(evaluations["results"][:4], killed["results"])
    np.testing.assert_array_equal(evaluations["ep_lengths"][:4], killed["ep_lengths"])
    # the best model at the start of the resumed part is the checkpoint's (the best of the rows kept)
    assert resumed["best_model"] == killed_best


def test_the_resumed_run_ends_with_the_budget_and_records_the_resume(killed_and_resumed):
    output, *_ = killed_and_resumed
    with zipfile.ZipFile(output / MODEL) as archive:
        assert json.loads(archive.read("data"))["num_timesteps"] == BUDGET
    config = json.loads((output / CONFIG).read_text())
    assert config["timesteps"] == BUDGET
    assert [r["from_timesteps"] for r in config["resumes"]] == [256]
    assert config["resumes"][0]["seed"] != config["seed"]  # the resumed part does not replay the start's seeds
    # only the latest checkpoint is kept
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == [str(BUDGET)]


def test_the_progress_bar_starts_at_the_checkpoint(killed_and_resumed):
    *_, progress = killed_and_resumed
    assert progress == [(BUDGET, 256)]


def test_tensorboard_curves_continue_at_the_checkpoint_without_the_iterations_done_again(killed_and_resumed):
    output, *_ = killed_and_resumed
    folders = list((output / "tb").iterdir())
    assert len(folders) == 1  # the same run's curves, not a second run
    accumulator = EventAccumulator(str(folders[0]))
    accumulator.Reload()
    steps = [event.step for event in accumulator.Scalars("train/value_loss")]
    # one point per update, logged after the next rollout (SB3's order): 64 to 640, each once; the killed run's
    # 288 is purged, the update before the checkpoint is logged at 288 by the resumed run
    assert steps == list(range(64, BUDGET + 1, 32))
    # the rollout statistics are logged at every rollout's end, 32 to 640, each once
    assert [event.step for event in accumulator.Scalars("time/fps")] == list(range(32, BUDGET + 1, 32))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", "4"], "--seed 4 (the run's: 3)"),
        (["--n-envs", "1"], "--n-envs 1 (the run's: 2)"),
        (["--eval-freq", "32"], "--eval-freq 32 (the run's: 64)"),
        (["--hyperparams", "n_steps=8"], "--hyperparams n_steps=8"),
        (["--overwrite"], "--overwrite"),
    ],
)
def test_a_resume_that_would_change_the_settings_is_refused(killed_and_resumed, argv, message, tmp_path, capsys):
    output, *_ = killed_and_resumed
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(output), "--timesteps", "1000", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"--resume {output} keeps the run's settings, but {message}" in err
    assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before


def test_resuming_the_same_settings_given_again_is_allowed_and_a_finished_run_needs_a_larger_budget(
    killed_and_resumed, tmp_path, capsys
):
    output, *_ = killed_and_resumed
    assert main(["train", TINY, "--resume", str(output), "--seed", "3", "--n-envs", "2"]) == 2
    assert "has trained 640 timesteps, its budget is 640: pass --timesteps N with N > 640" in capsys.readouterr().err


def test_a_finished_run_trains_further_with_a_new_budget(killed_and_resumed, tmp_path):
    output, *_ = killed_and_resumed
    folder = tmp_path / "run"
    shutil.copytree(output, folder)
    config = json.loads((folder / CONFIG).read_text())
    config["tensorboard_log"] = None  # not the original run's folder
    (folder / CONFIG).write_text(json.dumps(config))
    assert main(["train", "--resume", str(folder), "--timesteps", "768", "--no-progress-bar"]) == 0
    assert list(np.load(folder / EVALUATIONS)["timesteps"]) == [*EXPECTED_EVALUATIONS, 704, 768]


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    output = tmp_path / "run"
    assert main(["train", TINY, "--output", str(output), *RUN, "--checkpoint-freq", "0", "--no-progress-bar"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(output)]) == 2
    assert "the run has no checkpoint to resume from" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no run there" in capsys.readouterr().err


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_the_latest(tmp_path, monkeypatch):
    output = tmp_path / "run"
    save = VecNormalize.save

    def dying_save(self, path):
        if ".256.partial" in str(path):  # the second checkpoint: its model is written, its statistics not yet
            raise KilledError
        save(self, path)

    monkeypatch.setattr(VecNormalize, "save", dying_save)
    with pytest.raises(KilledError):
        main(["train", TINY, "--output", str(output), *RUN, "--no-progress-bar"])
    assert checkpointing.latest_checkpoint(output) == output / "checkpoints" / "128"
    assert (output / "checkpoints" / ".256.partial" / MODEL).is_file()  # the unfinished one is not taken
    monkeypatch.undo()
    assert main(["train", "--resume", str(output), "--no-progress-bar"]) == 0
    assert list(np.load(output / EVALUATIONS)["timesteps"]) == EXPECTED_EVALUATIONS
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == [str(BUDGET)]


@pytest.mark.parametrize("kill", [{"DOOMED_STEP": "370"}, {"DOOMED_UPDATE": "9"}], ids=["mid-rollout", "mid-update"])
def test_a_run_killed_by_sigkill_resumes_from_the_command_line(tmp_path, kill):
    output = tmp_path / "run"
    doom = {"DOOMED_MARKER": str(tmp_path / "killed"), **kill}
    killed = run_cli("train", DOOMED, "--output", str(output), *RUN, "--no-progress-bar", env=doom)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpointing.latest_checkpoint(output) == output / "checkpoints" / "256"
    resumed = run_cli("train", "--resume", str(output), "--no-progress-bar", env=doom)
    assert resumed.returncode == 0, resumed.stderr
    assert "From the checkpoint at 256 timesteps" in resumed.stdout
    assert list(np.load(output / EVALUATIONS)["timesteps"]) == EXPECTED_EVALUATIONS
    with zipfile.ZipFile(output / MODEL) as archive:
        assert json.loads(archive.read("data"))["num_timesteps"] == BUDGET
    evaluated = run_cli("eval", str(output), "--episodes", "2")
    assert evaluated.returncode == 0, evaluated.stderr


def test_a_run_killed_after_its_last_checkpoint_is_finished_by_resume(tmp_path):
    # killed as it saved its final model: the budget is trained, the last checkpoint holds it, model.zip is missing
    output = tmp_path / "run"
    doom = {"DOOMED_MARKER": str(tmp_path / "killed"), "DOOMED_FINAL_SAVE": "1"}
    killed = run_cli("train", DOOMED, "--output", str(output), *RUN, "--no-progress-bar", env=doom)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpointing.latest_checkpoint(output) == output / "checkpoints" / str(BUDGET)
    assert not (output / MODEL).exists()
    resumed = run_cli("train", "--resume", str(output), "--no-progress-bar", env=doom)
    assert resumed.returncode == 0, resumed.stderr
    assert "finished training: writing its final model" in resumed.stdout
    with zipfile.ZipFile(output / MODEL) as archive:
        assert json.loads(archive.read("data"))["num_timesteps"] == BUDGET
    final, checkpoint = TRPO.load(output / MODEL), TRPO.load(output / "checkpoints" / str(BUDGET) / MODEL)
    for a, b in zip(final.policy.state_dict().values(), checkpoint.policy.state_dict().values(), strict=True):
        assert th.equal(a, b)
    assert list(np.load(output / EVALUATIONS)["timesteps"]) == EXPECTED_EVALUATIONS
    # a finished run with its final model is not resumed without a larger budget
    again = run_cli("train", "--resume", str(output), "--no-progress-bar")
    assert again.returncode == 2
    assert "pass --timesteps N with N > 640" in again.stderr


# ---- library scripts: SB3's CheckpointCallback and load_latest_checkpoint --------------------------------------


def _new_model(env):
    return TRPO("MlpPolicy", VecNormalize(env), n_steps=16, batch_size=16, n_critic_updates=2, seed=0)


def test_load_latest_checkpoint_restores_exactly_what_checkpoint_callback_saved(tmp_path):
    folder = tmp_path / "checkpoints"
    saved: dict[int, dict] = {}

    class Record(BaseCallback):  # runs right after CheckpointCallback, at the same calls
        def _on_step(self) -> bool:
            if self.n_calls % 64 == 0:
                saved[self.num_timesteps] = snapshot(self.model, _NoEvaluation)
            return True

    model = _new_model(make_vec_env("CliTiny-v0", n_envs=2, seed=0))
    checkpoint = CheckpointCallback(save_freq=64, save_path=str(folder), save_vecnormalize=True)
    model.learn(BUDGET, callback=[checkpoint, Record()])
    assert sorted(saved) == [128, 256, 384, 512, 640]
    loaded = load_latest_checkpoint(folder, make_vec_env("CliTiny-v0", n_envs=2, seed=1))
    assert isinstance(loaded, TRPO)
    assert isinstance(loaded.get_env(), VecNormalize)
    assert_same_state(snapshot(loaded, _NoEvaluation), saved[640])
    assert load_latest_checkpoint(tmp_path / "empty") is None


class _NoEvaluation:
    evaluations_timesteps = evaluations_results = evaluations_length = ()
    best_mean_reward = None


def test_load_latest_checkpoint_skips_one_a_kill_left_incomplete(tmp_path):
    folder = tmp_path / "checkpoints"
    model = _new_model(make_vec_env("CliTiny-v0", n_envs=2, seed=0))
    model.learn(256, callback=CheckpointCallback(save_freq=64, save_path=str(folder), save_vecnormalize=True))
    # the kill came while the callback wrote the statistics of 256 (after its model): they are cut short
    stats = folder / "rl_model_vecnormalize_256_steps.pkl"
    stats.write_bytes(stats.read_bytes()[:20])
    with pytest.warns(UserWarning, match=r"Skipped damaged or incomplete checkpoints: rl_model_vecnormalize_256"):
        loaded = load_latest_checkpoint(folder, make_vec_env("CliTiny-v0", n_envs=2, seed=0))
    assert loaded is not None
    assert loaded.num_timesteps == 128
    (folder / "rl_model_128_steps.zip").write_bytes(b"PK")
    stats.unlink()
    with pytest.raises(ValueError, match=r"Every checkpoint in .* is damaged or incomplete"):
        load_latest_checkpoint(folder, make_vec_env("CliTiny-v0", n_envs=2, seed=0))
    with pytest.raises(ValueError, match=r"have VecNormalize statistics: pass the environment"):
        load_latest_checkpoint(folder)


def test_a_killed_library_script_resumes_with_load_latest_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    doom = {"DOOMED_MARKER": str(tmp_path / "killed"), "DOOMED_STEP": "300"}
    command = [sys.executable, str(ROOT / "tests" / "resumable_script.py"), str(folder), str(BUDGET)]
    run = dict(cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    killed = subprocess.run(command, env={**os.environ, **doom}, **run)  # type: ignore[call-overload]
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "started from scratch" in killed.stdout
    resumed = subprocess.run(command, env={**os.environ, **doom}, **run)  # type: ignore[call-overload]
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at 256 timesteps" in resumed.stdout  # killed at 300 timesteps, saved at 256
    assert TRPO.load(folder / "final").num_timesteps == BUDGET
