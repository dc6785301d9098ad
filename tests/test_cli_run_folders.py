"""One run per folder: ``train`` refuses a folder that holds a run unless ``--overwrite``, which leaves nothing of
the old run, and ``eval`` applies VecNormalize statistics only to a run that ``config.json`` says was normalized."""

import json
import shutil

import pytest
from stable_baselines3.common.vec_env import VecNormalize

from sb3_trpo.cli import main
from sb3_trpo.cli.runs import BEST_MODEL, BEST_VEC_NORMALIZE, CONFIG, EVALUATIONS, MODEL, VEC_NORMALIZE
from tests.helpers import without_embedded_statistics

ENV = "tests.cli_envs.tiny:CliTiny-v0"  # instant episodes of 8 steps
TINY = [
    *["--timesteps", "64", "--eval-episodes", "1", "--seed", "0", "--no-progress-bar"],
    *["--hyperparams", "n_steps=32", "batch_size=32", "n_critic_updates=1"],
]
NORMALIZED = [*TINY, "normalize=True", "--eval-freq", "32"]  # every file a run may leave
PLAIN = [*TINY, "normalize=False", "--eval-freq", "0", "--checkpoint-freq", "0"]  # the fewest: config.json and model.zip


@pytest.fixture(scope="module")
def normalized_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "normalized"
    assert main(["train", ENV, "--output", str(output), *NORMALIZED]) == 0
    for name in (CONFIG, MODEL, BEST_MODEL, EVALUATIONS, VEC_NORMALIZE, BEST_VEC_NORMALIZE, "checkpoints/64/state.json"):
        assert (output / name).is_file(), name
    return output


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "plain"
    assert main(["train", ENV, "--output", str(output), *PLAIN]) == 0
    assert sorted(p.name for p in output.iterdir()) == [CONFIG, MODEL]
    return output


def _contents(folder):
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_train_refuses_a_folder_that_holds_a_run(normalized_run, tmp_path, capsys):
    folder = tmp_path / "x"
    shutil.copytree(normalized_run, folder)
    before = _contents(folder)
    assert main(["train", ENV, "--output", str(folder), *PLAIN]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{folder} already holds a run" in err
    assert "choose another --output folder" in err
    assert "--overwrite" in err
    assert _contents(folder) == before  # the earlier run is untouched


def test_train_into_an_existing_folder_without_a_run_is_fine(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert main(["train", ENV, "--output", str(folder), *PLAIN]) == 0
    assert (folder / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_the_run_and_leaves_nothing_of_the_old_one(normalized_run, tmp_path, capsys):
    folder = tmp_path / "x"
    shutil.copytree(normalized_run, folder)
    (folder / "notes.txt").write_text("not the run's")
    capsys.readouterr()
    assert main(["train", ENV, "--output", str(folder), *PLAIN, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "best evaluation" not in out  # no evaluations in this run: none of the old run's reported as its own
    # only what this run wrote (no evaluations, no normalization), and a file that is not a run's
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG, MODEL, "notes.txt"])
    assert json.loads((folder / CONFIG).read_text())["normalize"] is False
    env = _evaluated_env(folder, [])
    assert not isinstance(env, VecNormalize)


def test_overwrite_keeps_the_old_run_when_the_new_one_is_refused(normalized_run, tmp_path, capsys):
    folder = tmp_path / "x"
    shutil.copytree(normalized_run, folder)
    before = _contents(folder)
    assert main(["train", ENV, "--output", str(folder), *TINY, "n_stepz=3", "--overwrite"]) == 2
    assert "unknown hyperparameter 'n_stepz'" in capsys.readouterr().err
    assert _contents(folder) == before


def test_train_refuses_an_output_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("")
    assert main(["train", ENV, "--output", str(path), *PLAIN]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "is a file" in err


def _evaluated_env(folder, options):
    """Run ``sb3-trpo eval`` on ``folder`` and return the environment it evaluated on."""
    import sb3_trpo.cli.runs

    seen = []

    def recording_evaluate(model, env, episodes, deterministic, masked):
        seen.append(env)
        return [0.0], [1]

    patch = pytest.MonkeyPatch()
    patch.setattr(sb3_trpo.cli.runs, "evaluate", recording_evaluate)
    try:
        assert main(["eval", str(folder), "--episodes", "1", *options]) == 0
    finally:
        patch.undo()
    (env,) = seen
    return env


@pytest.mark.parametrize(("best", "missing"), [(False, VEC_NORMALIZE), (True, BEST_VEC_NORMALIZE)])
def test_eval_refuses_a_normalized_run_without_its_statistics(best, missing, normalized_run, tmp_path, capsys):
    folder = tmp_path / "x"
    shutil.copytree(normalized_run, folder)
    for name in (VEC_NORMALIZE, BEST_VEC_NORMALIZE):
        (folder / name).unlink()
    for name in (MODEL, BEST_MODEL):  # as runs made before the models carried their statistics inside
        without_embedded_statistics(folder / name)
    assert main(["eval", str(folder), "--episodes", "1", *(["--best"] if best else [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "normalize: true" in err
    assert f"{folder / missing} does not exist" in err


def test_eval_does_not_apply_statistics_to_a_run_that_was_not_normalized(plain_run, normalized_run, tmp_path, capsys):
    """A run folder reused before train refused it: config.json and model.zip of a run without normalization, and
    the statistics of an earlier normalized run, which would evaluate the model on observations it never saw."""
    folder = tmp_path / "x"
    shutil.copytree(plain_run, folder)
    shutil.copy(normalized_run / VEC_NORMALIZE, folder / VEC_NORMALIZE)
    env = _evaluated_env(folder, [])
    assert not isinstance(env, VecNormalize)
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"not applying {folder / VEC_NORMALIZE}" in err
    assert "normalize: false" in err


def test_eval_of_a_normalized_run_applies_its_statistics(normalized_run):
    assert isinstance(_evaluated_env(normalized_run, []), VecNormalize)
    assert isinstance(_evaluated_env(normalized_run, ["--best"]), VecNormalize)
