"""The ``sb3-trpo`` command line: ``train``, ``eval``, ``plot`` and ``zoo`` (also ``python -m sb3_trpo``)."""

import argparse
import sys
from collections.abc import Sequence

from sb3_trpo.cli import evaluate, parallel, plot, train, zoo
from sb3_trpo.cli.presets import CliError

COMMANDS = {
    "train": (train, "train TRPO on an environment with its tuned preset"),
    "eval": (evaluate, "evaluate a trained model: mean and std of the return over N episodes"),
    "plot": (plot, "plot learning curves of one or more runs to PNG"),
    "zoo": (zoo, "rl-zoo3's train (and -optimize) or enjoy, with sb3_trpo's TRPO classes and presets"),
}


def build_parser() -> argparse.ArgumentParser:
    """:return: the parser of the ``sb3-trpo`` command and its subcommands"""
    parser = argparse.ArgumentParser(
        prog="sb3-trpo",
        description="Trust Region Policy Optimization for Stable-Baselines3: train, evaluate and plot.",
        epilog="Example: sb3-trpo train CartPole-v1 --output runs/cartpole && sb3-trpo eval runs/cartpole && "
        "sb3-trpo plot runs/cartpole --output cartpole.png",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    :param argv: arguments (default: ``sys.argv[1:]``)
    :return: exit status: 0 on success, 2 for a usage error (message on stderr)
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    module, _ = COMMANDS[args.command]
    try:
        return module.run(args)
    except CliError as error:
        # one line, as the README promises, even when a message quotes text that has line breaks (an exception's)
        message = " ".join(str(error).split())
        print(f"sb3-trpo {args.command}: error: {message}", file=sys.stderr)
        parallel.end_process(2)  # a torchrun worker: every rank refuses alike, and ends here
        return 2
