"""Masks on the command line: ``sb3-trpo train`` trains a maskable class when the environment offers masks (or when
asked), records it, evaluates with the masks, resumes it as such, and ``eval`` passes them."""

import json
import warnings

import numpy as np
import pytest

from tests.helpers import import_sb3_contrib

import_sb3_contrib()  # a dev dependency: required in CI, skipped elsewhere without it

from sb3_trpo.cli import main  # noqa: E402
from sb3_trpo.cli.runs import CONFIG, EVALUATIONS, MODEL, algorithm_of  # noqa: E402

ENV = "tests.cli_envs.masked:CliMasked-v0"  # masks in the infos of its steps and resets; an illegal action pays -1
RUN = [
    *["--timesteps", "256", "--eval-freq", "64", "--eval-episodes", "4", "--seed", "0", "--no-progress-bar"],
    *["--checkpoint-freq", "128", "--hyperparams", "n_steps=32", "batch_size=32", "n_critic_updates=1"],
]


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "masked"
    assert main(["train", ENV, "--output", str(output), *RUN]) == 0
    return output


def test_an_environment_with_masks_trains_maskable_trpo_and_evaluates_with_them(masked_run, capsys):
    config = json.loads((masked_run / CONFIG).read_text())
    assert config["algorithm"] == "MaskableTRPO"
    assert config["action_masks"] is True
    assert algorithm_of(masked_run / MODEL, config).__name__ == "MaskableTRPO"
    # every periodic evaluation with the masks: no illegal action (which pays -1 and ends the episode)
    results = np.load(masked_run / EVALUATIONS)["results"]
    assert results.min() >= 0.0
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "predict was called without action_masks"
        assert main(["eval", str(masked_run), "--episodes", "5"]) == 0
    printed = capsys.readouterr().out
    mean = float(printed.split("return ")[1].split(" ")[0])
    assert mean >= 0.8  # 8 legal steps of at least 0.1


def test_a_resumed_masked_run_stays_maskable(masked_run, tmp_path):
    assert main(["train", "--resume", str(masked_run), "--timesteps", "320", "--no-progress-bar"]) == 0
    config = json.loads((masked_run / CONFIG).read_text())
    assert config["algorithm"] == "MaskableTRPO"
    assert np.load(masked_run / EVALUATIONS)["results"].min() >= 0.0
    assert main(["train", "--resume", str(masked_run), "--timesteps", "384", "--action-masks", "off"]) == 2


@pytest.mark.parametrize(
    ("options", "algorithm", "masks"),
    [
        # the one --hyperparams (a second replaces the first): RUN's settings and the policy
        (
            ["--hyperparams", *RUN[-3:], "policy=MlpLstmPolicy", "policy_kwargs={'lstm_hidden_size':8}"],
            "MaskableRecurrentTRPO",
            True,
        ),
        (["--action-masks", "off"], "TRPO", False),
    ],
)
def test_an_lstm_policy_trains_the_combined_class_and_masks_can_be_turned_off(options, algorithm, masks, tmp_path):
    output = tmp_path / "run"
    assert main(["train", ENV, "--output", str(output), *RUN, *options]) == 0
    config = json.loads((output / CONFIG).read_text())
    assert (config["algorithm"], config["action_masks"]) == (algorithm, masks)
    if masks:
        assert np.load(output / EVALUATIONS)["results"].min() >= 0.0
    if algorithm == "MaskableRecurrentTRPO":  # resumed as such, evaluated with masks and the LSTM's states
        assert main(["train", "--resume", str(output), "--timesteps", "320", "--no-progress-bar"]) == 0
        assert json.loads((output / CONFIG).read_text())["algorithm"] == algorithm
        assert algorithm_of(output / MODEL, config).__name__ == algorithm
        results = np.load(output / EVALUATIONS)["results"]
        assert len(results) == 5
        assert results.min() >= 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "predict was called without action_masks"
            assert main(["eval", str(output), "--episodes", "3"]) == 0


def test_an_environment_without_masks_trains_trpo_and_masks_on_says_what_is_missing(tmp_path, capsys):
    output = tmp_path / "plain"
    tiny = "tests.cli_envs.tiny:CliTiny-v0"
    plain = [*["--timesteps", "64", "--seed", "0", "--eval-freq", "0", "--checkpoint-freq", "0", "--no-progress-bar"]]
    assert main(["train", tiny, "--output", str(output), *plain, "--hyperparams", "n_steps=32", "batch_size=32"]) == 0
    assert json.loads((output / CONFIG).read_text())["algorithm"] == "TRPO"
    capsys.readouterr()
    assert main(["train", tiny, "--output", str(tmp_path / "on"), *RUN, "--action-masks", "on"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "--action-masks on, but tests.cli_envs.tiny:CliTiny-v0 offers no masks" in err
    assert not (tmp_path / "on").exists()


def test_a_maskable_model_evaluated_without_masks_warns_once(masked_run, tmp_path):
    from sb3_trpo import MaskableTRPO

    model = MaskableTRPO.load(masked_run / MODEL)
    obs = np.zeros((1, 6), dtype=np.float32)
    with pytest.warns(UserWarning, match=r"MaskableTRPO.predict was called without action_masks.*once per model"):
        model.predict(obs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.predict(obs)  # said once
        model.predict(obs, action_masks=np.ones((1, 6), dtype=bool))
