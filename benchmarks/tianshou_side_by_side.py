"""Tianshou's TRPO against sb3_trpo's TRPO on Hopper-v5, the same settings, on gymnasium's environments and on EnvPool.

Four arms, (implementation, backend):

- ``tianshou``: Tianshou 2.0.1's ``TRPO`` with the settings of its MuJoCo example (``examples/mujoco/mujoco_trpo.py``
  at tag v2.0.1), trained by its ``OnPolicyTrainer`` (``algorithm.run_training``);
- ``sb3_trpo``: ``sb3_trpo.TRPO`` with those settings mapped onto its keywords (below), trained by ``learn()``;
- ``gymnasium``: 16 ``gymnasium.make("Hopper-v5")`` environments stepped one after the other in the process:
  Tianshou's ``DummyVectorEnv`` (its example uses a ``SubprocVectorEnv`` with shared memory when EnvPool is missing; the
  in-process one is taken here so both sides step the same way, on 2 cores) against SB3's ``DummyVecEnv``
  (``make_vec_env``); environment i has seed ``seed + i`` on both sides;
- ``envpool``: ``envpool.make("Hopper-v5", env_type="gymnasium", num_envs=16, seed=seed, num_threads=2)`` handed to
  Tianshou as its example does (``EnvPoolFactory`` passes the pool itself as the vector environment, Tianshou's
  collector resets ended environments by id; the example leaves ``num_threads`` to EnvPool, 2 are set here) against
  :class:`sb3_trpo.envpool_env.EnvPoolVecEnv` (16 environments, 2 threads, the same seed).

Observations are normalized on both sides: Tianshou's ``VectorEnvNormObs`` (running mean and variance, clipped at
10), SB3's ``VecNormalize`` (the same, clip 10). Tianshou's example sets ``return_scaling=True`` (``rew_norm`` before
2.0): it divides the critic's targets by the running standard deviation of the returns, and leaves the advantages
(normalized anyway) and the rewards alone. SB3 has no such switch; the nearest is ``VecNormalize(norm_reward=True,
gamma=0.99)``, which divides the rewards by the running standard deviation of the discounted return, so the critic
regresses on returns of about the same scale (and the normalized advantages are unchanged). It is used here.

Settings (Tianshou's example, read from the v2.0.1 tag of github.com/thu-ml/tianshou, ``examples/mujoco/mujoco_trpo.py``,
and the defaults of the installed ``tianshou/algorithm/modelfree/{trpo,npg,a2c}.py``), and sb3_trpo's keywords:

====================================================  =====================================================
Tianshou                                              sb3_trpo
====================================================  =====================================================
16 training envs, ``collection_step_num_env_steps``   16 envs, ``n_steps=64`` (64 x 16 = 1024 per update)
1024, ``buffer_size`` 4096, one update per collect
``hidden_sizes=[64, 64]``, ``nn.Tanh``, separate      ``net_arch=dict(pi=[64, 64], vf=[64, 64])``,
actor and critic                                      ``activation_fn=nn.Tanh``
``ContinuousActorProbabilistic(unbounded=True)``,     ``log_std_init=-0.5`` (state-independent log std)
``sigma_param`` = -0.5, ``Independent(Normal)``
orthogonal init gain sqrt(2), zero biases, the mean   ``ortho_init=True`` (sqrt(2), zero biases), then the
layer's weights x 0.01, critic head gain sqrt(2)      heads re-initialized as Tianshou's (action 0.01 x
                                                      sqrt(2), value sqrt(2); SB3's own: 0.01 and 1)
``AdamOptimizerFactory(lr=1e-3)`` (eps 1e-8) for the  ``learning_rate``: 1e-3 x (1 - k / updates) at update k,
critic, ``LRSchedulerFactoryLinear``: linear decay    ``policy_kwargs["optimizer_kwargs"]=dict(eps=1e-8)``
to 0 over the run, stepped once per update            (SB3's default eps is 1e-5)
``optim_critic_iters=20``, ``batch_size=None`` (the   ``n_critic_updates=20``, ``batch_size=1024``
whole collect is one minibatch)
``gamma=0.99``, ``gae_lambda=0.95``                   ``gamma=0.99``, ``gae_lambda=0.95``
``advantage_normalization=True``                      ``normalize_advantage=True``
``max_kl=0.01`` (mean over states of the KL summed    ``target_kl=0.01`` (the same KL: sb3_trpo sums over
over the 3 action dimensions)                         action dimensions)
``backtrack_coeff=0.8``, ``max_backtracks=10``;       ``line_search_shrinking_factor=0.8``,
accept: KL < max_kl and the surrogate improves        ``line_search_max_iter=10`` (KL <= target_kl, improves)
conjugate gradient: 10 steps, damping 0.1 (fixed in   ``cg_max_steps=10``, ``cg_damping=0.1``
``NPG``: ``nsteps=10``, ``self._damping = 0.1``)
``action_bound_method="clip"`` (Hopper's bounds are   SB3 clips the actions to the bounds
[-1, 1], so the scaling is the identity)
``return_scaling=True``                               ``VecNormalize(norm_reward=True, gamma=0.99)`` (above)
====================================================  =====================================================

What the example does that is left out here: test episodes. Its trainer runs ``num_test_envs=10`` test episodes
after each epoch (100 epochs of 30,000 steps); here ``test_collector=None`` (no test steps at all), no logger, no
progress bar, and one epoch of ``TIMESTEPS`` steps (``max_epochs=1``, ``epoch_num_steps=timesteps``; the learning
rate decays over ``ceil(timesteps / 1024)`` updates on both sides). The budget is rounded up to whole collects on
both sides (200,000 -> 196 updates, 200,704 steps).

Timed: the wall time of Tianshou's ``algorithm.run_training(...)`` and of sb3_trpo's ``learn()``, split into
collection (Tianshou: ``training_collector.collect``; SB3: ``collect_rollouts``, which also computes GAE) and updates
(Tianshou: ``algorithm.update``, which also computes GAE and the old log-probabilities; SB3: ``train``). Building
the models and environments is not timed. Each (implementation, backend, seed) runs in a fresh process with one
torch thread (``torch.set_num_threads(1)``), one process at a time; the four arms of a seed alternate their order
from seed to seed (implementations interleaved), and ``os.getloadavg()`` is recorded before and after each run.

After training, each final policy is evaluated the same way: 10 episodes of gymnasium's ``Hopper-v5`` (the first reset
seeded with ``seed + 10_000``), the mean action (deterministic), the observations normalized with the statistics of
training, frozen. So the returns of all four arms are comparable.

The workers import ``sb3_trpo`` from a snapshot of HEAD's package (``git archive``, as ``vec_env.py`` does);
``--working-tree`` imports the work tree's. Results: ``benchmarks/results/tianshou_side_by_side.json``, one entry per
(implementation, backend, seed, timesteps), with versions (tianshou, torch, gymnasium, envpool, mujoco, numpy, SB3,
commit) and load averages; entries already there are skipped, so an interrupted run resumes. ``report`` writes
``benchmarks/results/tianshou_side_by_side.md``: medians over seeds, the ratios Tianshou / sb3_trpo per backend and
gymnasium / EnvPool per implementation, and the final returns.

Tianshou is not a dependency of this project; it runs in a separate environment (from the repository's root)::

    python -m venv .venv-tianshou
    .venv-tianshou/bin/pip install "torch==2.13.0" tianshou envpool "gymnasium[mujoco]" -e .
    .venv-tianshou/bin/python benchmarks/tianshou_side_by_side.py run                 # seeds 0 1 2, 200,000 steps
    .venv-tianshou/bin/python benchmarks/tianshou_side_by_side.py report              # -> results/tianshou_side_by_side.md
    .venv-tianshou/bin/python benchmarks/tianshou_side_by_side.py run --seeds 0 --timesteps 4096 --out /tmp/t.json

(measured with torch 2.13.0 CPU, tianshou 2.0.1, envpool 1.2.5, gymnasium 1.4.0; ``worker IMPL BACKEND SEED
TIMESTEPS`` is the subcommand each fresh process runs, it prints one JSON line.)
"""

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Section
from vec_env import _in_fresh_process, _load_average, _snapshot
from vec_env import _versions as vec_env_versions

RESULTS = Path(__file__).resolve().parent / "results"
OUT_JSON = RESULTS / "tianshou_side_by_side.json"
ENV_ID = "Hopper-v5"
IMPLEMENTATIONS = ("tianshou", "sb3_trpo")
BACKENDS = ("gymnasium", "envpool")
SEEDS = (0, 1, 2)
TIMESTEPS = 200_000
EVAL_EPISODES = 10
EVAL_SEED_OFFSET = 10_000
ENVPOOL_THREADS = 2

# Tianshou's examples/mujoco/mujoco_trpo.py (v2.0.1) and the defaults of its TRPO/NPG classes
N_ENVS = 16
STEPS_PER_COLLECT = 1024
BUFFER_SIZE = 4096
HIDDEN_SIZES = (64, 64)
LEARNING_RATE = 1e-3
ADAM_EPS = 1e-8
GAMMA = 0.99
GAE_LAMBDA = 0.95
MAX_KL = 0.01
BACKTRACK_COEFF = 0.8
MAX_BACKTRACKS = 10
OPTIM_CRITIC_ITERS = 20
CG_STEPS = 10
CG_DAMPING = 0.1
LOG_STD_INIT = -0.5
#: the scale of the actor's mean layer after the orthogonal initialization
MEAN_LAYER_SCALE = 0.01

SETTINGS = {
    "env_id": ENV_ID,
    "n_envs": N_ENVS,
    "steps_per_collect": STEPS_PER_COLLECT,
    "hidden_sizes": list(HIDDEN_SIZES),
    "activation": "tanh",
    "learning_rate": LEARNING_RATE,
    "lr_decay": "linear to 0 over the updates",
    "adam_eps": ADAM_EPS,
    "gamma": GAMMA,
    "gae_lambda": GAE_LAMBDA,
    "max_kl": MAX_KL,
    "backtrack_coeff": BACKTRACK_COEFF,
    "max_backtracks": MAX_BACKTRACKS,
    "optim_critic_iters": OPTIM_CRITIC_ITERS,
    "critic_batch": "whole collect",
    "cg_steps": CG_STEPS,
    "cg_damping": CG_DAMPING,
    "log_std_init": LOG_STD_INIT,
    "advantage_normalization": True,
    "obs_norm": True,
    "return_scaling": "tianshou: return_scaling=True; sb3_trpo: VecNormalize(norm_reward=True)",
    "action_bound_method": "clip",
    "envpool_threads": ENVPOOL_THREADS,
}


def updates_for(timesteps: int) -> int:
    """:return: the number of updates (whole collects of :data:`STEPS_PER_COLLECT`) for a budget, on both sides"""
    return math.ceil(timesteps / STEPS_PER_COLLECT)


class LinearDecay:
    """SB3 learning-rate schedule equal to Tianshou's ``LRSchedulerFactoryLinear`` stepped once per update:
    ``lr x (1 - k / updates)`` at the k-th update (k from 0).

    SB3 calls it with the progress remaining ``1 - num_timesteps / total_timesteps`` just before each update, when
    ``num_timesteps`` is ``(k + 1) x 1024``; ``k`` is recovered from it.
    """

    def __init__(self, learning_rate: float, timesteps: int) -> None:
        self.learning_rate = learning_rate
        self.timesteps = timesteps
        self.updates = updates_for(timesteps)

    def __call__(self, progress_remaining: float) -> float:
        done = round((1.0 - progress_remaining) * self.timesteps / STEPS_PER_COLLECT)
        k = min(max(done - 1, 0), self.updates - 1)
        return self.learning_rate * (1.0 - k / self.updates)


def _versions() -> dict[str, str]:
    """vec_env.py's record of versions and commit, with Tianshou's and EnvPool's."""
    versions = vec_env_versions()
    for name in ("tianshou", "envpool"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return versions


def evaluate(act: Callable[[np.ndarray], np.ndarray], seed: int) -> tuple[float, float]:
    """Run :data:`EVAL_EPISODES` episodes of gymnasium's environment with ``act`` (a raw observation to an action).

    :return: the mean and standard deviation of the episodes' returns
    """
    import gymnasium

    env = gymnasium.make(ENV_ID)
    returns = []
    obs, _ = env.reset(seed=seed + EVAL_SEED_OFFSET)
    for _ in range(EVAL_EPISODES):
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
        obs, _ = env.reset()
    env.close()
    return float(np.mean(returns)), float(np.std(returns))


def train_tianshou(backend: str, seed: int, timesteps: int) -> dict[str, Any]:
    """Train Tianshou's TRPO with its MuJoCo example's settings in this process; time ``run_training``."""
    import gymnasium
    import torch
    from tianshou.algorithm.modelfree import trpo as tianshou_trpo
    from tianshou.algorithm.modelfree.reinforce import ProbabilisticActorPolicy
    from tianshou.algorithm.optim import AdamOptimizerFactory, LRSchedulerFactoryLinear
    from tianshou.data import Collector, CollectStats, VectorReplayBuffer
    from tianshou.env import DummyVectorEnv, VectorEnvNormObs
    from tianshou.trainer import OnPolicyTrainerParams
    from tianshou.utils.net.common import Net
    from tianshou.utils.net.continuous import ContinuousActorProbabilistic, ContinuousCritic
    from torch import nn
    from torch.distributions import Distribution, Independent, Normal

    torch.set_num_threads(1)
    np.random.seed(seed)
    torch.manual_seed(seed)
    template = gymnasium.make(ENV_ID)
    observation_space, action_space = template.observation_space, template.action_space
    template.close()
    if backend == "gymnasium":
        venv: Any = DummyVectorEnv([lambda: gymnasium.make(ENV_ID) for _ in range(N_ENVS)])
        venv.seed(seed)
    else:
        import envpool

        venv = envpool.make(ENV_ID, env_type="gymnasium", num_envs=N_ENVS, seed=seed, num_threads=ENVPOOL_THREADS)
    envs = VectorEnvNormObs(venv)

    actor = ContinuousActorProbabilistic(
        preprocess_net=Net(state_shape=observation_space.shape, hidden_sizes=list(HIDDEN_SIZES), activation=nn.Tanh),
        action_shape=action_space.shape,
        unbounded=True,
    )
    critic = ContinuousCritic(
        preprocess_net=Net(state_shape=observation_space.shape, hidden_sizes=list(HIDDEN_SIZES), activation=nn.Tanh)
    )
    nn.init.constant_(actor.sigma_param, LOG_STD_INIT)
    for module in [*actor.modules(), *critic.modules()]:
        if isinstance(module, nn.Linear):
            nn.init.orthogonal_(module.weight, gain=math.sqrt(2))
            nn.init.zeros_(module.bias)
    for module in actor.mu.modules():
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
            module.weight.data.mul_(MEAN_LAYER_SCALE)

    optim = AdamOptimizerFactory(lr=LEARNING_RATE, eps=ADAM_EPS)
    optim.with_lr_scheduler_factory(
        LRSchedulerFactoryLinear(max_epochs=1, epoch_num_steps=timesteps, collection_step_num_env_steps=STEPS_PER_COLLECT)
    )

    def dist(loc_scale: tuple[torch.Tensor, torch.Tensor]) -> Distribution:
        return Independent(Normal(*loc_scale), 1)

    policy = ProbabilisticActorPolicy(
        actor=actor, dist_fn=dist, action_scaling=True, action_bound_method="clip", action_space=action_space
    )
    algorithm = tianshou_trpo.TRPO(
        policy=policy,
        critic=critic,
        optim=optim,
        gamma=GAMMA,
        gae_lambda=GAE_LAMBDA,
        return_scaling=True,
        advantage_normalization=True,
        optim_critic_iters=OPTIM_CRITIC_ITERS,
        max_kl=MAX_KL,
        backtrack_coeff=BACKTRACK_COEFF,
        max_backtracks=MAX_BACKTRACKS,
    )
    collector = Collector[CollectStats](algorithm, envs, VectorReplayBuffer(BUFFER_SIZE, N_ENVS), exploration_noise=True)
    params = OnPolicyTrainerParams(
        training_collector=collector,
        test_collector=None,
        max_epochs=1,
        epoch_num_steps=timesteps,
        update_step_num_repetitions=1,
        batch_size=None,
        collection_step_num_env_steps=STEPS_PER_COLLECT,
        logger=None,
        verbose=False,
        show_progress=False,
    )

    episode_returns: list[float] = []
    collect = collector.collect

    def collect_and_record(*args: Any, **kwargs: Any) -> CollectStats:
        stats = collect(*args, **kwargs)
        episode_returns.extend(float(r) for r in stats.returns)
        return stats

    critic_lrs: list[float] = []
    update = algorithm.update

    def update_and_record(*args: Any, **kwargs: Any) -> Any:
        critic_lrs.append(algorithm.optim._optim.param_groups[0]["lr"])  # the learning rate this update uses
        return update(*args, **kwargs)

    collector.collect = collect_and_record  # type: ignore[method-assign]
    algorithm.update = update_and_record  # type: ignore[method-assign]
    sections = Section()
    with sections.patched(collector, "collect", "collect"), sections.patched(algorithm, "update", "train"):
        start = time.perf_counter()
        algorithm.run_training(params)
        wall = time.perf_counter() - start

    obs_rms = envs.get_obs_rms()
    algorithm.eval()

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            (mean, _), _ = actor(torch.as_tensor(obs_rms.norm(obs[None]), dtype=torch.float32))
        return policy.map_action(mean.numpy())[0]

    record = _record(int(collector.collect_step), wall, sections, evaluate(act, seed), episode_returns[-100:], critic_lrs)
    envs.close()
    return record


def _record(
    timesteps: int,
    wall: float,
    sections: Section,
    final: tuple[float, float],
    training_returns: list[float],
    critic_lrs: list[float],
) -> dict[str, Any]:
    """:return: what a worker reports of its run, the same fields for both implementations

    :param final: the final evaluation's mean and standard deviation
    :param training_returns: the returns of the last (up to 100) training episodes
    """
    return {
        "timesteps": timesteps,
        "learn_s": wall,
        "collect_s": sections.seconds["collect"],
        "train_s": sections.seconds["train"],
        "train_calls": sections.calls["train"],
        "final_return_mean": final[0],
        "final_return_std": final[1],
        "training_return_last_100": float(np.mean(training_returns)) if training_returns else float("nan"),
        "critic_lr_first_last": [critic_lrs[0], critic_lrs[-1]],
    }


def _match_tianshou_heads(policy: Any) -> None:
    """Initialize the action and value heads as Tianshou's example does (SB3's ``ortho_init`` uses the gains 0.01
    and 1 for them; the hidden layers already match: gain sqrt(2), zero biases)."""
    import torch as th

    with th.no_grad():
        th.nn.init.orthogonal_(policy.action_net.weight, gain=math.sqrt(2))
        policy.action_net.weight.mul_(MEAN_LAYER_SCALE)
        th.nn.init.zeros_(policy.action_net.bias)
        th.nn.init.orthogonal_(policy.value_net.weight, gain=math.sqrt(2))
        th.nn.init.zeros_(policy.value_net.bias)


def sb3_trpo_kwargs(timesteps: int) -> dict[str, Any]:
    """:return: ``sb3_trpo.TRPO``'s keywords for Tianshou's settings"""
    from torch import nn

    return dict(
        learning_rate=LinearDecay(LEARNING_RATE, timesteps),
        n_steps=STEPS_PER_COLLECT // N_ENVS,
        batch_size=STEPS_PER_COLLECT,
        gamma=GAMMA,
        gae_lambda=GAE_LAMBDA,
        n_critic_updates=OPTIM_CRITIC_ITERS,
        target_kl=MAX_KL,
        cg_max_steps=CG_STEPS,
        cg_damping=CG_DAMPING,
        line_search_shrinking_factor=BACKTRACK_COEFF,
        line_search_max_iter=MAX_BACKTRACKS,
        normalize_advantage=True,
        policy_kwargs=dict(
            net_arch=dict(pi=list(HIDDEN_SIZES), vf=list(HIDDEN_SIZES)),
            activation_fn=nn.Tanh,
            log_std_init=LOG_STD_INIT,
            ortho_init=True,
            optimizer_kwargs=dict(eps=ADAM_EPS),
        ),
    )


def train_sb3_trpo(backend: str, seed: int, timesteps: int) -> dict[str, Any]:
    """Train ``sb3_trpo.TRPO`` with Tianshou's settings in this process; time ``learn()``."""
    import torch as th
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    from sb3_trpo import TRPO
    from sb3_trpo.envpool_env import EnvPoolVecEnv

    th.set_num_threads(1)
    if backend == "gymnasium":
        venv: Any = make_vec_env(ENV_ID, n_envs=N_ENVS, seed=seed)
    else:
        venv = EnvPoolVecEnv(ENV_ID, N_ENVS, seed=seed, num_threads=ENVPOOL_THREADS)
    env = VecNormalize(venv, norm_obs=True, norm_reward=True, clip_obs=10.0, gamma=GAMMA)
    model = TRPO("MlpPolicy", env, seed=seed, **sb3_trpo_kwargs(timesteps))
    _match_tianshou_heads(model.policy)
    critic_lrs: list[float] = []
    train = model.train

    def train_and_record() -> None:
        train()
        critic_lrs.append(model.policy.optimizer.param_groups[0]["lr"])  # set by train() for this update

    model.train = train_and_record  # type: ignore[method-assign]
    sections = Section()
    with sections.patched(model, "collect_rollouts", "collect"), sections.patched(model, "train", "train"):
        start = time.perf_counter()
        model.learn(timesteps)
        wall = time.perf_counter() - start

    def act(obs: np.ndarray) -> np.ndarray:
        return model.predict(env.normalize_obs(obs), deterministic=True)[0]

    returns = [e["r"] for e in model.ep_info_buffer]
    record = _record(int(model.num_timesteps), wall, sections, evaluate(act, seed), returns, critic_lrs)
    env.close()
    return {**record, "sb3_trpo_file": sys.modules["sb3_trpo"].__file__}


def worker(implementation: str, backend: str, seed: int, timesteps: int) -> dict[str, Any]:
    """One arm in this process: train, time, evaluate."""
    import torch

    train = train_tianshou if implementation == "tianshou" else train_sb3_trpo
    record = train(backend, seed, timesteps)
    return {
        "implementation": implementation,
        "backend": backend,
        "seed": seed,
        "requested_timesteps": timesteps,
        **record,
        "updates": updates_for(timesteps),
        "collect_us_per_sample": 1e6 * record["collect_s"] / record["timesteps"],
        "threads": torch.get_num_threads(),
        "settings": SETTINGS,
        **_versions(),
    }


def _key(record: dict[str, Any]) -> tuple[Any, ...]:
    return record["implementation"], record["backend"], record["seed"], record["requested_timesteps"]


def _load(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else []


def _arm_order(seed_index: int) -> list[tuple[str, str]]:
    """The four arms of one seed, the implementations interleaved; reversed every other seed."""
    arms = [(implementation, backend) for backend in BACKENDS for implementation in IMPLEMENTATIONS]
    return arms if seed_index % 2 == 0 else arms[::-1]


def run(seeds: list[int], timesteps: int, out: Path, working_tree: bool) -> None:
    """Every (arm, seed) in a fresh process, one at a time; entries already in ``out`` are skipped."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tianshou_side_by_side_code_") as folder:
        code = None if working_tree else Path(folder)
        commit = _snapshot(code) if code is not None else None
        source = "work tree" if code is None else f"git archive of HEAD ({commit})"
        for index, seed in enumerate(seeds):
            for implementation, backend in _arm_order(index):
                key = (implementation, backend, seed, timesteps)
                if any(_key(r) == key for r in _load(out)):
                    continue
                load_before = _load_average()
                started = time.time()
                record = _in_fresh_process(["worker", implementation, backend, str(seed), str(timesteps)], code, __file__)
                record.update(load_before=load_before, load_after=_load_average(), started=started, code=source)
                record["process_s"] = time.time() - started
                if commit is not None:
                    record["commit"] = commit
                out.write_text(json.dumps([*(r for r in _load(out) if _key(r) != key), record], indent=1))
                print(
                    f"{implementation} {backend} seed {seed}: {record['learn_s']:.1f} s (collect {record['collect_s']:.1f}, "
                    f"train {record['train_s']:.1f}), final return {record['final_return_mean']:.1f} "
                    f"± {record['final_return_std']:.1f}, load before {load_before}",
                    flush=True,
                )


def _median(records: list[dict[str, Any]], field: str) -> float:
    return statistics.median(r[field] for r in records) if records else float("nan")


def report(out: Path) -> str:
    """Write the Markdown summary next to ``out`` (same name, ``.md``) and return it."""
    records = _load(out)
    if not records:
        raise SystemExit(f"no results in {out}: run `run` first")
    lines = [f"# Tianshou's TRPO against sb3_trpo's TRPO on {ENV_ID}", ""]
    for timesteps in sorted({r["requested_timesteps"] for r in records}):
        at = [r for r in records if r["requested_timesteps"] == timesteps]
        arms = {
            (i, b): sorted((r for r in at if (r["implementation"], r["backend"]) == (i, b)), key=lambda r: r["seed"])
            for i in IMPLEMENTATIONS
            for b in BACKENDS
        }
        first = at[0]
        lines += [
            f"## {timesteps:,} timesteps ({first['updates']} updates of {STEPS_PER_COLLECT} samples, {N_ENVS} envs)",
            "",
            f"Seeds: {sorted({r['seed'] for r in at})}. Versions: tianshou {first['tianshou']}, torch {first['torch']}, "
            f"gymnasium {first['gymnasium']}, envpool {first['envpool']}, mujoco {first['mujoco']}, numpy {first['numpy']}, "
            f"stable-baselines3 {first['stable_baselines3']}, commit {first['commit']}. One torch thread, EnvPool on "
            f"{ENVPOOL_THREADS} threads.",
            "",
            "| implementation | backend | runs | training wall s (median) | collect s | update s | collect us/sample "
            "| final return (10 det. episodes), mean ± std over seeds | training return (last 100) | load before |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (implementation, backend), runs in arms.items():
            if not runs:
                continue
            finals = [r["final_return_mean"] for r in runs]
            spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
            loads = ", ".join(str(r["load_before"][0]) for r in runs)
            lines.append(
                f"| {implementation} | {backend} | {len(runs)} | {_median(runs, 'learn_s'):.1f} | "
                f"{_median(runs, 'collect_s'):.1f} | {_median(runs, 'train_s'):.1f} | "
                f"{_median(runs, 'collect_us_per_sample'):.1f} | {statistics.mean(finals):.0f} ± {spread:.0f} | "
                f"{statistics.mean(r['training_return_last_100'] for r in runs):.0f} | {loads} |"
            )
        lines += ["", "Ratios of the medians (per-seed ratios in brackets):", ""]
        for backend in BACKENDS:
            tianshou, ours = arms["tianshou", backend], arms["sb3_trpo", backend]
            if tianshou and ours:
                per_seed = [f"{t['learn_s'] / o['learn_s']:.2f}" for t in tianshou for o in ours if t["seed"] == o["seed"]]
                lines.append(
                    f"- {backend}: Tianshou / sb3_trpo = {_median(tianshou, 'learn_s') / _median(ours, 'learn_s'):.2f}x "
                    f"training time [{', '.join(per_seed)}]; collection "
                    f"{_median(tianshou, 'collect_s') / _median(ours, 'collect_s'):.2f}x, updates "
                    f"{_median(tianshou, 'train_s') / _median(ours, 'train_s'):.2f}x"
                )
        for implementation in IMPLEMENTATIONS:
            gym_runs, pool_runs = arms[implementation, "gymnasium"], arms[implementation, "envpool"]
            if gym_runs and pool_runs:
                per_seed = [
                    f"{g['learn_s'] / p['learn_s']:.2f}" for g in gym_runs for p in pool_runs if g["seed"] == p["seed"]
                ]
                lines.append(
                    f"- {implementation}: gymnasium / EnvPool = "
                    f"{_median(gym_runs, 'learn_s') / _median(pool_runs, 'learn_s'):.2f}x training time "
                    f"[{', '.join(per_seed)}] (above 1: EnvPool is faster); collection "
                    f"{_median(gym_runs, 'collect_s') / _median(pool_runs, 'collect_s'):.2f}x"
                )
        lines.append("")
    lines += [
        "## Settings",
        "",
        "Tianshou's MuJoCo TRPO example (v2.0.1) on both sides; the mapping onto sb3_trpo's keywords, what is timed and "
        "what is left out (Tianshou's test episodes) are in the docstring of `benchmarks/tianshou_side_by_side.py`.",
        "",
        *(f"- {name}: {value}" for name, value in SETTINGS.items()),
        "",
        "## Reproduce",
        "",
        "```",
        "python -m venv .venv-tianshou",
        '.venv-tianshou/bin/pip install "torch==2.13.0" tianshou envpool "gymnasium[mujoco]" -e .',
        ".venv-tianshou/bin/python benchmarks/tianshou_side_by_side.py run      # resumable",
        ".venv-tianshou/bin/python benchmarks/tianshou_side_by_side.py report",
        "```",
    ]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    run_parser.add_argument("--timesteps", type=int, default=TIMESTEPS)
    run_parser.add_argument("--out", type=Path, default=OUT_JSON, help="results JSON (the report goes next to it)")
    run_parser.add_argument(
        "--working-tree", action="store_true", help="import sb3_trpo from the work tree, not from a snapshot of HEAD"
    )
    report_parser = sub.add_parser("report")
    report_parser.add_argument("--out", type=Path, default=OUT_JSON, help="results JSON (the report goes next to it)")
    worker_parser = sub.add_parser("worker")
    worker_parser.add_argument("implementation", choices=IMPLEMENTATIONS)
    worker_parser.add_argument("backend", choices=BACKENDS)
    worker_parser.add_argument("seed", type=int)
    worker_parser.add_argument("timesteps", type=int)
    args = parser.parse_args()
    if args.command == "worker":
        print(json.dumps(worker(args.implementation, args.backend, args.seed, args.timesteps)), flush=True)
        return
    if args.command == "run":
        run(args.seeds, args.timesteps, args.out, args.working_tree)
    print(report(args.out))


if __name__ == "__main__":
    main()
