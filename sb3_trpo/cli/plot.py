"""``sb3-trpo plot RUN_DIR...``: learning curves (evaluation return vs steps) of one or more runs, to PNG.

Runs of the same environment are drawn as one curve: the mean over runs, with a band from the lowest to the
highest run. Needs matplotlib (``pip install "sb3-trpo[plot]"``), which is not a dependency of the library.
"""

import argparse
import importlib
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
        draw(axes, curves, label)
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
    """Mean, lowest and highest of several curves, on the steps of the first, up to the shortest run's end.

    Runs evaluated at other steps are interpolated linearly onto those steps.

    :return: steps, mean, low, high
    """
    end = min(steps[-1] for steps, _ in curves)
    grid = curves[0][0][curves[0][0] <= end]
    values = np.stack([np.interp(grid, steps, returns) for steps, returns in curves])
    return grid, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def draw(axes: Any, curves: list[Curve], label: str, color: str | None = None) -> None:
    """Draw the mean of ``curves`` and, for several runs, the band between the lowest and the highest."""
    steps, mean, low, high = mean_and_band(curves)
    runs_text = f"{len(curves)} runs, mean and min-max" if len(curves) > 1 else "1 run"
    (line,) = axes.plot(steps, mean, color=color, label=f"{label} ({runs_text})")
    if len(curves) > 1:
        axes.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)


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
