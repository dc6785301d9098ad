"""Does SB3's ``SubprocVecEnv`` make ``TRPO.learn()`` faster than ``DummyVecEnv``? 2 environments, 2 cores.

Each case trains ``sb3_trpo.TRPO`` with the command-line preset of its environment (policy, hyperparameters,
``VecNormalize(env, gamma=...)`` when the preset normalizes), on
``make_vec_env(env_id, n_envs=2, seed=seed, vec_env_cls=DummyVecEnv or SubprocVecEnv)``, for a fixed budget.
Every ``learn()`` runs alone in its own fresh process with 1 torch thread; only ``learn()`` is timed (wall clock),
split into rollout collection (``collect_rollouts``) and updates (``train``). The two VecEnv classes alternate
(repeat r runs both with seed r, the first of the pair alternating between repeats), one process at a time, so
background load falls on both alike; ``os.getloadavg()`` is recorded before each run.

A per-step profile (3 fresh processes per case, after the runs) measures a single raw environment's ``step``
under random actions (``gymnasium.make`` + SB3's ``Monitor``, as ``make_vec_env`` builds each one), the
``DummyVecEnv`` step and the ``SubprocVecEnv`` ``step_async``/``step_wait`` round trip of 2 environments; with the
collection time per sample of the DummyVecEnv runs it gives a simple model of collection with k worker processes.

The workers import ``sb3_trpo`` from a snapshot of HEAD's package (``git archive``, taken once when ``run``
starts), so edits in the work tree during the runs do not change the measured code; ``--working-tree`` imports
the work tree's instead. ``SubprocVecEnv`` also steps environments that do no physics, for the pipes' own cost.

Results go to ``benchmarks/results/vec_env.json``, one entry per (case, vec_env, repeat) and per (case, profile
repeat), each with commit and versions; an entry already there is skipped, so an interrupted benchmark resumes. ``report``
writes ``benchmarks/results/vec_env.md``.

    python benchmarks/vec_env.py run                  # both cases, repeats 0-4, then the profile
    python benchmarks/vec_env.py run --cases CartPole-v1 --repeats 3
    python benchmarks/vec_env.py report               # -> benchmarks/results/vec_env.md

(``worker`` and ``profile-worker`` are the subcommands each fresh process runs; they print one JSON line.)
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Section

RESULTS = Path(__file__).resolve().parent / "results"
OUT_JSON = RESULTS / "vec_env.json"
OUT_MD = RESULTS / "vec_env.md"
N_ENVS = 2
#: training budget (timesteps) of each case
CASES: dict[str, int] = {"Hopper-v5": 50_000, "CartPole-v1": 50_000}
VEC_ENVS = ("dummy", "subproc")
#: worker processes the model predicts for
MODEL_CORES = (2, 4, 8, 16)
#: steps of the profile: raw env steps, and VecEnv step calls (after a warm-up)
PROFILE_ENV_STEPS = 20_000
PROFILE_VEC_CALLS = 5_000
PROFILE_WARMUP_CALLS = 200
#: profile processes per case (their medians feed the model: the round trips move with the machine's load)
PROFILE_REPEATS = 3


def _versions() -> dict[str, str]:
    import gymnasium
    import stable_baselines3
    import torch

    import sb3_trpo

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    versions = {
        "commit": commit.stdout.strip(),
        "sb3_trpo": sb3_trpo.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "torch": torch.__version__,
        "gymnasium": gymnasium.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    try:
        import mujoco

        versions["mujoco"] = mujoco.__version__
    except ImportError:
        pass
    return versions


def _vec_env_cls(vec_env: str) -> type:
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    return {"dummy": DummyVecEnv, "subproc": SubprocVecEnv}[vec_env]


def make_env(env_id: str, vec_env: str, seed: int) -> Any:
    """The preset's training environment (2 of them), vectorized by ``vec_env`` ("dummy" or "subproc")."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    from sb3_trpo.cli.presets import preset_for

    preset = preset_for(env_id)
    env = make_vec_env(
        env_id, n_envs=N_ENVS, seed=seed, vec_env_cls=_vec_env_cls(vec_env), env_kwargs=preset.env_kwargs or None
    )
    return VecNormalize(env, gamma=preset.hyperparams.get("gamma", 0.99)) if preset.normalize else env


def run_one(env_id: str, vec_env: str, repeat: int) -> dict[str, Any]:
    """Train one (case, vec_env, repeat) with seed ``repeat`` in this process and time ``learn()`` and its parts."""
    import torch as th

    from sb3_trpo import TRPO
    from sb3_trpo.cli.presets import model_kwargs, preset_for

    th.set_num_threads(1)
    preset = preset_for(env_id)
    seed = repeat
    env = make_env(env_id, vec_env, seed)
    model = TRPO(preset.policy, env, seed=seed, **model_kwargs(preset.hyperparams))
    sections = Section()
    with sections.patched(model, "collect_rollouts", "collect"), sections.patched(model, "train", "train"):
        start = time.perf_counter()
        model.learn(CASES[env_id])
        wall = time.perf_counter() - start
    env.close()
    returns = [e["r"] for e in model.ep_info_buffer]
    return {
        "case": env_id,
        "vec_env": vec_env,
        "repeat": repeat,
        "seed": seed,
        "n_envs": N_ENVS,
        "normalize": preset.normalize,
        "timesteps": model.num_timesteps,
        "learn_s": wall,
        "collect_s": sections.seconds["collect"],
        "train_s": sections.seconds["train"],
        "collect_calls": sections.calls["collect"],
        "train_calls": sections.calls["train"],
        "collect_us_per_sample": 1e6 * sections.seconds["collect"] / model.num_timesteps,
        "final_return": float(np.mean(returns)) if returns else float("nan"),
        "threads": th.get_num_threads(),
        "sb3_trpo_file": sys.modules["sb3_trpo"].__file__,
        **_versions(),
    }


class NoPhysics(gymnasium.Env):
    """The spaces of another environment, and a step that does nothing (a constant observation, never done): in a
    SubprocVecEnv its round trip is the pipes, the pickling and the workers' wake-ups alone."""

    def __init__(self, env_id: str, env_kwargs: dict[str, Any]) -> None:
        template = gymnasium.make(env_id, **env_kwargs)
        self.observation_space, self.action_space = template.observation_space, template.action_space
        template.close()
        self.observation = self.observation_space.sample()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        return self.observation, {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        return self.observation, 0.0, False, False, {}


def _mean_step_us(step: Any, actions: list[Any]) -> float:
    start = time.perf_counter()
    for action in actions:
        step(action)
    return 1e6 * (time.perf_counter() - start) / len(actions)


def profile_one(env_id: str, repeat: int) -> dict[str, Any]:
    """Microseconds of a raw environment's step, of a DummyVecEnv step and of a SubprocVecEnv round trip (2 envs)."""
    import torch as th
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.monitor import Monitor

    from sb3_trpo.cli.presets import preset_for

    th.set_num_threads(1)
    env_kwargs = preset_for(env_id).env_kwargs
    # one environment as make_vec_env builds it (gymnasium.make, then Monitor), stepped with random actions and reset
    # at the end of each episode (the reset's time counts: a VecEnv worker resets in its step too)
    raw = Monitor(gymnasium.make(env_id, **env_kwargs))
    raw.reset(seed=0)
    raw.action_space.seed(0)
    actions = [raw.action_space.sample() for _ in range(PROFILE_ENV_STEPS)]
    episodes = 0
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, _ = raw.step(action)
        if terminated or truncated:
            raw.reset()
            episodes += 1
    env_step_us = 1e6 * (time.perf_counter() - start) / len(actions)
    raw.close()

    per_call: dict[str, float] = {}
    kwargs = env_kwargs or None
    makers = {  # what each VecEnv steps
        "dummy": lambda: make_vec_env(env_id, n_envs=N_ENVS, seed=0, vec_env_cls=_vec_env_cls("dummy"), env_kwargs=kwargs),
        "subproc": lambda: make_vec_env(env_id, n_envs=N_ENVS, seed=0, vec_env_cls=_vec_env_cls("subproc"), env_kwargs=kwargs),
        "subproc_no_physics": lambda: make_vec_env(
            NoPhysics,
            n_envs=N_ENVS,
            seed=0,
            vec_env_cls=_vec_env_cls("subproc"),
            env_kwargs=dict(env_id=env_id, env_kwargs=env_kwargs),
        ),
    }
    for name, make in makers.items():
        venv = make()
        venv.reset()
        venv.action_space.seed(0)
        batches = [np.stack([venv.action_space.sample() for _ in range(N_ENVS)]) for _ in range(PROFILE_VEC_CALLS)]
        _mean_step_us(venv.step, batches[:PROFILE_WARMUP_CALLS])  # the workers' first calls, the pipes' buffers
        per_call[name] = _mean_step_us(venv.step, batches)
        venv.close()
    return {
        "profile_case": env_id,
        "profile_repeat": repeat,
        "env_step_us": env_step_us,
        "env_steps": len(actions),
        "episodes": episodes,
        "dummy_step_us_per_call": per_call["dummy"],
        "subproc_round_trip_us_per_call": per_call["subproc"],
        # the workers step in parallel: a round trip is one env step (the slower worker's) plus the overhead
        "ipc_us_per_call": per_call["subproc"] - env_step_us,
        # the pipes, pickling and wake-ups alone: the same spaces, no physics
        "no_physics_round_trip_us_per_call": per_call["subproc_no_physics"],
        "vec_calls": PROFILE_VEC_CALLS,
        "threads": th.get_num_threads(),
        "sb3_trpo_file": sys.modules["sb3_trpo"].__file__,
        **_versions(),
    }


def _load() -> list[dict[str, Any]]:
    return json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else []


def _save(record: dict[str, Any], key: tuple[str, ...], fields: tuple[str, ...]) -> None:
    records = [r for r in _load() if tuple(r.get(f) for f in fields) != key]
    OUT_JSON.write_text(json.dumps([*records, record], indent=1))


def _in_fresh_process(arguments: list[str], code: Path | None, script: str = __file__) -> dict[str, Any]:
    """Run ``script``'s ``arguments`` (this script's by default) in a new Python process and return the JSON of its
    last output line.

    :param code: a folder holding the ``sb3_trpo`` package to import (ahead of the editable install), or ``None``
    """
    environment = dict(os.environ)
    if code is not None:
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), environment.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(Path(script).resolve()), *arguments],
        capture_output=True,
        text=True,
        timeout=3600,
        env=environment,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _snapshot(folder: Path) -> str:
    """Extract HEAD's ``sb3_trpo`` package into ``folder`` (``git archive``, the work tree untouched).

    :return: HEAD's short commit
    """
    root = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root, check=True)
    archive = subprocess.run(["git", "archive", commit.stdout.strip(), "sb3_trpo"], capture_output=True, cwd=root, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return commit.stdout.strip()


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(cases: list[str], repeats: int, working_tree: bool) -> None:
    """The interleaved runs (one at a time), then each case's profile; entries already in the JSON are skipped.

    :param working_tree: import ``sb3_trpo`` from the work tree as it is (and may change during the runs) instead
        of from a snapshot of HEAD's package taken once at the start
    """
    with tempfile.TemporaryDirectory(prefix="vec_env_code_") as folder:
        code = None if working_tree else Path(folder)
        commit = _snapshot(code) if code is not None else None
        source = "work tree" if code is None else f"git archive of HEAD ({commit})"

        def measured(arguments: list[str], key: tuple[Any, ...], fields: tuple[str, ...]) -> dict[str, Any]:
            load_before = _load_average()
            started = time.time()
            record = _in_fresh_process(arguments, code)
            record.update(load_before=load_before, load_after=_load_average(), started=started, code=source)
            record["process_s"] = time.time() - started
            if commit is not None:
                record["commit"] = commit
            _save(record, key, fields)
            return record

        for repeat in range(repeats):
            for env_id in cases:
                order = VEC_ENVS if repeat % 2 == 0 else VEC_ENVS[::-1]
                for vec_env in order:
                    key = (env_id, vec_env, repeat)
                    if any((r.get("case"), r.get("vec_env"), r.get("repeat")) == key for r in _load()):
                        continue
                    r = measured(["worker", env_id, vec_env, str(repeat)], key, ("case", "vec_env", "repeat"))
                    print(
                        f"{env_id} {vec_env} repeat {repeat}: learn {r['learn_s']:.1f} s (collect {r['collect_s']:.1f}, "
                        f"train {r['train_s']:.1f}), return {r['final_return']:.1f}, load before {r['load_before']}",
                        flush=True,
                    )
        for repeat in range(PROFILE_REPEATS):
            for env_id in cases:
                key = (env_id, repeat)
                if any((r.get("profile_case"), r.get("profile_repeat")) == key for r in _load()):
                    continue
                r = measured(["profile-worker", env_id, str(repeat)], key, ("profile_case", "profile_repeat"))
                print(
                    f"{env_id} profile {repeat}: env step {r['env_step_us']:.1f} us, dummy step "
                    f"{r['dummy_step_us_per_call']:.1f} us/call, subproc round trip {r['subproc_round_trip_us_per_call']:.1f} "
                    f"us/call, no-physics round trip {r['no_physics_round_trip_us_per_call']:.1f} us/call, load before "
                    f"{r['load_before']}",
                    flush=True,
                )


def _stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _cell(values: list[float], digits: int = 1) -> str:
    median, low, high = _stats(values)
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def model_prediction(
    env_us: float, policy_us: float, ipc_us: float, update_s: float, dummy_collect_us: float, samples: int, k: int
) -> dict[str, float]:
    """Collection per sample with k worker processes, one environment each (n_envs = k, same samples in total).

    SB3's loop is synchronous: the main process sends the actions and waits, the k workers step in parallel, then
    the main process runs the policy on the batch. So a VecEnv step costs one env step + the forward pass + the
    pipe round trips, and per sample: ``env_us / k + policy_us + ipc_us``, with ``ipc_us`` the round trip overhead
    per environment (measured per call of 2 environments, halved) and ``policy_us`` the policy and the rest of the
    loop per sample (measured at 2 environments). Both are taken as fixed per sample ("conservative": the policy's
    cost per sample falls with a larger batch); the "optimistic" variant takes the policy's cost per call as fixed
    instead (``policy_us * 2 / k`` per sample). The update's seconds are taken as measured.
    """
    conservative = env_us / k + policy_us + ipc_us
    optimistic = env_us / k + policy_us * N_ENVS / k + ipc_us
    dummy_learn_s = dummy_collect_us * samples / 1e6 + update_s
    return {
        "k": k,
        "collect_us": conservative,
        "collect_us_optimistic": optimistic,
        "collect_speedup": dummy_collect_us / conservative,
        "collect_speedup_optimistic": dummy_collect_us / optimistic,
        "learn_speedup": dummy_learn_s / (conservative * samples / 1e6 + update_s),
        "learn_speedup_optimistic": dummy_learn_s / (optimistic * samples / 1e6 + update_s),
    }


def report() -> str:
    records = _load()
    runs = [r for r in records if "case" in r]
    profiles: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if "profile_case" in r:
            profiles.setdefault(r["profile_case"], []).append(r)
    versions = next((r for r in runs), {})
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line), "?"
    )
    lines = [
        "# SubprocVecEnv vs DummyVecEnv for `TRPO.learn()`: 2 environments on a 2-core machine",
        "",
        f"Commit(s): `learn()` runs {', '.join(sorted({r['commit'] for r in runs}))}, profiles "
        f"{', '.join(sorted({r['commit'] for r in records if 'profile_case' in r}))}, each `sb3_trpo` imported from "
        f"{' / '.join(sorted({str(r.get('code')) for r in records}))} (`git rev-parse --short HEAD` when this report was "
        "written: "
        f"{head.stdout.strip()}). Versions: "
        + ", ".join(
            f"{k} {versions.get(k)}"
            for k in ("sb3_trpo", "stable_baselines3", "torch", "gymnasium", "mujoco", "numpy", "python")
        )
        + f". Machine: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}.",
        "",
        "Setup: the command-line preset of each environment (`preset_for(env_id)`: policy, hyperparameters, "
        "`VecNormalize(env, gamma=...)` when it normalizes), on `make_vec_env(env_id, n_envs=2, seed=seed, "
        "vec_env_cls=DummyVecEnv | SubprocVecEnv)` (SubprocVecEnv with SB3's default start method, forkserver on "
        "Linux); model `TRPO(preset.policy, env, seed=seed, **model_kwargs(preset.hyperparams))`. Each `learn()` "
        "runs alone in a fresh process with `torch.set_num_threads(1)`; only `learn()` is timed (wall clock), "
        "split into `collect_rollouts` and `train` by wrapping those methods. Repeat r trains both VecEnvs with seed "
        "r; runs alternate between the two (the first of a pair alternating between repeats), one process at a time.",
        "",
    ]
    conclusions: list[str] = []
    notes: list[str] = []
    for env_id, budget in CASES.items():
        mine = [r for r in runs if r["case"] == env_id]
        by_vec = {v: sorted((r for r in mine if r["vec_env"] == v), key=lambda r: r["repeat"]) for v in VEC_ENVS}
        if not all(by_vec.values()):
            continue
        first = by_vec["dummy"][0]
        lines += [
            f"## {env_id}: {budget:,} steps requested ({first['timesteps']:,} done), 2 envs, normalize={first['normalize']}",
            "",
            "Median (min-max) over repeats; ratio = dummy / subproc of the medians (> 1: SubprocVecEnv is faster).",
            "",
            "| VecEnv | repeats | `learn()` s | collection s | update s | collection us/sample | final return |",
            "|---|---|---|---|---|---|---|",
        ]
        medians: dict[str, dict[str, float]] = {}
        for vec_env, group in by_vec.items():
            column = {key: [r[key] for r in group] for key in ("learn_s", "collect_s", "train_s", "collect_us_per_sample")}
            medians[vec_env] = {key: statistics.median(values) for key, values in column.items()}
            returns = ", ".join(f"{r['final_return']:.1f}" for r in group)
            lines.append(
                f"| {vec_env} | {len(group)} | {_cell(column['learn_s'], 2)} | {_cell(column['collect_s'], 2)} "
                f"| {_cell(column['train_s'], 2)} | {_cell(column['collect_us_per_sample'], 0)} | {returns} |"
            )
        ratio = {key: medians["dummy"][key] / medians["subproc"][key] for key in medians["dummy"]}
        lines += [
            f"| **ratio dummy/subproc** | | **{ratio['learn_s']:.2f}** | {ratio['collect_s']:.2f} | {ratio['train_s']:.2f} "
            f"| {ratio['collect_us_per_sample']:.2f} | |",
            "",
            "Each run, in the order they ran (load averages 1/5/15 min from `os.getloadavg()` just before it):",
            "",
            "| repeat | VecEnv | seed | load before | `learn()` s | collection s | update s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted(mine, key=lambda r: r["started"]):
            lines.append(
                f"| {r['repeat']} | {r['vec_env']} | {r['seed']} | {' / '.join(f'{x:.2f}' for x in r['load_before'])} "
                f"| {r['learn_s']:.2f} | {r['collect_s']:.2f} | {r['train_s']:.2f} |"
            )
        lines.append("")
        speed, saved = ratio["learn_s"], 100 * (1 - 1 / ratio["learn_s"])
        if speed >= 1:
            verdict = f"SubprocVecEnv is faster: `learn()` runs {speed:.2f}x as fast ({saved:.0f}% less time)"
        else:
            verdict = f"DummyVecEnv is faster: SubprocVecEnv's `learn()` takes {1 / speed:.2f}x as long ({-saved:.0f}% more)"
        conclusions.append(
            f"- **{env_id}**: {verdict} (medians {medians['dummy']['learn_s']:.1f} s dummy vs "
            f"{medians['subproc']['learn_s']:.1f} s subproc, {len(by_vec['dummy'])} repeats each)."
        )

        profile_runs = profiles.get(env_id)
        if not profile_runs:
            continue

        def prof(key: str, runs: list[dict[str, Any]] = profile_runs) -> float:
            return statistics.median(r[key] for r in runs)

        def prof_cell(key: str, runs: list[dict[str, Any]] = profile_runs) -> str:
            return _cell([r[key] for r in runs])

        dummy_collect_us = medians["dummy"]["collect_us_per_sample"]
        subproc_collect_us = medians["subproc"]["collect_us_per_sample"]
        env_us = prof("env_step_us")
        policy_us = dummy_collect_us - env_us
        # IPC per sample: in the SubprocVecEnv runs themselves (their collection per sample - env step / 2 - policy,
        # under the runs' own load), and of the pipes alone (the no-physics round trip)
        ipc = {
            "in-situ": subproc_collect_us - env_us / N_ENVS - policy_us,
            "pipes only": prof("no_physics_round_trip_us_per_call") / N_ENVS,
        }
        loads = "; ".join(" / ".join(f"{x:.2f}" for x in r["load_before"]) for r in profile_runs)
        first_profile = profile_runs[0]
        lines += [
            f"### {env_id}: per-step profile",
            "",
            f"Median (min-max) of {len(profile_runs)} fresh processes, 1 thread, random actions; load averages before "
            f"them: {loads}.",
            "",
            "| quantity | us | how |",
            "|---|---|---|",
            f"| raw env step | {prof_cell('env_step_us')} | one `Monitor(gymnasium.make(...))` env, "
            f"{first_profile['env_steps']:,} random steps with their resets ({first_profile['episodes']} episodes) |",
            f"| DummyVecEnv step, 2 envs (per call) | {prof_cell('dummy_step_us_per_call')} "
            f"| {first_profile['vec_calls']:,} calls of `step` |",
            f"| SubprocVecEnv round trip, 2 envs (per call) | {prof_cell('subproc_round_trip_us_per_call')} "
            "| `step_async` + `step_wait`, same calls |",
            f"| SubprocVecEnv round trip, 2 envs without physics (per call) "
            f"| {prof_cell('no_physics_round_trip_us_per_call')} | the same spaces, a step that does nothing: pipes, "
            "pickling and the workers' wake-ups alone |",
            f"| IPC overhead per call (pipe + pickle + wake-ups) | {prof_cell('ipc_us_per_call')} | round trip - raw "
            "env step (the 2 workers step in parallel) |",
            f"| collection per sample, DummyVecEnv `learn()` | {dummy_collect_us:.1f} | median collection s / samples |",
            f"| policy + rest of the loop per sample (derived) | {policy_us:.1f} | DummyVecEnv collection per sample - "
            "raw env step |",
            f"| collection per sample, SubprocVecEnv `learn()` | {subproc_collect_us:.1f} | median collection s / samples |",
            f"| IPC per sample, in-situ | {ipc['in-situ']:.1f} | SubprocVecEnv collection per sample - raw env step / 2 "
            "- policy: the overhead under the runs' own load |",
            f"| IPC per sample, pipes only | {ipc['pipes only']:.1f} | no-physics round trip / 2 |",
            "",
            "**Model (a prediction, not a measurement)** of collection with k worker processes, one env each "
            "(n_envs = k, the same samples in total, k + 1 processes on >= k idle cores): SB3's loop is synchronous "
            "(the workers step while the main process waits, the policy runs while the workers wait), so per sample "
            "`env_step / k + policy + IPC`. Two assumptions for the policy: its cost fixed per sample (*cons.*, "
            "conservative) or fixed per call (*opt.*, optimistic: `policy * 2 / k`, as for a small MLP's batched "
            "forward). Two for IPC per sample: the *in-situ* one of the SubprocVecEnv runs (it reproduces their "
            "k = 2 by construction, and holds the wake-up and scheduling cost of real steps on this shared 2-core "
            "VM), or the *pipes only* one (no physics: closer to a machine with idle cores). DummyVecEnv stays at "
            "`env_step + policy` per sample; `learn()` adds the update time as measured "
            f"({medians['dummy']['train_s']:.2f} s). The mean env step stands for the slowest of k workers, which "
            "flatters large k.",
            "",
            "| k | `learn()` speed-up, in-situ IPC: cons. / opt. | `learn()` speed-up, pipes-only IPC: cons. / opt. "
            "| collection speed-up, in-situ IPC: cons. / opt. | collection speed-up, pipes-only IPC: cons. / opt. |",
            "|---|---|---|---|---|",
        ]
        for k in MODEL_CORES:
            m = {
                name: model_prediction(
                    env_us, policy_us, ipc_us, medians["dummy"]["train_s"], dummy_collect_us, first["timesteps"], k
                )
                for name, ipc_us in ipc.items()
            }
            cells = [
                f"{m[name][key]:.2f}x / {m[name][key + '_optimistic']:.2f}x"
                for key in ("learn_speedup", "collect_speedup")
                for name in ipc
            ]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"With n_envs fixed at 2 more cores do nothing (there are only 2 workers). As k grows, collection per "
            f"sample tends to `policy + IPC` ({policy_us + ipc['in-situ']:.0f} us with the in-situ IPC, "
            f"{policy_us + ipc['pipes only']:.0f} us with the pipes-only one; conservative) or to `IPC` alone "
            f"({ipc['in-situ']:.0f} / {ipc['pipes only']:.0f} us; optimistic), against DummyVecEnv's "
            f"{dummy_collect_us:.0f} us.",
            "",
        ]
        same = [
            d["final_return"] == s["final_return"]
            for d in by_vec["dummy"]
            for s in by_vec["subproc"]
            if d["seed"] == s["seed"]
        ]
        notes.append(
            f"- {env_id}: the final returns of DummyVecEnv and SubprocVecEnv with the same seed are "
            + ("identical for every seed." if all(same) else f"different for {same.count(False)} of {len(same)} seeds.")
        )
    lines += [
        "## Conclusion",
        "",
        *conclusions,
        "",
        "## Notes",
        "",
        *notes,
        "- Same seed, different returns (where it happens, with VecNormalize): DummyVecEnv returns the rewards as "
        "float32 (its reward buffer), SubprocVecEnv as the environment's float64, so VecNormalize's return statistics "
        "and the normalized rewards differ in the last bits from the first steps on; observations, actions, values "
        "and log-probabilities of the first rollout are bit-identical. Unnormalized 1.0 rewards (CartPole) are exact "
        "in both.",
        "- The machine was shared: another engineer's tests ran at times (the load averages above). Both VecEnvs "
        "alternate, so the load falls on both, but SubprocVecEnv, which needs both cores at once for its workers and "
        "wakes three processes per step, likely suffers more from it.",
        "",
        "## Reproduce",
        "",
        "```",
        "cd /work/main && . .venv/bin/activate",
        "python benchmarks/vec_env.py run       # resumable: entries already in benchmarks/results/vec_env.json are skipped",
        "python benchmarks/vec_env.py report    # -> benchmarks/results/vec_env.md",
        "```",
        "",
        "Delete `benchmarks/results/vec_env.json` (or its entries) to measure again.",
    ]
    text = "\n".join(lines) + "\n"
    OUT_MD.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    run_parser.add_argument("--repeats", type=int, default=5, help="repeats per VecEnv (seeds 0..repeats-1)")
    run_parser.add_argument(
        "--working-tree", action="store_true", help="import sb3_trpo from the work tree, not from a snapshot of HEAD"
    )
    sub.add_parser("report")
    worker = sub.add_parser("worker")
    worker.add_argument("case", choices=list(CASES))
    worker.add_argument("vec_env", choices=VEC_ENVS)
    worker.add_argument("repeat", type=int)
    profile_worker = sub.add_parser("profile-worker")
    profile_worker.add_argument("case", choices=list(CASES))
    profile_worker.add_argument("repeat", type=int)
    args = parser.parse_args()
    if args.command == "worker":
        print(json.dumps(run_one(args.case, args.vec_env, args.repeat)), flush=True)
        return
    if args.command == "profile-worker":
        print(json.dumps(profile_one(args.case, args.repeat)), flush=True)
        return
    if args.command == "run":
        run(args.cases, args.repeats, args.working_tree)
    print(report())


if __name__ == "__main__":
    main()
