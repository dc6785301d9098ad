"""``sb3-trpo plot`` of runs evaluated at different steps: the average over runs does not depend on their order and
never extrapolates a run beyond the steps it was evaluated at."""

import itertools
import json

import numpy as np
import pytest

from sb3_trpo.cli import main
from sb3_trpo.cli.plot import draw, mean_and_band
from sb3_trpo.cli.runs import CONFIG, EVALUATIONS


def curve(steps, returns):
    return np.asarray(steps, dtype=np.int64), np.asarray(returns, dtype=float)


EVERY_10K = curve([10_000, 20_000, 30_000], [1.0, 2.0, 3.0])
ONLY_5K = curve([5_000], [50.0])
OFFSET = curve([5_000, 15_000, 25_000, 35_000], [10.0, 20.0, 30.0, 40.0])
LONGER = curve([0, 10_000, 20_000, 30_000, 40_000], [-5.0, 0.0, 5.0, 10.0, 15.0])


@pytest.mark.parametrize("runs", [[EVERY_10K, OFFSET, LONGER], [EVERY_10K, ONLY_5K], [ONLY_5K, OFFSET]])
def test_the_average_does_not_depend_on_the_order_of_the_runs(runs):
    first = mean_and_band(runs)
    for order in itertools.permutations(runs):
        for expected, actual in zip(first, mean_and_band(list(order)), strict=True):
            np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("order", list(itertools.permutations([EVERY_10K, OFFSET, LONGER])))
def test_the_average_stays_within_every_runs_steps(order):
    steps, mean, low, high = mean_and_band(list(order))
    # 10k to 30k: EVERY_10K is evaluated from 10k to 30k, the others over wider ranges
    assert steps[0] == 10_000
    assert steps[-1] == 30_000
    # every step any run was evaluated at in that range, each run interpolated between its own evaluations
    np.testing.assert_array_equal(steps, [10_000, 15_000, 20_000, 25_000, 30_000])
    every_10k, offset, longer = [1, 1.5, 2, 2.5, 3], [15, 20, 25, 30, 35], [0, 2.5, 5, 7.5, 10]
    np.testing.assert_allclose(mean, np.mean([every_10k, offset, longer], axis=0))
    np.testing.assert_allclose(low, [0, 1.5, 2, 2.5, 3])
    np.testing.assert_allclose(high, offset)


def test_one_run_is_its_own_curve():
    steps, mean, low, high = mean_and_band([OFFSET])
    np.testing.assert_array_equal(steps, OFFSET[0])
    for values in (mean, low, high):
        np.testing.assert_array_equal(values, OFFSET[1])


@pytest.mark.parametrize("order", [[EVERY_10K, ONLY_5K], [ONLY_5K, EVERY_10K]])
def test_runs_without_steps_in_common_have_no_average(order):
    """One run evaluated at 10k, 20k and 30k, another only at 5k: no step at which both have a value."""
    steps, mean, low, high = mean_and_band(order)
    for values in (steps, mean, low, high):
        assert values.shape == (0,)


class RecordingAxes:
    """Records what ``draw`` plots."""

    def __init__(self):
        self.lines = []

    def plot(self, steps, values, color=None, label=None, **kwargs):
        self.lines.append((np.asarray(steps), np.asarray(values), label))
        return (type("Line", (), {"get_color": lambda self: "C0"})(),)

    def fill_between(self, *args, **kwargs):
        pass


def test_runs_without_steps_in_common_are_drawn_one_by_one():
    axes = RecordingAxes()
    assert draw(axes, [EVERY_10K, ONLY_5K], "Env-v0") is False  # not averaged
    assert [list(steps) for steps, _, _ in axes.lines] == [[10_000, 20_000, 30_000], [5_000]]
    labels = [label for _, _, label in axes.lines if label]
    assert labels == ["Env-v0 (2 runs, not averaged: no steps in common)"]


def _write_run(folder, env_id, run):
    folder.mkdir()
    steps, returns = run
    np.savez(folder / EVALUATIONS, timesteps=steps, results=returns[:, None], ep_lengths=np.ones((len(steps), 1)))
    (folder / CONFIG).write_text(json.dumps({"env_id": env_id}))


@pytest.mark.parametrize("reverse", [False, True])
def test_plot_of_runs_without_steps_in_common_draws_them_and_says_so(reverse, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    folders = [tmp_path / "every_10k", tmp_path / "only_5k"]
    for folder, run in zip(folders, [EVERY_10K, ONLY_5K], strict=True):
        _write_run(folder, "Env-v0", run)
    figure = tmp_path / "curves.png"
    assert main(["plot", *map(str, folders[::-1] if reverse else folders), "--output", str(figure)]) == 0
    assert figure.read_bytes().startswith(b"\x89PNG")
    captured = capsys.readouterr()
    assert "2 run(s), 1 curve(s)" in captured.out
    assert "Env-v0: the 2 runs share no evaluated steps: drawn one by one, not averaged" in captured.err
