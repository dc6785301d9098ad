"""An SB3 ``VecEnv`` over an `EnvPool <https://github.com/sail-sg/envpool>`_ pool: its environments step in C++
threads, and what comes out follows SB3's conventions, as ``DummyVecEnv`` over Monitor-wrapped gymnasium
environments gives them.

What SB3's code and callbacks read is kept:

- auto-reset on the step that ends an episode, with ``terminal_observation`` and ``TimeLimit.truncated`` in that
  step's infos (EnvPool itself resets on the *next* step and returns a reset observation with reward 0 then: an
  ended environment is reset here at once instead, so no step is spent on it);
- Monitor's ``episode`` infos (``r``, ``l``, ``t``), so ``rollout/ep_rew_mean``, ``EvalCallback`` and the command
  line's summaries work;
- the environment's own info entries (``x_position``, ...) per environment, and ``reset_infos``;
- continuous actions as gymnasium's MuJoCo tasks declare them, a float32 ``Box`` (EnvPool declares float64, the
  same bounds), so a model trained here loads and evaluates on gymnasium's environment;
- ``seed()``: EnvPool fixes its seeds when a pool is made, so a new seed makes the pool anew at the next ``reset()``.

EnvPool is an optional dependency (``pip install "sb3-trpo[envpool]"``); this module imports it only when a pool is
made, so ``import sb3_trpo`` never needs it.
"""

import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn

#: gymnasium keywords of the MuJoCo v5 tasks that EnvPool spells differently
ENV_KWARG_NAMES = {"include_cfrc_ext_in_observation": "use_contact_force"}

#: EnvPool's own info entries, which say where an output came from rather than describe the environment
_POOL_INFO_KEYS = frozenset({"env_id", "players", "elapsed_step"})


def import_envpool() -> Any:
    """:return: the ``envpool`` module
    :raises ImportError: saying how to install it, if it is not installed"""
    try:
        import envpool  # an optional dependency, imported only where a pool is made
    except ImportError as error:
        raise ImportError(
            f'EnvPool is not installed ({error}): `pip install "sb3-trpo[envpool]"` (Linux and macOS, x86-64 and '
            "arm64 wheels), or use stable_baselines3's DummyVecEnv."
        ) from None
    return envpool


def envpool_kwargs(env_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """:return: ``gymnasium.make`` keywords as EnvPool's ``make`` takes them (see :data:`ENV_KWARG_NAMES`)"""
    return {ENV_KWARG_NAMES.get(key, key): value for key, value in (env_kwargs or {}).items()}


class EnvPoolVecEnv(VecEnv):
    """``n_envs`` environments of one EnvPool task, stepped together by EnvPool's thread pool, as an SB3 ``VecEnv``.

    Use it wherever SB3 takes a ``VecEnv`` (wrap it in ``VecNormalize`` as usual)::

        env = VecNormalize(EnvPoolVecEnv("Hopper-v5", n_envs=8, seed=0))
        TRPO("MlpPolicy", env, n_steps=256).learn(1_000_000)

    :param env_id: an EnvPool task id (``envpool.list_all_envs()``), e.g. ``"Hopper-v5"``
    :param n_envs: number of environments
    :param seed: the pool's seed (EnvPool derives each environment's from it); ``None`` draws one
    :param num_threads: EnvPool's worker threads; 0 (the default) lets EnvPool choose (one per environment, up to
        the cores)
    :param env_kwargs: the task's keywords, as ``gymnasium.make`` takes them (EnvPool's spelling is used where it
        differs, e.g. ``include_cfrc_ext_in_observation``); ``max_episode_steps`` sets the time limit
    :raises ImportError: if EnvPool is not installed
    :raises ValueError: for a task EnvPool does not have, or keywords it does not take
    """

    def __init__(
        self,
        env_id: str,
        n_envs: int = 1,
        seed: int | None = None,
        num_threads: int = 0,
        env_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if n_envs < 1:
            raise ValueError(f"n_envs={n_envs}: EnvPoolVecEnv needs at least one environment.")
        if num_threads < 0:
            raise ValueError(f"num_threads={num_threads}: must be 0 (EnvPool chooses) or a positive thread count.")
        envpool = import_envpool()
        if env_id not in envpool.list_all_envs():
            raise ValueError(
                f"EnvPool has no task {env_id!r}; it has {len(envpool.list_all_envs())} (envpool.list_all_envs()), "
                "e.g. the MuJoCo tasks Hopper-v5, HalfCheetah-v5, Walker2d-v5, Ant-v5, Humanoid-v5, Swimmer-v5, and "
                "CartPole-v1, Pendulum-v1. Use DummyVecEnv for the others."
            )
        self.env_id = env_id
        self.num_threads = num_threads
        self.env_kwargs = dict(env_kwargs or {})
        self._seed = int(np.random.randint(2**31 - 1)) if seed is None else int(seed)
        self._pending_seed: int | None = None
        self._pool = self._make_pool(self._seed, n_envs)
        super().__init__(n_envs, self._pool.single_observation_space, float32_actions(self._pool.single_action_space))
        self._actions: np.ndarray | None = None
        self._episode_rewards: list[list[float]] = [[] for _ in range(n_envs)]
        self._t_start = time.time()
        self._ordered_ids = np.arange(n_envs, dtype=np.int32)

    def _make_pool(self, seed: int, n_envs: int) -> Any:
        """:return: a synchronous pool (every step steps all ``n_envs`` environments) of this task, seeded with
        ``seed``"""
        envpool = import_envpool()
        try:
            return envpool.make(
                self.env_id,
                env_type="gymnasium",
                num_envs=n_envs,
                seed=seed,
                num_threads=self.num_threads,
                **envpool_kwargs(self.env_kwargs),
            )
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"EnvPool cannot make {self.env_id!r} with env_kwargs {self.env_kwargs!r}: {error}") from None

    # ----------------------------------------------------------------------------------------------------------
    # stepping
    # ----------------------------------------------------------------------------------------------------------

    def reset(self) -> VecEnvObs:
        if self._pending_seed is not None:  # EnvPool takes seeds only when a pool is made
            self._pool.close()
            self._seed, self._pending_seed = self._pending_seed, None
            self._pool = self._make_pool(self._seed, self.num_envs)
        obs, info = self._pool.reset()
        obs, info = self._in_env_order(obs, info)
        self.reset_infos = self._env_infos(info, range(self.num_envs))
        self._episode_rewards = [[] for _ in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        assert self._actions is not None, "step_async() first"
        obs, rewards, terminated, truncated, info = self._pool.step(self._actions)
        obs, info, rewards, terminated, truncated = self._in_env_order(obs, info, rewards, terminated, truncated)
        dones = terminated | truncated
        infos = self._env_infos(info, range(self.num_envs))
        # DummyVecEnv's flag, on every step's info (true only for an episode cut by the time limit)
        for env_info, cut in zip(infos, (truncated & ~terminated).tolist(), strict=True):
            env_info["TimeLimit.truncated"] = cut
        for episode, reward in zip(self._episode_rewards, rewards.tolist(), strict=True):
            episode.append(reward)
        ended = np.flatnonzero(dones)
        if len(ended):
            now = time.time()
            for idx in ended.tolist():
                episode = self._episode_rewards[idx]
                # Monitor's record: the summed rewards, length and time since the start, rounded as Monitor rounds them
                infos[idx]["episode"] = {"r": round(sum(episode), 6), "l": len(episode), "t": round(now - self._t_start, 6)}
                infos[idx]["terminal_observation"] = obs[idx].copy()
                self._episode_rewards[idx] = []
            reset_obs, reset_info = self._pool.reset(ended.astype(np.int32))
            order = np.argsort(reset_info["env_id"])  # reset_info lists the ended environments by id, like ``ended``
            obs[ended] = reset_obs[order]
            for position, idx in enumerate(ended.tolist()):
                self.reset_infos[idx] = self._env_infos(reset_info, [int(order[position])])[0]
        self._actions = None
        return obs, rewards.astype(np.float32, copy=False), dones, infos

    def _in_env_order(self, obs: np.ndarray, info: dict[str, Any], *arrays: np.ndarray) -> tuple[Any, ...]:
        """EnvPool's outputs reordered by environment id (a synchronous pool returns them in order; checked, cheap)."""
        env_ids = info["env_id"]
        if np.array_equal(env_ids, self._ordered_ids):
            return (obs, info, *arrays)
        order = np.argsort(env_ids)
        info = {key: value[order] if isinstance(value, np.ndarray) else value for key, value in info.items()}
        return (obs[order], info, *(array[order] for array in arrays))

    @staticmethod
    def _env_infos(info: dict[str, Any], rows: Sequence[int] | range) -> list[dict[str, Any]]:
        """:return: per-environment info dicts of the rows of EnvPool's batched info (its own entries left out)"""
        keys = [key for key in info if key not in _POOL_INFO_KEYS and isinstance(info[key], np.ndarray)]
        return [{key: info[key][row] for key in keys} for row in rows]

    # ----------------------------------------------------------------------------------------------------------
    # the rest of SB3's VecEnv interface
    # ----------------------------------------------------------------------------------------------------------

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """Seed the environments at the next ``reset()``: EnvPool fixes its seeds when a pool is made, so the pool is
        made anew then, with ``seed`` (``None`` draws one).

        :return: the seed of each environment, as SB3's ``VecEnv.seed`` gives them (EnvPool derives its own from the
            pool's seed, which is the first)
        """
        if seed is None:
            seed = int(np.random.randint(2**31 - 1))
        self._pending_seed = int(seed)
        return [seed + idx for idx in range(self.num_envs)]

    def close(self) -> None:
        self._pool.close()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """Attributes of the environments: EnvPool's environments are not Python objects, so only what every
        environment of the pool shares is answered (``render_mode``, ``spec``, the spaces)."""
        shared = {
            "render_mode": None,
            "spec": self._pool.spec,
            "observation_space": self.observation_space,
            "action_space": self.action_space,
        }
        if attr_name not in shared:
            raise AttributeError(f"EnvPoolVecEnv's environments have no Python attribute {attr_name!r}")
        return [shared[attr_name] for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        raise AttributeError(f"EnvPool's environments are not Python objects: cannot set {attr_name!r} on them")

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        raise AttributeError(f"EnvPool's environments are not Python objects: cannot call {method_name!r} on them")

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        # the episode infos are Monitor's, so code that looks for Monitor (evaluate_policy) reads them
        return [wrapper_class is Monitor for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        raise NotImplementedError("EnvPoolVecEnv does not render: record videos on the gymnasium environment.")


def float32_actions(space: spaces.Space) -> spaces.Space:
    """:return: a float64 ``Box`` action space as a float32 one with the same bounds (what SB3's policies output and
    gymnasium's MuJoCo tasks declare); other spaces unchanged"""
    if isinstance(space, spaces.Box) and space.dtype == np.float64:
        return spaces.Box(space.low.astype(np.float32), space.high.astype(np.float32), space.shape, np.float32)
    return space


def check_same_spaces(pool_env: VecEnv, gym_env: VecEnv, env_id: str) -> None:
    """Refuse an EnvPool task whose spaces differ from gymnasium's of the same id (e.g. Atari, which EnvPool
    preprocesses): a policy trained on one would not run on the other, and the evaluation runs on gymnasium's.

    :raises ValueError: naming both spaces
    """
    for what, ours, theirs in (
        ("observation", pool_env.observation_space, gym_env.observation_space),
        ("action", pool_env.action_space, gym_env.action_space),
    ):
        if not _same_space(ours, theirs):
            raise ValueError(
                f"EnvPool's {env_id} has another {what} space ({ours}) than gymnasium's ({theirs}), so a policy "
                "trained on it could not be evaluated on gymnasium's; use --vec-env dummy for this task."
            )


def _same_space(a: spaces.Space, b: spaces.Space) -> bool:
    """:return: whether two spaces have the same type, shape and dtype (and size, for discrete ones); bounds may
    differ in their last bits (EnvPool keeps float64 bounds where gymnasium keeps float32)"""
    if type(a) is not type(b) or a.shape != b.shape:
        return False
    if isinstance(a, spaces.Box) and isinstance(b, spaces.Box):
        return bool(a.dtype == b.dtype and np.allclose(a.low, b.low) and np.allclose(a.high, b.high))
    return bool(a == b)
