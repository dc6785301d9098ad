"""EnvPool against DummyVecEnv, and the lean normalizer against SB3's VecNormalize, on the MuJoCo presets.

``learn``: each (task, backend, seed) trains ``sb3_trpo.TRPO`` with the command-line preset of the task for 1M steps,
alone on the machine, in a fresh process with one torch thread, importing a snapshot of HEAD's package (as
``vec_env.py`` does). Backends:

- ``dummy``: the preset as it is, ``DummyVecEnv`` over gymnasium's environments (2 of them);
- ``envpool``: :class:`sb3_trpo.envpool_env.EnvPoolVecEnv` with ``ENVPOOL_ENVS`` environments on 2 threads and the
  preset's ``n_steps`` scaled so that an update sees the same number of samples (2 x 1024 = 16 x 128). EnvPool's
  step has a fixed cost per call on this machine (about 0.15 ms, the hand-over to its threads) on top of the physics,
  so it pays with many environments per call, not with 2 (``rates``).

Both wrap the environments in ``VecNormalize`` (the lean collection steps it with the lean normalizer). Timed: the
wall time of ``learn()`` (no periodic evaluation), split into collection and updates. After training, the policy is
evaluated on gymnasium's environment (10 deterministic episodes, the training statistics copied), so the returns of
both backends are comparable. The backends alternate per seed. Results: ``results/fast_envs.json`` (resumable).

``rates``: samples per second of stepping the environments alone with random actions: ``DummyVecEnv`` over 2
gymnasium environments against EnvPool at 2 to 64 environments on 1 and 2 threads; and the policy's forward pass
per sample at those batch sizes. ``normalizer``: microseconds per sample of SB3's ``VecNormalize.step`` and of the
lean normalizer over the same steps, isolated (a VecEnv that returns stored Hopper-sized arrays) and inside the lean
collection loop on Hopper-v5 (rollouts alternating the two). ``report`` writes ``results/fast_envs.md`` with the
cost model for more cores.

    python benchmarks/fast_envs.py learn --tasks Hopper-v5 HalfCheetah-v5 --seeds 0 1 2
    python benchmarks/fast_envs.py rates
    python benchmarks/fast_envs.py normalizer
    python benchmarks/fast_envs.py report
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Section
from vec_env import _in_fresh_process, _load_average, _snapshot, _versions

RESULTS = Path(__file__).resolve().parent / "results"
OUT_JSON = RESULTS / "fast_envs.json"
OUT_MD = RESULTS / "fast_envs.md"
TASKS = ("Hopper-v5", "HalfCheetah-v5")
BACKENDS = ("dummy", "envpool")
#: EnvPool's environments and threads in the learning runs
#: per task: the returns fall with shorter segments per environment (seed 0, 16 envs: Hopper 2231 on EnvPool and 1841
#: on DummyVecEnv against 3615 with the preset's 2 x 1024; HalfCheetah 3275 with 16 x 64 against 6725), so 8 x 256
ENVPOOL_ENVS = {"Hopper-v5": 8, "HalfCheetah-v5": 8}
ENVPOOL_THREADS = 2
TIMESTEPS = 1_000_000
#: batch sizes of the rates table
RATE_ENVS = (2, 4, 8, 16, 32, 64)
#: cores of the cost model
MODEL_CORES = (2, 8, 16, 64)


def backend_settings(env_id: str, backend: str) -> tuple[int, dict[str, Any]]:
    """:return: the number of environments and the TRPO keywords of the preset on ``backend`` (the same samples per
    update on every backend)

    :param backend: ``dummy`` (the preset), ``envpool`` (:data:`ENVPOOL_ENVS` of the task), or ``dummy:N`` /
        ``envpool:N`` with N environments
    """
    from sb3_trpo.cli.presets import preset_for

    preset = preset_for(env_id)
    hyperparams = dict(preset.hyperparams)
    if backend == "dummy":
        return preset.n_envs, hyperparams
    n_envs = int(backend.partition(":")[2] or ENVPOOL_ENVS[env_id])
    hyperparams["n_steps"] = preset.n_envs * hyperparams["n_steps"] // n_envs
    return n_envs, hyperparams


def make_training_env(env_id: str, backend: str, seed: int, n_envs: int) -> Any:
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    from sb3_trpo.cli.presets import preset_for
    from sb3_trpo.envpool_env import EnvPoolVecEnv

    preset = preset_for(env_id)
    if backend.startswith("dummy"):
        env = make_vec_env(env_id, n_envs=n_envs, seed=seed, env_kwargs=preset.env_kwargs or None)
    else:
        env = EnvPoolVecEnv(env_id, n_envs, seed=seed, num_threads=ENVPOOL_THREADS, env_kwargs=preset.env_kwargs)
    return VecNormalize(env, gamma=preset.hyperparams.get("gamma", 0.99)) if preset.normalize else env


def learn_one(env_id: str, backend: str, seed: int, timesteps: int) -> dict[str, Any]:
    """Train one (task, backend, seed) in this process; time ``learn()``; evaluate on gymnasium's environment."""
    import torch as th
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.utils import safe_mean
    from stable_baselines3.common.vec_env import VecNormalize, sync_envs_normalization

    from sb3_trpo import TRPO
    from sb3_trpo.cli.presets import model_kwargs, preset_for

    th.set_num_threads(1)
    preset = preset_for(env_id)
    n_envs, hyperparams = backend_settings(env_id, backend)
    env = make_training_env(env_id, backend, seed, n_envs)
    model = TRPO(preset.policy, env, seed=seed, **model_kwargs(hyperparams))
    sections = Section()
    with sections.patched(model, "collect_rollouts", "collect"), sections.patched(model, "train", "train"):
        start = time.perf_counter()
        model.learn(timesteps)
        wall = time.perf_counter() - start
    eval_env = make_vec_env(env_id, n_envs=1, seed=seed + 10_000, env_kwargs=preset.env_kwargs or None)
    if isinstance(env, VecNormalize):
        eval_env = VecNormalize(eval_env, training=False, norm_reward=False)
        sync_envs_normalization(env, eval_env)
    final_mean, final_std = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
    env.close()
    return {
        "task": env_id,
        "backend": backend,
        "seed": seed,
        "n_envs": n_envs,
        "n_steps": hyperparams["n_steps"],
        "envpool_threads": ENVPOOL_THREADS if backend.startswith("envpool") else None,
        "timesteps": model.num_timesteps,
        "learn_s": wall,
        "collect_s": sections.seconds["collect"],
        "train_s": sections.seconds["train"],
        "train_calls": sections.calls["train"],
        "collect_us_per_sample": 1e6 * sections.seconds["collect"] / model.num_timesteps,
        "final_return_mean": float(final_mean),
        "final_return_std": float(final_std),
        "training_return_last_100": float(safe_mean([e["r"] for e in model.ep_info_buffer])),
        "threads": th.get_num_threads(),
        "sb3_trpo_file": sys.modules["sb3_trpo"].__file__,
        **_versions(),
    }


def _random_rate(env: Any, samples: int) -> float:
    """:return: samples per second of ``env.step`` with uniform random actions (after a reset)"""
    env.reset()
    calls = max(samples // env.num_envs, 200)
    rng = np.random.default_rng(0)
    low, high = env.action_space.low, env.action_space.high
    actions = rng.uniform(low, high, (calls, env.num_envs, *env.action_space.shape)).astype(np.float32)
    start = time.perf_counter()
    for batch in actions:
        env.step(batch)
    return calls * env.num_envs / (time.perf_counter() - start)


def rates_one(env_id: str, samples: int = 20_000) -> dict[str, Any]:
    """Environment rates (DummyVecEnv 2 envs, EnvPool at :data:`RATE_ENVS` on 1 and 2 threads) and the preset
    policy's forward pass per sample at those batch sizes."""
    import torch as th
    from stable_baselines3.common.env_util import make_vec_env

    from sb3_trpo import TRPO
    from sb3_trpo.cli.presets import model_kwargs, preset_for
    from sb3_trpo.envpool_env import EnvPoolVecEnv
    from sb3_trpo.lean_forward import LeanForward

    th.set_num_threads(1)
    preset = preset_for(env_id)
    kwargs = preset.env_kwargs or None
    dummy = make_vec_env(env_id, 2, seed=0, env_kwargs=kwargs)
    record: dict[str, Any] = {"rates_task": env_id, "dummy_2": _random_rate(dummy, samples)}
    for n_envs in RATE_ENVS:
        for threads in (1, 2):
            env = EnvPoolVecEnv(env_id, n_envs, seed=0, num_threads=threads, env_kwargs=preset.env_kwargs)
            record[f"envpool_{n_envs}_{threads}"] = _random_rate(env, samples)
            env.close()
    model = TRPO(preset.policy, make_vec_env(env_id, 2, seed=0, env_kwargs=kwargs), **model_kwargs(preset.hyperparams))
    forward = LeanForward(model.policy)
    for n_envs in RATE_ENVS:
        obs = th.randn(n_envs, *model.observation_space.shape)
        calls = max(samples // n_envs, 200)
        with th.no_grad():
            start = time.perf_counter()
            for _ in range(calls):
                forward(obs, None)
            record[f"forward_us_per_sample_{n_envs}"] = 1e6 * (time.perf_counter() - start) / (calls * n_envs)
    return {**record, **_versions()}


def normalizer_one(env_id: str = "Hopper-v5", rollouts: int = 20) -> dict[str, Any]:
    """Microseconds per sample of VecNormalize's step and of the lean normalizer: isolated, and inside the lean
    collection loop (the same model and environments, rollouts alternating the two)."""
    import torch as th
    from gymnasium import spaces
    from stable_baselines3.common.vec_env import VecEnv, VecNormalize

    import sb3_trpo.collection as collection
    from sb3_trpo import TRPO
    from sb3_trpo.cli.presets import model_kwargs, preset_for
    from sb3_trpo.normalization import LeanNormalizer

    th.set_num_threads(1)

    class Stored(VecEnv):
        """Hopper-sized observations and rewards read from stored arrays: the normalizer's own cost stands out."""

        def __init__(self, n_envs: int, dim: int) -> None:
            super().__init__(n_envs, spaces.Box(-np.inf, np.inf, (dim,), np.float64), spaces.Box(-1, 1, (3,), np.float32))
            rng = np.random.default_rng(0)
            self.obs, self.rewards = rng.normal(size=(1000, n_envs, dim)), rng.normal(size=(1000, n_envs)).astype(np.float32)
            self.dones, self.infos, self.t = np.zeros(n_envs, bool), [{} for _ in range(n_envs)], 0

        def reset(self) -> np.ndarray:
            return self.obs[0].copy()

        def step_async(self, actions: np.ndarray) -> None:
            self.t = (self.t + 1) % 1000

        def step_wait(self) -> Any:
            return self.obs[self.t], self.rewards[self.t], self.dones, self.infos

        def close(self) -> None:
            pass

        def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
            return [None] * self.num_envs

        def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
            pass

        def env_method(self, method_name: str, *args: Any, indices: Any = None, **kwargs: Any) -> list[Any]:
            return []

        def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
            return [False] * self.num_envs

    def best_us_per_call(step: Any, actions: np.ndarray, calls: int = 20_000) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                step(actions)
            best = min(best, 1e6 * (time.perf_counter() - start) / calls)
        return best

    record: dict[str, Any] = {"normalizer_task": env_id}
    for n_envs in (2, 16):
        actions = np.zeros((n_envs, 3), np.float32)
        base = best_us_per_call(Stored(n_envs, 11).step, actions)
        sb3, lean = VecNormalize(Stored(n_envs, 11)), VecNormalize(Stored(n_envs, 11))
        sb3.reset(), lean.reset()
        record[f"isolated_vec_normalize_us_per_sample_{n_envs}"] = (best_us_per_call(sb3.step, actions) - base) / n_envs
        lean_step = LeanNormalizer(lean).step
        record[f"isolated_lean_us_per_sample_{n_envs}"] = (best_us_per_call(lean_step, actions) - base) / n_envs

    # inside the loop: the preset's model on Hopper, rollouts alternating four ways of stepping the environments

    preset = preset_for(env_id)
    n_envs, hyperparams = backend_settings(env_id, "dummy")
    env = make_training_env(env_id, "dummy", 0, n_envs)
    model = TRPO(preset.policy, env, seed=0, **model_kwargs(hyperparams))
    model._setup_learn(10**7, None)
    callback = model._init_callback(None)
    lean_step_function = collection.lean_step
    arms: dict[str, tuple[Any, Any]] = {  # (the environment collected from, how the loop steps it)
        # SB3's VecNormalize over SB3's DummyVecEnv: what the loop did before
        "sb3": (env, lambda venv: venv.step),
        # the lean normalizer over SB3's DummyVecEnv step
        "lean_normalizer": (env, lambda venv: LeanNormalizer(venv, venv.venv.step).step),
        # both lean: what the loop does now
        "lean": (env, lean_step_function),
        # no normalization at all, SB3's DummyVecEnv step: the baseline of the first two
        "no_normalizer": (env.venv, lambda venv: venv.step),
        # no normalization, the lean DummyVecEnv step: the baseline of "lean"
        "lean_no_normalizer": (env.venv, lean_step_function),
    }
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(rollouts):
        for arm, (venv, stepper) in arms.items():
            collection.lean_step = stepper  # type: ignore[assignment]
            start = time.perf_counter()
            model.collect_rollouts(venv, callback, model.rollout_buffer, model.n_steps)
            seconds[arm].append(time.perf_counter() - start)
    collection.lean_step = lean_step_function
    samples = n_envs * model.n_steps
    for arm, values in seconds.items():
        record[f"loop_us_per_sample_{arm}"] = 1e6 * statistics.median(values) / samples
    record["loop_rollouts_each"] = rollouts
    return {**record, **_versions()}


def _load() -> list[dict[str, Any]]:
    return json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else []


def _save(record: dict[str, Any], match: dict[str, Any]) -> None:
    records = [r for r in _load() if any(r.get(k) != v for k, v in match.items())]
    OUT_JSON.write_text(json.dumps([*records, record], indent=1))


def _have(match: dict[str, Any]) -> bool:
    return any(all(r.get(k) == v for k, v in match.items()) for r in _load())


def run(command: str, tasks: list[str], seeds: list[int], timesteps: int, backends: list[str]) -> None:
    """Each measurement in a fresh process importing a snapshot of HEAD's package, one at a time; done ones skipped."""
    with tempfile.TemporaryDirectory(prefix="fast_envs_code_") as folder:
        commit = _snapshot(Path(folder))
        jobs: list[tuple[list[str], dict[str, Any]]] = []
        if command == "learn":
            for seed in seeds:
                for task in tasks:
                    order = backends if seed % 2 == 0 else backends[::-1]
                    for backend in order:
                        arguments = ["learn-worker", task, backend, str(seed), str(timesteps)]
                        n_envs = backend_settings(task, backend)[0]
                        jobs.append((arguments, {"task": task, "backend": backend, "seed": seed, "n_envs": n_envs}))
        elif command == "rates":
            jobs = [(["rates-worker", task], {"rates_task": task}) for task in tasks]
        else:
            jobs = [(["normalizer-worker"], {"normalizer_task": "Hopper-v5"})]
        for arguments, match in jobs:
            if _have(match):
                continue
            load_before, started = _load_average(), time.time()
            record = _in_fresh_process(arguments, Path(folder), script=__file__)
            record.update(load_before=load_before, load_after=_load_average(), commit=commit, process_s=time.time() - started)
            _save(record, match)
            print(" ".join(arguments), {k: record[k] for k in record if k.endswith(("_s", "return_mean"))}, flush=True)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cost_model(records: list[dict[str, Any]]) -> list[str]:
    """A model of ``learn()`` on more cores, from the measured parts (not a measurement).

    EnvPool's step of ``n`` environments on ``t`` threads costs ``o + n * p / t``: a fixed hand-over ``o`` and each
    environment's ``p``, fitted to the one-thread rates (random actions). The rest of a collected sample (the
    forward pass at that batch, the normalizer, the buffer, the loop) runs on the main thread: ``s``, the EnvPool
    runs' collection time per sample minus the env's share at their ``n`` and threads. ``train()`` runs on one
    thread: ``u`` per sample. Per sample on ``c`` cores with ``n`` environments: ``o / n + p / c + s + u``; with
    ``k`` data-parallel processes (``c / k`` threads each, ``n`` environments each) every process collects and
    updates a ``1 / k`` share, the update's all-reduces taken as free: ``(o / n + p * k / c + s + u) / k``.
    """
    lines: list[str] = []
    rows = []
    for task in TASKS:
        rates = next((r for r in records if r.get("rates_task") == task), None)
        runs = [
            r
            for r in records
            if r.get("task") == task and r.get("backend") == "envpool" and r.get("n_envs") == ENVPOOL_ENVS[task]
        ]
        dummy = [r for r in records if r.get("task") == task and r.get("backend") == "dummy"]
        if rates is None or not runs or not dummy:
            continue
        n_values = np.array(RATE_ENVS, dtype=float)
        per_call = np.array([1e6 * n / rates[f"envpool_{n}_1"] for n in RATE_ENVS])
        per_env, overhead = np.polyfit(n_values, per_call, 1)
        n_run, threads_run = runs[0]["n_envs"], runs[0]["envpool_threads"]
        env_share = 1e6 / rates[f"envpool_{n_run}_{threads_run}"]
        serial = max(_median([r["collect_us_per_sample"] for r in runs]) - env_share, 0.0)
        update = _median([1e6 * r["train_s"] / r["timesteps"] for r in runs])
        dummy_learn = _median([r["learn_s"] for r in dummy])
        rows.append((task, overhead, per_env, serial, update, dummy_learn))
    if not rows:
        return lines
    lines += [
        "## A model of more cores (from the parts above; not a measurement)",
        "",
        "Parts, microseconds per sample: `o` EnvPool's fixed cost per step call, `p` one environment's step on one "
        "thread (random actions; `o` and `p` fitted to the one-thread rates at 2 to 64 environments), `s` the main "
        "thread's share of a collected sample in the EnvPool runs (forward pass at their batch, normalizer, buffer, "
        "loop), `u` the update's share. Per sample on `c` cores, `n` environments: "
        "`o / n + p / c + s + u`; `k` data-parallel processes of `c / k` threads each: `(o / n + p k / c + s + u) / k`, "
        "the all-reduces taken as free. The `learn()` of 1M steps it predicts:",
        "",
        "| task | o | p | s | u | DummyVecEnv 2 envs (measured) | "
        + " | ".join(f"{c} cores, 1 process, n={8 * c}" for c in MODEL_CORES)
        + " | "
        + " | ".join(f"{c} cores, {c // 8} processes" for c in MODEL_CORES if c >= 16)
        + " |",
        "|---" * (6 + len(MODEL_CORES) + sum(1 for c in MODEL_CORES if c >= 16)) + "|",
    ]
    for task, o, p, s, u, dummy_learn in rows:
        single = [TIMESTEPS * (o / (8 * c) + p / c + s + u) / 1e6 for c in MODEL_CORES]
        parallel = [TIMESTEPS * (o / 64 + p * (c // 8) / c + s + u) / (c // 8) / 1e6 for c in MODEL_CORES if c >= 16]
        lines.append(
            f"| {task} | {o:.0f} | {p:.0f} | {s:.0f} | {u:.0f} | {dummy_learn:.0f} s | "
            + " | ".join(f"{t:.0f} s ({dummy_learn / t:.1f}x)" for t in single)
            + " | "
            + " | ".join(f"{t:.0f} s ({dummy_learn / t:.1f}x)" for t in parallel)
            + " |"
        )
    lines += [
        "",
        "One process stops gaining once `p / c` is small next to `s + u`: the main thread's collection work and the "
        "update set the floor (`(s + u)` per sample). Data-parallel processes split that floor too.",
        "",
    ]
    return lines


def report() -> str:
    records = _load()
    lines = ["# EnvPool and the lean normalizer", "", "Generated by `python benchmarks/fast_envs.py report`.", ""]
    learn = [r for r in records if "backend" in r]
    if learn:
        lines += [
            f"## learn(), {TIMESTEPS:,} steps: EnvPool ({ENVPOOL_THREADS} threads) against DummyVecEnv (the preset's 2 envs)",
            "",
            "| task | EnvPool envs x steps | seeds timed | learn() s, DummyVecEnv / EnvPool | speed-up | "
            "collection us/sample | train() s | final return, DummyVecEnv (every seed run) | "
            "final return, EnvPool (every seed run) | the env alone (random actions, DummyVecEnv): 1M steps in |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for task in TASKS:
            n_envs = {"dummy": backend_settings(task, "dummy")[0], "envpool": ENVPOOL_ENVS[task]}
            by = {
                b: [r for r in learn if r["task"] == task and r["backend"] == b and r["n_envs"] == n_envs[b]] for b in BACKENDS
            }
            if not all(by.values()):
                continue
            seeds = sorted({r["seed"] for r in by["dummy"]} & {r["seed"] for r in by["envpool"]})
            pick = {b: [r for r in by[b] if r["seed"] in seeds] for b in BACKENDS}
            learn_s = {b: _median([r["learn_s"] for r in pick[b]]) for b in BACKENDS}
            collect = {b: _median([r["collect_us_per_sample"] for r in pick[b]]) for b in BACKENDS}
            train = {b: _median([r["train_s"] for r in pick[b]]) for b in BACKENDS}

            def returns(b: str, by: dict[str, list[dict[str, Any]]] = by) -> str:  # every seed run, paired or not
                values = [r["final_return_mean"] for r in sorted(by[b], key=lambda r: r["seed"])]
                return f"{np.mean(values):.0f} ± {np.std(values):.0f} ({', '.join(f'{v:.0f}' for v in values)})"

            rates = next((r for r in records if r.get("rates_task") == task), None)
            alone = f"{TIMESTEPS / rates['dummy_2']:.0f} s" if rates else "n/a"
            lines.append(
                f"| {task} | {n_envs['envpool']} x {pick['envpool'][0]['n_steps']} | {', '.join(map(str, seeds))} | "
                f"{learn_s['dummy']:.0f} / {learn_s['envpool']:.0f} | "
                f"**{learn_s['dummy'] / learn_s['envpool']:.2f}x** | {collect['dummy']:.0f} / {collect['envpool']:.0f} | "
                f"{train['dummy']:.0f} / {train['envpool']:.0f} | {returns('dummy')} | {returns('envpool')} | {alone} |"
            )
        lines.append("")
    rate_records = [r for r in records if "rates_task" in r]
    if rate_records:
        lines += ["## Stepping the environments alone (random actions), samples/s", ""]
        header = "| task | DummyVecEnv, 2 envs | " + " | ".join(f"EnvPool {n} envs, 1 / 2 threads" for n in RATE_ENVS) + " |"
        lines += [header, "|---" * (2 + len(RATE_ENVS)) + "|"]
        for r in rate_records:
            cells = [f"{r[f'envpool_{n}_1']:.0f} / {r[f'envpool_{n}_2']:.0f}" for n in RATE_ENVS]
            lines.append(f"| {r['rates_task']} | {r['dummy_2']:.0f} | " + " | ".join(cells) + " |")
        lines += ["", "The preset policy's forward pass (lean), microseconds per sample at a batch of n environments:", ""]
        lines += ["| task | " + " | ".join(f"n={n}" for n in RATE_ENVS) + " |", "|---" * (1 + len(RATE_ENVS)) + "|"]
        for r in rate_records:
            cells = [f"{r[f'forward_us_per_sample_{n}']:.1f}" for n in RATE_ENVS]
            lines.append(f"| {r['rates_task']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += cost_model(records)
    norm = next((r for r in records if "normalizer_task" in r), None)
    if norm:
        lines += [
            "## The lean normalizer, microseconds per sample",
            "",
            "| measured | SB3's VecNormalize | lean normalizer |",
            "|---|---|---|",
            *(
                f"| isolated, {n} envs (11-D observations) | {norm[f'isolated_vec_normalize_us_per_sample_{n}']:.1f} | "
                f"{norm[f'isolated_lean_us_per_sample_{n}']:.1f} |"
                for n in (2, 16)
            ),
            "",
            "Inside the lean collection loop on Hopper-v5 (the preset, 2 envs, rollouts alternating), microseconds per "
            "collected sample:",
            "",
            "| how the loop steps the environments | per sample | the normalizer's share (against the same step without) |",
            "|---|---|---|",
            *(
                f"| {label} | {norm[f'loop_us_per_sample_{arm}']:.1f} | "
                + (f"{norm[f'loop_us_per_sample_{arm}'] - norm[f'loop_us_per_sample_{base}']:.1f} |" if base else "|")
                for arm, base, label in (
                    ("no_normalizer", None, "no VecNormalize, SB3's DummyVecEnv step"),
                    ("sb3", "no_normalizer", "SB3's VecNormalize and DummyVecEnv steps (before)"),
                    ("lean_normalizer", "no_normalizer", "the lean normalizer, SB3's DummyVecEnv step"),
                    ("lean_no_normalizer", None, "no VecNormalize, the lean DummyVecEnv step"),
                    ("lean", "lean_no_normalizer", "the lean normalizer and DummyVecEnv step (the loop now)"),
                )
            ),
            "",
        ]
    text = "\n".join(lines)
    OUT_MD.write_text(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("learn", "rates", "normalizer"):
        command = sub.add_parser(name)
        command.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
        command.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
        command.add_argument("--timesteps", type=int, default=TIMESTEPS)
        command.add_argument("--backends", nargs="+", default=list(BACKENDS), help="learn: dummy, envpool, dummy:N, envpool:N")
    sub.add_parser("report")
    worker = sub.add_parser("learn-worker")
    worker.add_argument("task")
    worker.add_argument("backend", help="dummy, envpool, dummy:N or envpool:N")
    worker.add_argument("seed", type=int)
    worker.add_argument("timesteps", type=int)
    sub.add_parser("rates-worker").add_argument("task")
    sub.add_parser("normalizer-worker")
    args = parser.parse_args()
    if args.command == "learn-worker":
        print(json.dumps(learn_one(args.task, args.backend, args.seed, args.timesteps)), flush=True)
    elif args.command == "rates-worker":
        print(json.dumps(rates_one(args.task)), flush=True)
    elif args.command == "normalizer-worker":
        print(json.dumps(normalizer_one()), flush=True)
    elif args.command == "report":
        print(report())
    else:
        run(args.command, args.tasks, args.seeds, args.timesteps, args.backends)
        print(report())


if __name__ == "__main__":
    main()
