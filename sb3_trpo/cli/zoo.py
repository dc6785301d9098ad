"""``sb3-trpo zoo``: rl-zoo3's ``train`` and ``enjoy`` (and ``train -optimize``) with sb3_trpo's classes and presets.

rl-zoo3 keeps its algorithms in one dict, ``rl_zoo3.ALGOS``, with no plugin hook; its documented way to run another
implementation is to replace entries before calling ``rl_zoo3.train.train()`` or ``rl_zoo3.enjoy.enjoy()``, which
read ``sys.argv``. This command does exactly that:

- ``--algo trpo`` is :class:`sb3_trpo.TRPO` (replacing sb3-contrib's), ``--algo trpo_lstm`` is
  :class:`sb3_trpo.RecurrentTRPO`, ``--algo trpo_maskable`` is :class:`sb3_trpo.MaskableTRPO` and ``--algo
  trpo_lstm_maskable`` is :class:`sb3_trpo.MaskableRecurrentTRPO`; the new names use rl-zoo3's TRPO sampler for
  ``-optimize``. rl-zoo3's ``enjoy`` calls ``predict`` without masks: for the maskable names, its environment offers
  its masks (:mod:`sb3_trpo.masks`) and the loaded model reads them at every step.
- Hyperparameters: rl-zoo3's own ``trpo.yml`` was tuned with sb3-contrib's TRPO, whose KL is averaged over action
  dimensions (``d`` times looser than sb3_trpo's on ``d``-dimensional actions). Without ``-conf``/``--conf-file``,
  ``train`` therefore gets sb3_trpo's preset for the environment (``sb3_trpo/cli/presets.json``, as ``sb3-trpo
  train`` uses it, TRPO's defaults for an environment without one) written as an rl-zoo3 hyperparameter file, and
  says where. A ``-conf`` file given by the user is used as it is.
"""

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from sb3_trpo.cli.presets import RECURRENT_POLICIES, CliError, Preset, preset_for

#: rl-zoo3 algorithm names and the sb3_trpo classes they run
ALGORITHMS = {
    "trpo": "TRPO",
    "trpo_lstm": "RecurrentTRPO",
    "trpo_maskable": "MaskableTRPO",
    "trpo_lstm_maskable": "MaskableRecurrentTRPO",
}
#: the names that learn with LSTM policies, and those that learn with invalid-action masks
RECURRENT_NAMES = ("trpo_lstm", "trpo_lstm_maskable")
MASKED_NAMES = ("trpo_maskable", "trpo_lstm_maskable")
#: policy_kwargs that only the LSTM policies take
LSTM_KEYWORDS = (
    "lstm_hidden_size",
    "n_lstm_layers",
    "shared_lstm",
    "enable_critic_lstm",
    "lstm_kwargs",
    "recurrent_layer_type",
)
INSTALL = "pip install 'sb3-trpo[zoo]'"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["train", "enjoy"], help="rl-zoo3's train (also -optimize) or enjoy")
    parser.add_argument(
        "zoo_arguments",
        nargs=argparse.REMAINDER,
        metavar="...",
        help="rl-zoo3's own options, e.g. --algo trpo --env CartPole-v1 -n 50000 -f logs (see `sb3-trpo zoo train -h`)",
    )


def run(args: argparse.Namespace) -> int:
    zoo_arguments = list(args.zoo_arguments)
    register_algorithms()
    if args.action == "train":
        from rl_zoo3.train import train

        if "-h" not in zoo_arguments and "--help" not in zoo_arguments:
            zoo_arguments = with_preset_config(zoo_arguments)
        _run_with_argv(train, "train", zoo_arguments)
    else:
        from rl_zoo3 import enjoy as enjoy_module

        algo = _option(zoo_arguments, "--algo")
        if algo in MASKED_NAMES:
            _enjoy_with_masks(enjoy_module, algo)
        _run_with_argv(enjoy_module.enjoy, "enjoy", zoo_arguments)
    return 0


def _enjoy_with_masks(enjoy_module: Any, algo: str) -> None:
    """Make rl-zoo3's ``enjoy`` act with the environment's masks: its loop calls ``model.predict`` without them.
    The environment it makes is wrapped to offer its masks wherever it keeps them (:mod:`sb3_trpo.masks`), and the
    model it loads reads them from it at every ``predict``.

    :param enjoy_module: ``rl_zoo3.enjoy``
    :param algo: the maskable algorithm's rl-zoo3 name
    """
    import rl_zoo3

    from sb3_trpo.masks import masks_of, with_action_masks

    made: list[Any] = []
    create_test_env = enjoy_module.create_test_env

    def create_with_masks(*args: Any, **kwargs: Any) -> Any:
        made.append(with_action_masks(create_test_env(*args, **kwargs)))
        return made[-1]

    enjoy_module.create_test_env = create_with_masks
    algorithm = rl_zoo3.ALGOS[algo]

    class WithTheEnvironmentsMasks:
        """``ALGOS[algo]`` for enjoy: ``load`` gives the model a ``predict`` that reads the masks of enjoy's env."""

        @staticmethod
        def load(*args: Any, **kwargs: Any) -> Any:
            model: Any = algorithm.load(*args, **kwargs)
            act = model.predict

            def predict(observation: Any, state: Any = None, episode_start: Any = None, deterministic: bool = False) -> Any:
                return act(observation, state, episode_start, deterministic, action_masks=masks_of(made[-1]))

            model.predict = predict
            return model

    rl_zoo3.ALGOS[algo] = WithTheEnvironmentsMasks  # type: ignore[assignment]
    enjoy_module.ALGOS[algo] = WithTheEnvironmentsMasks


def register_algorithms() -> None:
    """Put sb3_trpo's classes into rl-zoo3's algorithm table and its Optuna samplers (in place: rl-zoo3's modules
    hold references to these dicts).

    :raises CliError: without rl-zoo3
    """
    try:
        import rl_zoo3
        from rl_zoo3 import hyperparams_opt
    except ImportError as error:
        raise CliError(f"sb3-trpo zoo runs rl-zoo3, which is not installed ({error}): {INSTALL}") from None
    import sb3_trpo

    for name, class_name in ALGORITHMS.items():
        rl_zoo3.ALGOS[name] = getattr(sb3_trpo, class_name)  # sb3-contrib comes with rl-zoo3
        if name != "trpo":  # the same keywords: rl-zoo3's TRPO sampler and converter
            hyperparams_opt.HYPERPARAMS_SAMPLER[name] = hyperparams_opt.HYPERPARAMS_SAMPLER["trpo"]
            hyperparams_opt.HYPERPARAMS_CONVERTER[name] = hyperparams_opt.HYPERPARAMS_CONVERTER["trpo"]


def _option(arguments: list[str], *names: str) -> str | None:
    """The value of an option in an argument list (``--env X`` or ``--env=X``), or ``None``."""
    for index, argument in enumerate(arguments):
        for name in names:
            if argument == name and index + 1 < len(arguments):
                return arguments[index + 1]
            if argument.startswith(name + "="):
                return argument.split("=", 1)[1]
    return None


def with_preset_config(arguments: list[str]) -> list[str]:
    """rl-zoo3's train arguments with ``--conf-file`` pointing at sb3_trpo's preset for the environment, unless the
    user gave a configuration.

    :param arguments: rl-zoo3's train arguments
    :return: the arguments to run rl-zoo3 with
    """
    if _option(arguments, "-conf", "--conf-file") is not None:
        return arguments
    env_id = _option(arguments, "--env") or "CartPole-v1"  # rl-zoo3's default environment
    algo = _option(arguments, "--algo") or "ppo"
    if algo not in ALGORITHMS:
        return arguments  # another library's algorithm: rl-zoo3's own settings
    preset = preset_for(env_id)
    entry = zoo_hyperparameters(preset, recurrent=algo in RECURRENT_NAMES)
    folder = Path(tempfile.mkdtemp(prefix="sb3_trpo_zoo_"))
    path = folder / f"{algo}.yml"
    import yaml

    # the id as rl-zoo3 looks it up (the module of MODULE:ENV_ID is rl-zoo3's --gym-packages business)
    path.write_text(yaml.safe_dump({env_id.partition(":")[2] or env_id: entry}, sort_keys=True))
    source = preset.source or "no preset for this environment: TRPO's defaults"
    print(
        f"sb3-trpo zoo: hyperparameters for {env_id} from sb3_trpo's presets ({source}), written to {path}; pass "
        "-conf FILE for your own (rl-zoo3's trpo.yml was tuned for sb3-contrib's TRPO, whose KL is averaged over "
        "action dimensions).",
        flush=True,
    )
    return [*arguments, "--conf-file", str(path)]


def zoo_hyperparameters(preset: Preset, recurrent: bool) -> dict[str, Any]:
    """A preset in rl-zoo3's hyperparameter format (the entry of one environment in ``trpo.yml``).

    :param preset: the preset
    :param recurrent: for ``trpo_lstm`` (an LSTM policy) rather than ``trpo``/``trpo_maskable`` (a feed-forward one)
    :return: plain values only (rl-zoo3 writes them into the run's ``config.yml``): schedules as rl-zoo3's
        ``lin_<start>`` strings, ``policy_kwargs`` as the Python expression rl-zoo3 evaluates
    :raises CliError: for a schedule rl-zoo3 cannot express
    """
    policy = preset.policy
    if recurrent and policy not in RECURRENT_POLICIES:
        policy = policy.replace("Policy", "LstmPolicy")
    elif not recurrent and policy in RECURRENT_POLICIES:
        policy = policy.replace("LstmPolicy", "Policy")
    entry: dict[str, Any] = {
        "policy": policy,
        "n_envs": preset.n_envs,
        "n_timesteps": float(preset.n_timesteps),
        "normalize": preset.normalize,
    }
    if preset.env_kwargs:
        entry["env_kwargs"] = dict(preset.env_kwargs)
    for key, value in preset.hyperparams.items():
        if isinstance(value, dict) and "linear" in value:
            start, end = value["linear"]
            if key != "learning_rate" or end != 0:
                raise CliError(
                    f"the preset's {key}={value}: rl-zoo3 writes schedules only as learning_rate lin_<start> (linear to "
                    "0); pass -conf FILE with your own settings."
                )
            value = f"lin_{start}"
        elif key == "policy_kwargs":
            kwargs = {k: v for k, v in value.items() if recurrent or k not in LSTM_KEYWORDS}
            value = _policy_kwargs_expression(kwargs)
        entry[key] = value
    return entry


def _policy_kwargs_expression(kwargs: dict[str, Any]) -> str:
    """``policy_kwargs`` as rl-zoo3 writes them: a ``dict(...)`` expression it evaluates with ``nn`` in scope."""
    parts = []
    for key, value in kwargs.items():
        if key == "activation_fn":
            name = value if isinstance(value, str) else value.__name__
            parts.append(f"{key}=nn.{name.removeprefix('nn.')}")
        else:
            parts.append(f"{key}={value!r}")
    return f"dict({', '.join(parts)})"


def _run_with_argv(function: Any, action: str, arguments: list[str]) -> None:
    """Call an rl-zoo3 entry point, which parses ``sys.argv``, with these arguments."""
    saved = sys.argv
    sys.argv = [f"sb3-trpo zoo {action}", *arguments]
    try:
        function()
    finally:
        sys.argv = saved
