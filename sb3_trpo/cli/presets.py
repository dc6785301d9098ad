"""Tuned hyperparameters shipped with the package, and the ``key=value`` overrides of the command line."""

import ast
import inspect
import json
import warnings
from importlib import resources
from typing import Any, NamedTuple

import torch as th
from stable_baselines3.common.utils import LinearSchedule
from torch import nn

from sb3_trpo.trpo import TRPO

#: run settings that are not TRPO keywords but may be overridden like them
RUN_KEYS = ("n_envs", "normalize", "n_timesteps", "policy", "env_kwargs")
#: TRPO keywords that may be schedules, written {"linear": [start, end]} in presets and --hyperparams
SCHEDULE_KEYS = ("learning_rate", "target_kl")
#: TRPO keywords that --hyperparams does not set, and what to do instead
FLAG_KEYS = {
    "seed": "use --seed for it",
    "device": "use --device for it",
    "tensorboard_log": "use --tensorboard-log for it",
    "verbose": "use --verbose for it",
    "env": "the environment is the ENV_ID argument",
    "distributed": "distributed training needs a script launched with torchrun (docs/distributed.md)",
    "_init_setup_model": "it is internal to SB3",
}


class CliError(Exception):
    """A mistake in what the user asked for: printed as one line, exit status 2."""


#: sb3-contrib's recurrent policy aliases: a run with one of them trains :class:`~sb3_trpo.RecurrentTRPO`
RECURRENT_POLICIES = ("MlpLstmPolicy", "CnnLstmPolicy", "MultiInputLstmPolicy")
#: every policy alias ``policy=`` takes
POLICIES = (*TRPO.policy_aliases, *RECURRENT_POLICIES)


#: the classes the command line trains, by name: (whether its policy is an LSTM one, whether it masks actions)
ALGORITHMS = {
    "TRPO": (False, False),
    "RecurrentTRPO": (True, False),
    "MaskableTRPO": (False, True),
    "MaskableRecurrentTRPO": (True, True),
}


def algorithm_for(policy: str, masked: bool = False) -> type[TRPO]:
    """The algorithm that trains a policy alias: ``RecurrentTRPO`` for the LSTM policies, ``TRPO`` otherwise, and
    their maskable forms (``MaskableTRPO``, ``MaskableRecurrentTRPO``) with ``masked``.

    :param policy: a policy alias (one of :data:`POLICIES`)
    :param masked: whether it learns with invalid-action masks
    :raises CliError: for a class that needs sb3-contrib when it is not installed
    """
    recurrent = policy in RECURRENT_POLICIES
    name = next(name for name, kind in ALGORITHMS.items() if kind == (recurrent, masked))
    return algorithm_named(name, f"policy={policy}{' with action masks' if masked else ''} trains {name}")


def algorithm_named(name: str, why: str | None = None) -> type[TRPO]:
    """:return: the class of :data:`ALGORITHMS` called ``name``

    :param why: what asked for it, for the message when it cannot be imported
    :raises CliError: for an unknown name, or a class that needs sb3-contrib when it is not installed
    """
    if name not in ALGORITHMS:
        raise CliError(f"algorithm {name!r} is not one of {', '.join(ALGORITHMS)}.")
    if name == "TRPO":
        return TRPO
    try:
        import sb3_trpo

        algorithm: type[TRPO] = getattr(sb3_trpo, name)
    except ImportError as error:
        raise CliError(f"{why or name}: {error}") from None
    return algorithm


class Preset(NamedTuple):
    """How to train on one environment.

    :param n_envs: number of parallel environments
    :param normalize: whether to wrap them in ``VecNormalize``
    :param n_timesteps: training budget
    :param policy: policy alias (an LSTM policy trains ``RecurrentTRPO``)
    :param hyperparams: TRPO keywords
    :param source: where the values come from (``None`` when no preset exists for the environment)
    :param env_kwargs: keywords of ``gymnasium.make`` for the training and evaluation environments (rl-zoo3's
        ``env_kwargs``), e.g. ``{"include_cfrc_ext_in_observation": False}``
    """

    n_envs: int
    normalize: bool
    n_timesteps: int
    policy: str
    hyperparams: dict[str, Any]
    source: str | None
    env_kwargs: dict[str, Any]


#: without a preset: SB3's usual single-environment defaults and TRPO's own defaults
DEFAULT = Preset(
    n_envs=1, normalize=False, n_timesteps=1_000_000, policy="MlpPolicy", hyperparams={}, source=None, env_kwargs={}
)


def load_presets() -> dict[str, dict[str, Any]]:
    """:return: the shipped presets by environment id"""
    text = resources.files("sb3_trpo.cli").joinpath("presets.json").read_text(encoding="utf-8")
    return {key: value for key, value in json.loads(text).items() if not key.startswith("_")}


def preset_for(env_id: str) -> Preset:
    """The shipped preset for ``env_id``; another version of the same environment (``Hopper-v4`` for ``Hopper-v5``)
    takes its preset too, and an environment without one gets :data:`DEFAULT`.

    A preset's ``env_kwargs`` are keywords of the version it was measured on (Ant-v5's
    ``include_cfrc_ext_in_observation`` does not exist in Ant-v4), so another version takes the preset without
    them, and its ``source`` says so.

    :param env_id: a Gymnasium environment id, or gymnasium's ``MODULE:ENV_ID`` (the preset is ``ENV_ID``'s)
    """
    presets = load_presets()
    # the module of MODULE:ENV_ID only registers the environment: the id names it (as runs.split_env_id reads it)
    env_id = env_id.partition(":")[2] or env_id
    name = env_id.rsplit("-v", 1)[0]
    key = env_id if env_id in presets else next((other for other in presets if other.rsplit("-v", 1)[0] == name), None)
    if key is None:
        return DEFAULT
    entry = presets[key]
    source = str(entry["source"])
    env_kwargs = dict(entry.get("env_kwargs", {}))
    if env_kwargs and key != env_id:
        source += f" [the preset of {key}; its env_kwargs {env_kwargs} are {key}'s keywords and are not applied to {env_id}]"
        env_kwargs = {}
    return Preset(
        n_envs=int(entry["n_envs"]),
        normalize=bool(entry["normalize"]),
        n_timesteps=int(entry["n_timesteps"]),
        policy=str(entry.get("policy", "MlpPolicy")),
        hyperparams=dict(entry["hyperparams"]),
        source=source,
        env_kwargs=env_kwargs,
    )


def trpo_keywords() -> list[str]:
    """:return: the TRPO constructor keywords a ``--hyperparams`` override may set"""
    names = inspect.signature(TRPO.__init__).parameters
    return [name for name in names if name not in ("self", "policy", *FLAG_KEYS)]


def parse_value(text: str) -> Any:
    """A Python literal (``0.5``, ``True``, ``None``, ``[64, 64]``, ``{'net_arch': [64]}``), or the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(preset: Preset, overrides: list[str]) -> Preset:
    """Apply ``key=value`` overrides to a preset.

    :param preset: the preset
    :param overrides: ``key=value`` strings, values as Python literals
    :raises CliError: for a malformed override, an unknown key or a run setting of the wrong type
    """
    allowed = trpo_keywords()
    run: dict[str, Any] = dict(
        n_envs=preset.n_envs,
        normalize=preset.normalize,
        n_timesteps=preset.n_timesteps,
        policy=preset.policy,
        env_kwargs=preset.env_kwargs,
    )
    hyperparams = dict(preset.hyperparams)
    for override in overrides:
        key, separator, text = override.partition("=")
        key = key.strip()
        if not separator or not key:
            raise CliError(f"--hyperparams {override!r}: expected key=value, e.g. --hyperparams n_steps=1024 gamma=0.98")
        if key in FLAG_KEYS:
            raise CliError(f"--hyperparams {key}=...: {FLAG_KEYS[key]}.")
        if key not in allowed and key not in RUN_KEYS:
            raise CliError(
                f"--hyperparams {key}=...: unknown hyperparameter {key!r}. Allowed: {', '.join([*allowed, *RUN_KEYS])}."
            )
        value = parse_value(text)
        if key == "policy_kwargs" and isinstance(value, dict):
            value = _with_activation_class(value)
        if key in RUN_KEYS:
            run[key] = value
        else:
            hyperparams[key] = value
    if not isinstance(run["normalize"], bool):
        raise CliError(f"--hyperparams normalize={run['normalize']!r}: normalize must be True or False.")
    for key in ("n_envs", "n_timesteps"):
        if not isinstance(run[key], int) or isinstance(run[key], bool) or run[key] < 1:
            raise CliError(f"--hyperparams {key}={run[key]!r}: {key} must be an integer >= 1.")
    if not isinstance(run["env_kwargs"], dict) or not all(isinstance(key, str) for key in run["env_kwargs"]):
        raise CliError(
            f"--hyperparams env_kwargs={run['env_kwargs']!r}: env_kwargs must be a dict of gymnasium.make keywords, "
            "e.g. env_kwargs={'include_cfrc_ext_in_observation': False}."
        )
    if run["policy"] not in POLICIES:
        raise CliError(
            f"--hyperparams policy={run['policy']!r}: policy must be one of {', '.join(POLICIES)} (the Lstm policies "
            "train RecurrentTRPO)."
        )
    return Preset(
        n_envs=int(run["n_envs"]),
        normalize=bool(run["normalize"]),
        n_timesteps=int(run["n_timesteps"]),
        policy=str(run["policy"]),
        hyperparams=hyperparams,
        source=preset.source,
        env_kwargs=dict(run["env_kwargs"]),
    )


def _with_activation_class(policy_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``policy_kwargs`` with ``activation_fn`` given by name (``'ReLU'`` or ``'nn.ReLU'``) turned into the class."""
    name = policy_kwargs.get("activation_fn")
    if not isinstance(name, str):
        return policy_kwargs
    cls = getattr(nn, name.removeprefix("nn."), None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and _is_activation(cls)):
        raise CliError(
            f"policy_kwargs activation_fn={name!r}: not a torch.nn activation (e.g. 'Tanh', 'ReLU'): SB3 builds it "
            "without arguments between the layers, so it must map a tensor to one of the same shape."
        )
    return {**policy_kwargs, "activation_fn": cls}


def _is_activation(cls: type[nn.Module]) -> bool:
    """Whether SB3 can use ``cls`` between the layers of its networks: built without arguments, it maps a batch of
    features to a tensor of the same shape. Tried on a small tensor, since ``nn.Module`` itself, a layer
    (``nn.Linear``) or a container pass for modules but fail only once training has started.

    :param cls: a ``torch.nn`` module class
    """
    features = th.zeros(2, 3)
    try:
        # an activation's own warnings (nn.Softmax's implicit dimension) are for when it is used, not for this try
        with warnings.catch_warnings(), th.no_grad():
            warnings.simplefilter("ignore")
            output = cls()(features)
    except Exception:  # whatever a module that is not an activation raises: it is not one
        return False
    return isinstance(output, th.Tensor) and output.shape == features.shape


def model_kwargs(hyperparams: dict[str, Any]) -> dict[str, Any]:
    """The TRPO keywords a preset's (JSON-friendly) hyperparameters stand for.

    ``{"linear": [start, end]}`` for ``learning_rate`` or ``target_kl`` becomes SB3's
    ``LinearSchedule(start, end, 1.0)`` (from ``start`` at the first update to ``end`` at the last), and
    ``policy_kwargs`` may name its ``activation_fn`` (``"ReLU"``).

    :param hyperparams: a preset's ``hyperparams``, after overrides
    :raises CliError: for a schedule written any other way
    """
    kwargs = dict(hyperparams)
    for key in SCHEDULE_KEYS:
        value = kwargs.get(key)
        if not isinstance(value, dict):
            continue
        ends = value.get("linear")
        if (
            set(value) != {"linear"}
            or not isinstance(ends, (list, tuple))
            or len(ends) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in ends)
        ):
            raise CliError(
                f"{key}={value!r}: a schedule is written {{'linear': [start, end]}}, e.g. {{'linear': [0.05, 0.01]}}."
            )
        kwargs[key] = LinearSchedule(float(ends[0]), float(ends[1]), 1.0)
    if isinstance(kwargs.get("policy_kwargs"), dict):
        kwargs["policy_kwargs"] = _with_activation_class(kwargs["policy_kwargs"])
    return kwargs
