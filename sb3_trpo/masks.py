"""Where invalid-action masks come from, and what a valid mask is.

sb3-contrib reads masks from one place only: an ``action_masks()`` method of every environment, called through
``env_method`` at each step (with ``SubprocVecEnv``, a pipe round trip per step). Users keep them in two more:

1. **the vectorised environment's own** ``action_masks()`` (natively vectorised environments, which cannot carry a
   per-environment wrapper), returning the masks of all its environments at once;
2. **each environment's** ``action_masks()`` (directly or through ``sb3_contrib.common.wrappers.ActionMasker``):
   sb3-contrib's way;
3. **the step's** ``info["action_mask"]``, and the reset's (gymnasium's convention: its Taxi does this), for the
   observation that came with it: after an automatic reset, the reset's info (``VecEnv.reset_infos``).

They are taken in that order: the first the environment offers is used for the whole run. An environment that
offers the second only is used as it is (sb3-contrib reads it); otherwise :func:`with_action_masks` wraps it in
:class:`VecActionMasks`, which answers ``env_method("action_masks")`` and ``has_attr("action_masks")`` from the
first or third source, so every reader of sb3-contrib's convention (its collection loop and evaluation, this
package's loops, rl-zoo3) reads them alike.

A mask is one boolean per action logit of sb3-contrib's maskable distributions: ``n`` for ``Discrete(n)``,
``sum(nvec)`` for ``MultiDiscrete(nvec)`` (a tuple of per-sub-space masks, gymnasium's form, is concatenated), and
``2 n`` for ``MultiBinary(n)`` (for each dimension: may it be 0, may it be 1). Every sub-space must leave at least
one value valid: an action has one value in each, and with none valid sb3-contrib would draw among the invalid
ones. :func:`checked_action_masks` refuses anything else with a message.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common import evaluation
from stable_baselines3.common.callbacks import EvalCallback
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn

__all__ = [
    "INFO_KEY",
    "METHOD",
    "ActingWithMasks",
    "MaskedEvalCallback",
    "VecActionMasks",
    "checked_action_masks",
    "evaluate_policy",
    "mask_sizes",
    "with_action_masks",
]

#: the method sb3-contrib calls on every environment (and the vectorised environment may offer itself)
METHOD = "action_masks"
#: the key of a step's or a reset's info that holds the mask of the observation it came with
INFO_KEY = "action_mask"


def mask_sizes(action_space: spaces.Space) -> list[int]:
    """:return: the number of mask entries of each sub-space (one per categorical of sb3-contrib's distributions)

    :raises ValueError: for an action space that cannot be masked
    """
    if isinstance(action_space, spaces.Discrete):
        return [int(action_space.n)]
    if isinstance(action_space, spaces.MultiDiscrete):
        return [int(n) for n in np.asarray(action_space.nvec).reshape(-1)]
    if isinstance(action_space, spaces.MultiBinary):
        return [2] * int(np.prod(action_space.shape))
    raise ValueError(
        f"Actions of {action_space} cannot be masked: masks exist for Discrete, MultiDiscrete and MultiBinary actions."
    )


def checked_action_masks(masks: Any, action_space: spaces.Space, n_envs: int, source: str) -> np.ndarray:
    """The masks of ``n_envs`` environments as sb3-contrib's distributions take them, or a clear error.

    :param masks: the masks as the source gave them: an array ``(n_envs, size)`` (or anything that reshapes to it),
        or for each environment a tuple of per-sub-space masks (MultiDiscrete, gymnasium's form)
    :param action_space: the environments' action space
    :param n_envs: the number of environments
    :param source: where the masks came from, for the message
    :return: booleans of shape ``(n_envs, size)``
    :raises ValueError: for a mask of the wrong size, or a sub-space with no valid value
    """
    sizes = mask_sizes(action_space)
    size = sum(sizes)
    if isinstance(masks, (list, tuple)) and masks and isinstance(masks[0], (list, tuple)):
        masks = [np.concatenate([np.asarray(part).reshape(-1) for part in env_masks]) for env_masks in masks]
    array = np.asarray(masks)
    if array.size != n_envs * size:
        raise ValueError(
            f"The action masks from {source} have shape {array.shape}, but {n_envs} environment(s) with actions "
            f"{action_space} need {size} booleans each ({' + '.join(map(str, sizes))}: one per value of each "
            "sub-space; MultiBinary: may it be 0, may it be 1, per dimension)."
        )
    array = array.reshape(n_envs, size).astype(bool, copy=False)
    starts = np.cumsum([0, *sizes[:-1]])
    # one valid value in each sub-space of each environment: the count of valid values per sub-space
    valid = np.add.reduceat(array, starts, axis=1) if size else np.zeros((n_envs, 0))
    if not valid.all():
        env, part = np.argwhere(valid == 0)[0]
        where = "" if len(sizes) == 1 else f" in sub-space {part}"
        raise ValueError(
            f"The action mask from {source} of environment {env} leaves no valid action{where}: every sub-space of "
            f"{action_space} needs at least one valid value (a True), or no action could be taken."
        )
    return array


class VecActionMasks(VecEnvWrapper):
    """A vectorised environment whose masks are read from its own ``action_masks()`` or from the infos of its steps
    and resets, and answered as sb3-contrib reads them (``env_method("action_masks")``, ``has_attr``).

    :param venv: the vectorised environment
    """

    def __init__(self, venv: VecEnv) -> None:
        super().__init__(venv)
        self.source = "the vectorised environment's action_masks()" if _vectorised_method(venv) else "info['action_mask']"
        self._infos: list[dict[str, Any]] = [{} for _ in range(venv.num_envs)]

    def reset(self) -> VecEnvObs:
        obs = self.venv.reset()
        self._infos = list(self.venv.unwrapped.reset_infos)
        return obs

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        # an environment that ended was reset: its next observation is the reset's, and so is its mask
        reset_infos = self.venv.unwrapped.reset_infos
        self._infos = [reset_infos[i] if done else info for i, (done, info) in enumerate(zip(dones, infos, strict=True))]
        return obs, rewards, dones, infos

    def action_masks(self) -> np.ndarray:
        """:return: the masks of the current observations, ``(num_envs, size)`` booleans

        :raises ValueError: if the source has no mask, or an invalid one
        """
        method = _vectorised_method(self.venv)
        if method is not None:
            masks = method()
        else:
            missing = [i for i, info in enumerate(self._infos) if INFO_KEY not in info]
            if missing:
                raise ValueError(
                    f"No action masks for environment(s) {missing}: the environment offers none of the vectorised "
                    f"environment's action_masks(), each environment's action_masks() (or sb3_contrib's ActionMasker), "
                    f"and info['{INFO_KEY}'] of its steps and resets. Give it one, or learn(use_masking=False)."
                )
            masks = [info[INFO_KEY] for info in self._infos]
        return checked_action_masks(masks, self.action_space, self.num_envs, self.source)

    def env_method(self, method_name: str, *method_args: Any, indices: Any = None, **method_kwargs: Any) -> list[Any]:
        if method_name != METHOD:
            return self.venv.env_method(method_name, *method_args, indices=indices, **method_kwargs)
        masks = self.action_masks()
        return [masks[i] for i in self._get_indices(indices)]

    def has_attr(self, attr_name: str) -> bool:
        return attr_name == METHOD or self.venv.has_attr(attr_name)


def _vectorised_method(venv: VecEnv) -> Any:
    """:return: the vectorised environment's own ``action_masks`` method (found through its wrappers), or ``None``"""
    method = getattr(venv, METHOD, None)
    return method if callable(method) else None


def _every_environment_has_the_method(venv: VecEnv) -> bool:
    try:
        return bool(venv.has_attr(METHOD))
    except AttributeError:
        return False


def with_action_masks(venv: VecEnv) -> VecEnv:
    """``venv`` as the maskable classes train on it: as it is if each environment has ``action_masks()`` (and the
    vectorised environment has none of its own), else wrapped in :class:`VecActionMasks`.

    :param venv: the vectorised training or evaluation environment
    """
    if isinstance(venv, VecActionMasks):
        return venv
    if _vectorised_method(venv) is None and _every_environment_has_the_method(venv):
        return venv
    return VecActionMasks(venv)


def masks_of(venv: VecEnv, indices: Sequence[int] | None = None) -> np.ndarray:
    """:return: the current masks of ``venv``'s environments as sb3-contrib reads them, checked (``(n, size)``)

    :param venv: a vectorised environment that offers masks (see :func:`with_action_masks`)
    :param indices: the environments (default: all)
    """
    rows = venv.env_method(METHOD, indices=indices)
    n_envs = venv.num_envs if indices is None else len(indices)
    return checked_action_masks(np.stack(rows), venv.action_space, n_envs, f"{METHOD}()")


class ActingWithMasks:
    """A maskable model that acts with an environment's masks: its ``predict`` reads them from ``env`` when it is given
    none; everything else is the model's own. SB3's ``evaluate_policy`` and ``EvalCallback`` drive it as they drive
    the model, carrying a recurrent policy's states from step to step.

    (sb3-contrib's masked ``evaluate_policy``, and so its ``MaskableEvalCallback``, drop the states when masking,
    2.9.2: they keep what ``predict`` returns under another name. A recurrent policy then starts afresh at every
    step.)

    :param model: a model whose ``predict`` takes ``action_masks``
    :param env: the vectorised environment it acts in (offering masks: :func:`with_action_masks`)
    """

    def __init__(self, model: Any, env: VecEnv) -> None:
        self.model = model
        self.env = env

    def predict(
        self,
        observation: Any,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
        action_masks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """The model's action among the valid ones (``action_masks``, else the environment's current masks)."""
        masks = masks_of(self.env) if action_masks is None else action_masks
        action, next_state = self.model.predict(observation, state, episode_start, deterministic, action_masks=masks)
        return action, next_state

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def evaluate_policy(model: Any, env: VecEnv, *args: Any, use_masking: bool = True, **kwargs: Any) -> Any:
    """SB3's ``evaluate_policy`` (same arguments and results) acting with the environment's masks, wherever it keeps
    them, and carrying a recurrent policy's states (see :class:`ActingWithMasks`).

    :param model: a maskable model
    :param env: the evaluation environment (wrapped by :func:`with_action_masks` here when it needs to be)
    :param use_masking: ``False``: act without masks, as SB3's function does
    """
    if not use_masking:
        return evaluation.evaluate_policy(model, env, *args, **kwargs)
    env = with_action_masks(env)
    return evaluation.evaluate_policy(ActingWithMasks(model, env), env, *args, **kwargs)


class MaskedEvalCallback(EvalCallback):
    """SB3's ``EvalCallback`` whose evaluations act with the evaluation environment's masks (and carry a recurrent
    policy's states, which sb3-contrib's ``MaskableEvalCallback`` drops when masking). The evaluation environment must
    be wrapped as the training one is (:func:`with_action_masks`) for VecNormalize's statistics to be synchronized.

    :param eval_env: the evaluation environment, offering masks
    :param kwargs: ``EvalCallback``'s other arguments
    """

    def init_callback(self, model: Any) -> None:
        super().init_callback(ActingWithMasks(model, self.eval_env))  # type: ignore[arg-type]
