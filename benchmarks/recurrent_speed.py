"""Recurrent speed, side by side in one process with 1 torch thread: RecurrentTRPO against sb3-contrib's RecurrentPPO.

``collect``: the same model (RecurrentTRPO on the task's preset: policy, environments, VecNormalize) collects rollouts
alternately with ``RecurrentPPO.collect_rollouts`` (called on it, as RecurrentPPO would) and with RecurrentTRPO's
own ``collect_rollouts`` (the lean recurrent loop), ``--rollouts`` of each after a warm-up; both fill the same buffer
from the same running environments, so they see the same load. Reported: seconds per 1,000 samples and the ratio.

``learn``: RecurrentPPO on rl-zoo3's ``ppo_lstm.yml`` settings and RecurrentTRPO on its preset train on the task's
budget (the settings of ``partial_observability.py``), one after the other in this process, with no evaluation during
training; then each policy's deterministic return over 10 episodes. Reported: ``learn()`` wall times and their ratio.

Results go to ``benchmarks/results/recurrent_speed.json`` (one entry per measurement, with commit and versions);
``report`` writes ``benchmarks/results/recurrent_speed.md``.

    python benchmarks/recurrent_speed.py collect --tasks CartPoleNoVel-v1 PendulumNoVel-v1 --cells lstm gru
    python benchmarks/recurrent_speed.py learn --tasks CartPoleNoVel-v1 --seeds 0
    python benchmarks/recurrent_speed.py report
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from end_to_end import _versions
from partial_observability import LSTM_NET, TASKS, _schedule

RESULTS = Path(__file__).resolve().parent / "results"
OUT_JSON = RESULTS / "recurrent_speed.json"


def _load() -> list[dict[str, Any]]:
    return json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else []


def _save(entry: dict[str, Any]) -> None:
    entries = _load()
    entries.append(entry)
    OUT_JSON.write_text(json.dumps(entries, indent=1))


def _policy_kwargs(task: str, cell: str) -> dict[str, Any]:
    import torch as th

    settings = TASKS[task]
    kwargs: dict[str, Any] = dict(settings.get("policy", LSTM_NET))
    if settings["relu"]:
        kwargs["activation_fn"] = th.nn.ReLU
    if cell != "lstm":
        kwargs["recurrent_layer_type"] = cell
    return kwargs


def _env(task: str, seed: int, gamma: float) -> Any:
    import rl_zoo3.import_envs  # noqa: F401  # registers the NoVel tasks
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    return VecNormalize(make_vec_env(task, n_envs=TASKS[task]["n_envs"], seed=seed), gamma=gamma)


def measure_collection(task: str, cell: str, rollouts: int) -> dict[str, Any]:
    import torch as th
    from sb3_contrib import RecurrentPPO

    from sb3_trpo import RecurrentTRPO

    th.set_num_threads(1)
    trpo = TASKS[task]["trpo"]
    model = RecurrentTRPO(
        "MlpLstmPolicy", _env(task, 0, trpo.get("gamma", 0.99)), seed=0, policy_kwargs=_policy_kwargs(task, cell), **trpo
    )
    model.learn(5 * model.n_steps * model.n_envs)  # past the first updates: states and statistics are not fresh
    _, callback = model._setup_learn(10**9, reset_num_timesteps=False)
    env, buffer = model.env, model.rollout_buffer
    seconds = {"recurrent_ppo": 0.0, "recurrent_trpo": 0.0}
    for _ in range(rollouts):
        for name in seconds:
            start = time.perf_counter()
            if name == "recurrent_ppo":
                RecurrentPPO.collect_rollouts(model, env, callback, buffer, model.n_steps)  # type: ignore[arg-type]
            else:
                model.collect_rollouts(env, callback, buffer, model.n_steps)
            seconds[name] += time.perf_counter() - start
    assert model._collection_gap is None, model._collection_gap
    samples = rollouts * model.n_steps * model.n_envs
    return {
        "kind": "collect",
        "task": task,
        "cell": cell,
        "samples_each": samples,
        "ms_per_1000": {k: 1000 * v / samples * 1000 for k, v in seconds.items()},
        "ratio": seconds["recurrent_ppo"] / seconds["recurrent_trpo"],
        **_versions(),
    }


def measure_learning(task: str, seed: int) -> dict[str, Any]:
    import torch as th
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import VecNormalize

    from sb3_trpo import RecurrentTRPO

    th.set_num_threads(1)
    settings = TASKS[task]
    seconds, returns = {}, {}
    for name in ("recurrent_ppo", "recurrent_trpo"):
        keywords = settings["trpo"] if name == "recurrent_trpo" else settings["recurrent_ppo"]
        env = _env(task, seed, keywords.get("gamma", 0.99))
        cell = settings.get("cell", "lstm") if name == "recurrent_trpo" else "lstm"  # the preset's cell
        kwargs = dict(seed=seed, policy_kwargs=_policy_kwargs(task, cell))
        if name == "recurrent_ppo":
            model: Any = RecurrentPPO("MlpLstmPolicy", env, **kwargs, **{k: _schedule(v) for k, v in keywords.items()})
        else:
            model = RecurrentTRPO("MlpLstmPolicy", env, **kwargs, **keywords)
        start = time.perf_counter()
        model.learn(settings["timesteps"])
        seconds[name] = time.perf_counter() - start
        eval_env = _env(task, seed + 1000, keywords.get("gamma", 0.99))
        eval_env.obs_rms, eval_env.training, eval_env.norm_reward = env.obs_rms, False, False
        assert isinstance(eval_env, VecNormalize)
        returns[name] = float(evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)[0])
    return {
        "kind": "learn",
        "task": task,
        "seed": seed,
        "timesteps": settings["timesteps"],
        "seconds": seconds,
        "final_return": returns,
        "ratio": seconds["recurrent_ppo"] / seconds["recurrent_trpo"],
        "settings": {k: repr(settings[k]) for k in ("trpo", "recurrent_ppo")},
        **_versions(),
    }


def report() -> str:
    entries = _load()
    commits = sorted({e["commit"] for e in entries})
    lines = [
        f"# commit(s) {', '.join(commits)}; one process, 1 torch thread, side by side",
        "",
        "## Collection: RecurrentPPO.collect_rollouts against RecurrentTRPO's lean loop, same model and environments",
        "",
        "| task | cell | samples each | RecurrentPPO's loop (ms / 1,000 samples) | lean loop | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for e in (e for e in entries if e["kind"] == "collect"):
        ms = e["ms_per_1000"]
        lines.append(
            f"| {e['task']} | {e['cell']} | {e['samples_each']:,} | {ms['recurrent_ppo']:.0f} | {ms['recurrent_trpo']:.0f} "
            f"| {e['ratio']:.2f}x |"
        )
    lines += [
        "",
        "## learn(): RecurrentPPO (rl-zoo3's ppo_lstm.yml) against RecurrentTRPO (its preset), same task and budget",
        "",
        "| task | seed | budget | RecurrentPPO | RecurrentTRPO | ratio | final return (PPO / TRPO, 10 episodes) |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in (e for e in entries if e["kind"] == "learn"):
        s, r = e["seconds"], e["final_return"]
        lines.append(
            f"| {e['task']} | {e['seed']} | {e['timesteps']:,} | {s['recurrent_ppo']:.0f} s | {s['recurrent_trpo']:.0f} s "
            f"| {e['ratio']:.2f}x | {r['recurrent_ppo']:.1f} / {r['recurrent_trpo']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    (RESULTS / "recurrent_speed.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    collect = sub.add_parser("collect")
    collect.add_argument("--tasks", nargs="+", default=["CartPoleNoVel-v1", "PendulumNoVel-v1"], choices=list(TASKS))
    collect.add_argument("--cells", nargs="+", default=["lstm", "gru"], choices=["lstm", "gru", "rnn"])
    collect.add_argument("--rollouts", type=int, default=40)
    learn = sub.add_parser("learn")
    learn.add_argument("--tasks", nargs="+", default=["CartPoleNoVel-v1", "PendulumNoVel-v1"], choices=list(TASKS))
    learn.add_argument("--seeds", nargs="+", type=int, default=[0])
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "collect":
        for task in args.tasks:
            for cell in args.cells:
                entry = measure_collection(task, cell, args.rollouts)
                _save(entry)
                print(f"{task} {cell}: {entry['ratio']:.2f}x ({entry['ms_per_1000']})", flush=True)
    elif args.command == "learn":
        for task in args.tasks:
            for seed in args.seeds:
                entry = measure_learning(task, seed)
                _save(entry)
                print(f"{task} seed {seed}: {entry['ratio']:.2f}x {entry['seconds']} {entry['final_return']}", flush=True)
    print(report())


if __name__ == "__main__":
    sys.exit(main())
