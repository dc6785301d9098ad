"""``sb3-trpo plot RUN_DIR...``: learning curves (evaluation return vs steps) of one or more runs, to PNG.

Runs of the same environment are drawn as one curve: the mean over runs, with a band from the lowest to the
highest run. Needs matplotlib (``pip install "sb3-trpo[plot]"``), which is not a dependency of the library.
"""

import argparse
import importlib
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from sb3_trpo.cli import runs
from sb3_trpo.cli.presets import CliError

Curve = tuple[np.ndarray, np.ndarray]  # timesteps, mean evaluation return at each


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", type=Path, help="run folders made by `sb3-trpo train`")
    parser.add_argument(
        "--output", type=Path, default=Path("learning_curves.png"), help="PNG file (default learning_curves.png)"
    )
    parser.add_argument("--title", help="figure title (default: the environments)")


def run(args: argparse.Namespace) -> int:
    pyplot = _pyplot()
    groups: dict[str, list[Curve]] = defaultdict(list)
    for folder in args.run_dirs:
        groups[_label(folder)].append(read_curve(folder))
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for label, curves in groups.items():
        if not draw(axes, curves, label):
            print(
                f"sb3-trpo plot: note: {label}: the {len(curves)} runs share no evaluated steps: drawn one by one, "
                "not averaged.",
                file=sys.stderr,
            )
    axes.set_xlabel("environment steps")
    axes.set_ylabel("evaluation return")
    axes.set_title(args.title or ", ".join(groups))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=100)
    pyplot.close(figure)
    print(f"{args.output}: {len(args.run_dirs)} run(s), {len(groups)} curve(s)")
    return 0


def read_curve(folder: Path) -> Curve:
    """The periodic evaluations of a run: timesteps and the mean return of each evaluation.

    :raises CliError: if the folder or its evaluations are missing
    """
    if not folder.is_dir():
        raise CliError(f"{folder} is not a folder: give run folders made by `sb3-trpo train`.")
    path = folder / runs.EVALUATIONS
    if not path.is_file():
        raise CliError(
            f"{folder} has no {runs.EVALUATIONS}: it is not a run folder, or training stopped before its first "
            "evaluation (see --eval-freq)."
        )
    data = np.load(path)
    return np.asarray(data["timesteps"]), np.asarray(data["results"]).mean(axis=1)


def mean_and_band(curves: list[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, lowest and highest of several curves, where every run has a value.

    The steps are all those any run was evaluated at, from the latest first evaluation to the earliest last one;
    each run is interpolated linearly between its own evaluations onto them, never extrapolated beyond its first
    or last. The result is the same whatever the order of ``curves``.

    :param curves: the runs' curves, each with increasing steps
    :return: steps, mean, low, high; all empty if the runs share no range of steps (one run evaluated at 10k, 20k
        and 30k, another only at 5k)
    """
    start = max(steps[0] for steps, _ in curves)
    end = min(steps[-1] for steps, _ in curves)
    every_step = np.unique(np.concatenate([steps for steps, _ in curves]))  # sorted: independent of the order
    grid = every_step[(every_step >= start) & (every_step <= end)]
    if grid.size == 0:
        empty = np.empty(0)
        return grid, empty, empty.copy(), empty.copy()
    values = np.stack([np.interp(grid, steps, returns) for steps, returns in curves])
    return grid, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def draw(axes: Any, curves: list[Curve], label: str, color: str | None = None) -> bool:
    """Draw the mean of ``curves`` and, for several runs, the band between the lowest and the highest; runs that
    share no range of steps have no mean, and are drawn one by one in one colour.

    :param axes: matplotlib axes
    :param curves: the runs' curves
    :param label: the legend's label of the curve
    :param color: its colour (default: the next of matplotlib's cycle)
    :return: whether the runs were averaged (a single run counts as averaged)
    """
    steps, mean, low, high = mean_and_band(curves)
    if steps.size == 0:
        for number, (run_steps, returns) in enumerate(curves):
            text = f"{label} ({len(curves)} runs, not averaged: no steps in common)" if number == 0 else None
            (line,) = axes.plot(run_steps, returns, color=color, label=text, marker=".")
            color = line.get_color()  # one colour for the runs of one environment
        return False
    runs_text = f"{len(curves)} runs, mean and min-max" if len(curves) > 1 else "1 run"
    (line,) = axes.plot(steps, mean, color=color, label=f"{label} ({runs_text})")
    if len(curves) > 1:
        axes.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
    return True


def _label(folder: Path) -> str:
    config = runs.read_config(folder) if folder.is_dir() else None
    return str(config["env_id"]) if config and "env_id" in config else folder.name


def _pyplot() -> Any:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise CliError('plot needs matplotlib, which sb3-trpo does not depend on: pip install "sb3-trpo[plot]"') from None
    matplotlib.use("Agg")  # files only, no display needed
    return importlib.import_module("matplotlib.pyplot")
