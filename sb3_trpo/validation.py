"""Checks of TRPO's constructor arguments, each failing with a message that names the argument, its value and
what is allowed.

The rules are data (:data:`RULES`), so every keyword is checked the same way and a new keyword gets a rule next
to the others instead of an ``if`` somewhere in ``__init__``.
"""

import math
import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer


def is_int(value: Any) -> bool:
    """:return: whether ``value`` is an integer (numpy integers included, booleans excluded)"""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """:return: whether ``value`` is a finite real number (booleans excluded)"""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and (math.isfinite(float(value)))
    )


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: is_int(v) and v >= low), f"an integer >= {low}"


def _real_in(low: float, high: float, closed_low: bool = True, closed_high: bool = True) -> tuple[Callable[[Any], bool], str]:
    def check(v: Any) -> bool:
        if not is_real(v):
            return False
        above = v >= low if closed_low else v > low
        below = v <= high if closed_high else v < high
        return above and below

    left, right = "[" if closed_low else "(", "]" if closed_high else ")"
    high_text = "inf" if math.isinf(high) else f"{high:g}"
    return check, f"a finite number in {left}{low:g}, {high_text}{right}"


def _is_bool(v: Any) -> bool:
    return isinstance(v, (bool, np.bool_))


def _non_negative_or_schedule(positive_start: bool) -> Callable[[Any], bool]:
    """:return: a check for a finite number >= 0 or a schedule of such numbers, > 0 (at the start) if
    ``positive_start``"""

    def check(v: Any) -> bool:
        if callable(v):
            try:
                values = [float(v(progress)) for progress in (1.0, 0.5, 0.0)]
            except Exception:  # any failure of the user's schedule makes it invalid
                return False
            return all(math.isfinite(x) and x >= 0 for x in values) and (values[0] > 0 or not positive_start)
        return is_real(v) and (v > 0 or (v == 0 and not positive_start))

    return check


def _valid_device(v: Any) -> bool:
    if isinstance(v, th.device):
        return True
    if not isinstance(v, str):
        return False
    if v == "auto":
        return True
    try:
        th.device(v)
    except (RuntimeError, ValueError):
        return False
    return True


def _valid_buffer_class(v: Any) -> bool:
    return v is None or (isinstance(v, type) and issubclass(v, RolloutBuffer))


SUPPORTED_ACTION_SPACES = (spaces.Discrete, spaces.Box, spaces.MultiDiscrete, spaces.MultiBinary)
SUPPORTED_LEAF_OBSERVATION_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


def _space_names(space_types: tuple[type[spaces.Space], ...]) -> str:
    return ", ".join(t.__name__ for t in space_types)


def check_spaces(observation_space: spaces.Space, action_space: spaces.Space) -> None:
    """Refuse spaces TRPO cannot handle, saying which ones it can.

    :param observation_space: the environment's observation space
    :param action_space: the environment's action space
    :raises ValueError: for an unsupported space
    """
    if not isinstance(action_space, SUPPORTED_ACTION_SPACES):
        raise ValueError(
            f"TRPO does not support the action space {action_space}: "
            f"allowed action spaces are {_space_names(SUPPORTED_ACTION_SPACES)}."
        )
    leaves = observation_space.spaces.values() if isinstance(observation_space, spaces.Dict) else [observation_space]
    for leaf in leaves:
        if not isinstance(leaf, SUPPORTED_LEAF_OBSERVATION_SPACES):
            raise ValueError(
                f"TRPO does not support the observation space {observation_space}: allowed observation spaces are "
                f"{_space_names(SUPPORTED_LEAF_OBSERVATION_SPACES)}, or a Dict of those (not nested)."
            )


class Rule(NamedTuple):
    """A constraint on one constructor argument.

    :param check: ``value -> bool``, true when the value is allowed
    :param allowed: what is allowed, in words, for the error message
    """

    check: Callable[[Any], bool]
    allowed: str


RULES: dict[str, Rule] = {
    # 0 is allowed, as sb3-contrib allows it: a critic that does not learn is odd but harmless; a negative rate would
    # climb the value loss
    "learning_rate": Rule(
        _non_negative_or_schedule(positive_start=False),
        "a finite number >= 0, or a schedule (progress 1 -> 0) whose values are finite and >= 0",
    ),
    "n_steps": Rule(*_int_at_least(1)),
    "batch_size": Rule(*_int_at_least(1)),
    "gamma": Rule(*_real_in(0.0, 1.0)),
    "cg_max_steps": Rule(*_int_at_least(1)),
    "cg_damping": Rule(*_real_in(0.0, math.inf, closed_high=False)),
    "line_search_shrinking_factor": Rule(*_real_in(0.0, 1.0, closed_low=False, closed_high=False)),
    "line_search_max_iter": Rule(*_int_at_least(1)),
    "n_critic_updates": Rule(*_int_at_least(0)),
    "gae_lambda": Rule(*_real_in(0.0, 1.0)),
    "use_sde": Rule(_is_bool, "True or False"),
    "sde_sample_freq": Rule(*_int_at_least(-1)),
    "rollout_buffer_class": Rule(_valid_buffer_class, "None or a subclass of stable_baselines3's RolloutBuffer"),
    "rollout_buffer_kwargs": Rule(lambda v: v is None or isinstance(v, dict), "None or a dict"),
    "normalize_advantage": Rule(_is_bool, "True or False"),
    "target_kl": Rule(
        _non_negative_or_schedule(positive_start=True),
        "a finite number > 0, or a schedule (progress 1 -> 0) whose values are finite, >= 0, and > 0 at the start",
    ),
    "sub_sampling_factor": Rule(*_int_at_least(1)),
    "distributed": Rule(lambda v: _is_bool(v) or (isinstance(v, str) and v == "auto"), 'True, False or "auto"'),
    "distributed_critic": Rule(lambda v: isinstance(v, str) and v in ("gather", "gradients"), '"gather" or "gradients"'),
    "fast_collection": Rule(_is_bool, "True or False"),
    "stats_window_size": Rule(*_int_at_least(1)),
    "tensorboard_log": Rule(lambda v: v is None or isinstance(v, (str, os.PathLike)), "None or a folder path"),
    "policy_kwargs": Rule(lambda v: v is None or isinstance(v, dict), "None or a dict"),
    # SB3 prints info from 1 on and debug output from 2 on: every larger level is accepted, as SB3 accepts it
    "verbose": Rule(lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 silent, 1 info, 2 or more debug)"),
    "seed": Rule(lambda v: v is None or (is_int(v) and 0 <= v < 2**32), "None or an integer in [0, 2**32 - 1]"),
    "device": Rule(_valid_device, '"auto", a torch device name such as "cpu" or "cuda:0", or a torch.device'),
}


def check_arguments(arguments: dict[str, Any]) -> None:
    """Check every argument that has a rule.

    :param arguments: constructor arguments by name
    :raises ValueError: naming the first argument that breaks its rule, its value and what is allowed
    """
    for name, rule in RULES.items():
        if name in arguments and not rule.check(arguments[name]):
            raise ValueError(f"{name}={arguments[name]!r} is not allowed: {name} must be {rule.allowed}.")


def check_against_spaces(observation_space: spaces.Space, rollout_buffer_class: type[RolloutBuffer] | None) -> None:
    """Checks that depend on the environment's spaces (SB3 itself refuses gSDE without Box actions).

    :raises ValueError: for a rollout buffer that cannot hold the observations
    """
    if rollout_buffer_class is not None:
        is_dict_buffer = issubclass(rollout_buffer_class, DictRolloutBuffer)
        if isinstance(observation_space, spaces.Dict) != is_dict_buffer:
            needed = "a DictRolloutBuffer" if isinstance(observation_space, spaces.Dict) else "a non-Dict RolloutBuffer"
            raise ValueError(
                f"rollout_buffer_class={rollout_buffer_class.__name__} is not allowed with the observation space "
                f"{observation_space}: it needs {needed} (or None to choose automatically)."
            )


def check_rollout_size(n_steps: int, n_envs: int, batch_size: int, normalize_advantage: bool, stacklevel: int) -> None:
    """Refuse a rollout too small to normalize, and warn about a truncated last minibatch.

    :param n_steps: steps per environment per rollout
    :param n_envs: number of environments
    :param batch_size: the critic's minibatch size
    :param normalize_advantage: whether advantages are normalized over the rollout
    :param stacklevel: of the warning, so that it points at the user's call
    :raises ValueError: if advantages are normalized over fewer than 2 samples
    """
    buffer_size = n_envs * n_steps
    if normalize_advantage and buffer_size <= 1:
        raise ValueError(
            f"n_steps * n_envs = {n_steps} * {n_envs} = {buffer_size}: with normalize_advantage=True the rollout must "
            "hold at least 2 samples (the std of one is undefined)."
        )
    if buffer_size % batch_size > 0:
        warnings.warn(
            f"The critic's minibatch size {batch_size} does not divide the rollout size n_steps * n_envs = "
            f"{buffer_size}: every epoch ends with a truncated minibatch of {buffer_size % batch_size} samples. A "
            f"batch_size that divides {buffer_size} avoids it.",
            stacklevel=stacklevel + 1,
        )


def target_kl_at(target_kl: float | Callable[[float], float], progress_remaining: float) -> float:
    """The trust-region radius of an update: ``target_kl``, or its schedule at the current progress.

    :param target_kl: a number, or a schedule of the progress remaining (from 1 to 0)
    :param progress_remaining: the progress remaining at this update
    :return: the radius, a finite number >= 0
    :raises ValueError: if a schedule fails or returns anything but a finite number >= 0
    """
    if not callable(target_kl):
        return target_kl
    # SB3's progress remaining goes below 0 at the last update when the budget is not a multiple of the rollout size
    # (100,000 steps in rollouts of 1,024 end at 100,352): the schedule is read at 0, where it ends, as documented
    progress_remaining = max(progress_remaining, 0.0)
    try:
        value = float(target_kl(progress_remaining))
    except (TypeError, ValueError) as error:
        raise ValueError(f"The target_kl schedule failed at progress_remaining={progress_remaining:.4g}: {error}") from error
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"The target_kl schedule returned {value!r} at progress_remaining={progress_remaining:.4g}: it must return "
            "finite numbers >= 0 (0 leaves the policy unchanged). Nothing was updated: the model is as before this call."
        )
    return value


def check_policy_class(algorithm: str, policy: Any, base: type | None, kind: str, aliases: list[str]) -> None:
    """Refuse a policy class a variant cannot train (an alias string is checked by SB3 when it looks it up).

    :param algorithm: the class's name, for the message
    :param policy: the policy given (an alias or a class)
    :param base: the policy class it needs (``None``: any SB3 ``ActorCriticPolicy``, which SB3 checks)
    :param kind: what kind of policy that is, for the message (e.g. ``"recurrent"``)
    :param aliases: the aliases the class accepts
    :raises ValueError: for a class that is not a subclass of ``base``
    """
    if base is None or isinstance(policy, str) or (isinstance(policy, type) and issubclass(policy, base)):
        return
    names = ", ".join(repr(alias) for alias in aliases)
    raise ValueError(
        f"{algorithm} needs a {kind} policy, got {policy!r}: use {names} or a subclass of "
        f"{base.__module__}.{base.__qualname__}."
    )
