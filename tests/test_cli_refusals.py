"""Mistakes that ended in a traceback: each is now one line on stderr, exit status 2, and nothing written."""

import pytest

from sb3_trpo.cli import main
from sb3_trpo.cli.presets import DEFAULT, CliError, apply_overrides

TINY_ENV = "tests.cli_envs.tiny:CliTiny-v0"  # Box(1,) observations, Discrete(2) actions, 8 steps an episode
TINY = [
    *["--timesteps", "64", "--eval-freq", "0", "--seed", "0", "--no-progress-bar"],
    *["--hyperparams", "n_steps=32", "batch_size=32", "n_critic_updates=1"],
]


@pytest.fixture(scope="module")
def runs_of_the_tiny_env(tmp_path_factory):
    """A run without normalization and one with, to evaluate on an environment of other spaces."""
    folder = tmp_path_factory.mktemp("runs")
    for name, normalize in (("plain", False), ("normalized", True)):
        assert main(["train", TINY_ENV, "--output", str(folder / name), *TINY, f"normalize={normalize}"]) == 0
    return folder


def _everything_under(folder):
    return {path: path.read_bytes() if path.is_file() else None for path in folder.rglob("*")}


TRAIN = ["train", "CartPole-v1", "--timesteps", "256", "--eval-freq", "128", "--no-progress-bar"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*TRAIN, "--seed", "-1"], "--seed -1: must be an integer from 0 to 4294967295"),
        (
            ["train", "tests.cli_envs.tuple_actions:CliTupleActions-v0", *TINY],
            "environment tests.cli_envs.tuple_actions:CliTupleActions-v0: TRPO does not support the action space Tuple",
        ),
        ([*TRAIN, "--seed", str(2**32)], "--seed 4294967296: must be an integer from 0 to 4294967295"),
        (["eval", "RUNS/plain", "--seed", "-1"], "--seed -1: must be an integer from 0 to 4294967295"),
        ([*TRAIN, "--hyperparams", "policy=CnnPolicy"], "policy=CnnPolicy is for image observations"),
        ([*TRAIN, "--hyperparams", "policy=MultiInputPolicy"], "policy=MultiInputPolicy is for Dict observations"),
        (["eval", "RUNS/plain", "CartPole-v1"], "CartPole-v1 does not fit the model"),
        (["eval", "RUNS/normalized", "CartPole-v1"], "CartPole-v1 does not fit the model"),
        (
            [*TRAIN, "--hyperparams", "policy_kwargs={'activation_fn': 'Module'}"],
            "policy_kwargs activation_fn='Module': not a torch.nn activation",
        ),
        (
            [*TRAIN, "--hyperparams", "policy_kwargs={'activation_fn': 'Linear'}"],
            "policy_kwargs activation_fn='Linear': not a torch.nn activation",
        ),
    ],
)
def test_a_mistake_is_one_line_exit_status_2_and_nothing_written(
    argv, message, runs_of_the_tiny_env, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # train's default run folder would be under runs/ here
    argv = [arg.replace("RUNS", str(runs_of_the_tiny_env)) for arg in argv]
    if argv[0] == "train":
        argv += ["--output", str(tmp_path / "out")]
    before = {**_everything_under(tmp_path), **_everything_under(runs_of_the_tiny_env)}
    assert main(argv) == 2  # an exception here would be the traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"sb3-trpo {argv[0]}: error: ")
    assert message in err
    assert {**_everything_under(tmp_path), **_everything_under(runs_of_the_tiny_env)} == before


def test_the_spaces_of_both_are_named_when_eval_is_refused(runs_of_the_tiny_env, capsys):
    assert main(["eval", str(runs_of_the_tiny_env / "plain"), "Pendulum-v1"]) == 2
    err = capsys.readouterr().err
    assert "the model observes Box(1,) float32 and acts in Discrete(2)" in err
    assert "Pendulum-v1 observes Box(3,) float32 and acts in Box(1,) float32" in err
    assert f"trained on {TINY_ENV}" in err


@pytest.mark.parametrize("name", ["Tanh", "ReLU", "nn.ELU", "Identity", "Softmax"])
def test_an_activation_that_maps_a_tensor_to_one_of_the_same_shape_is_accepted(name):
    assert apply_overrides(DEFAULT, [f"policy_kwargs={{'activation_fn': {name!r}}}"]).hyperparams["policy_kwargs"]


@pytest.mark.parametrize("name", ["Module", "Linear", "Conv1d", "ModuleList", "ModuleDict", "Bilinear"])
def test_a_module_that_is_not_an_activation_is_refused(name):
    with pytest.raises(CliError, match=r"not a torch\.nn activation"):
        apply_overrides(DEFAULT, [f"policy_kwargs={{'activation_fn': {name!r}}}"])
