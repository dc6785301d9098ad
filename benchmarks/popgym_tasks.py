"""POPGym tasks: RecurrentTRPO (LSTM and GRU) against RecurrentPPO (LSTM) and TRPO with an MLP.

The tasks are four of POPGym's (Morad et al., "POPGym: Benchmarking Partially Observable Reinforcement Learning",
ICLR 2023; ``popgym`` on PyPI) "Easy" environments of different kinds, plus AutoencodeEasy as an optional fifth
(not in the default ``--tasks``):

* ``RepeatPreviousEasy`` (diagnostic): observe a card's suit, ``Discrete(4)``; answer the suit seen 4 steps earlier,
  ``Discrete(4)``; 51 steps, return in [-1, 1] (+-1/48 a step once answers count).
* ``CountRecallEasy`` (diagnostic, noisy): observe (dealt colour, queried colour), ``MultiDiscrete([2, 2])``; answer
  how many cards of the queried colour were dealt so far, ``Discrete(27)``; 51 steps, +-1/51 a step.
* ``PositionOnlyCartPoleEasy`` (control): CartPole with (cart position, pole angle) only, ``Box(2)``, ``Discrete(2)``;
  200 steps at most, +1/200 a step (the return is the fraction of the 200 steps survived; POPGym's -1 for a
  reward of 0 never comes, as gymnasium's CartPole pays 1 on the falling step too and the episode ends there).
* ``NoisyPositionOnlyPendulumEasy`` (control, noisy): Pendulum with (cos, sin) only plus Gaussian noise (sigma 0.1),
  ``Box(2)``, torque ``Box(1)``; 200 steps, the reward mapped to [-1/200, 1/200] a step.
* ``AutoencodeEasy`` (diagnostic, optional): watch 52 cards, then recite their suits in reverse order; 103 steps. Its
  observation is ``Tuple(Discrete(2), Discrete(4))``, which SB3 does not take: ``TupleToMultiDiscrete`` below (a
  gymnasium ObservationWrapper) turns it into ``MultiDiscrete([2, 4])``, the same information, which SB3 one-hot
  encodes. The other four tasks' spaces (``Discrete``, ``MultiDiscrete``, ``Box``) go to SB3 as they are.

The environments are made with ``gymnasium.make("popgym-<Task>-v0")`` (``import popgym`` registers them) and nothing
else: no VecNormalize (every POPGym return lies in [-1, 1], so rewards and values are already small; the observations
are one-hot codes, cos/sin, or a cart position and a pole angle that end the episode beyond +-2.4 and +-0.21), and no
previous-action wrapper (POPGym's own baselines wrap every environment in ``PreviousAction`` and ``Antialias``; none
of these five tasks needs the previous action, ``obs_requires_prev_action`` is False for them).

Each run (task, algorithm, seed) trains for the task's budget (50k steps, the same for every algorithm and task: what 48
runs fit on this 2-core machine beside the other benchmarks), evaluates the
deterministic policy every ``eval_every`` steps with SB3's ``evaluate_policy`` (10 episodes on a separate environment
seeded with seed + 1000; the recurrent policies carry their state through each episode) and once at the end, and
writes ``result.json`` under ``OUT/TASK/ALGORITHM/seedN/`` (final and best evaluation, the curve, training wall time
without the evaluations, settings, commit, versions). A run whose ``result.json`` exists is skipped, so an
interrupted benchmark resumes.

    python benchmarks/popgym_tasks.py run --seeds 0 1 2 --jobs 2         # the four default tasks, every algorithm
    python benchmarks/popgym_tasks.py run --tasks AutoencodeEasy --seeds 0 1 2
    python benchmarks/popgym_tasks.py report                              # -> results/popgym.md and results/popgym.png
    python benchmarks/popgym_tasks.py run --timesteps 2048 --seeds 0 --jobs 1 --out /tmp/popgym_smoke  # a smoke test
    python benchmarks/popgym_tasks.py report --out /tmp/popgym_smoke      # -> /tmp/popgym_smoke.md and .png

``report`` writes ``OUT.md`` and ``OUT.png`` beside the ``OUT`` directory (``results/popgym`` gives
``results/popgym.md``).

Settings (``RECURRENT_PPO``, ``TRPO``, ``LSTM_NET``, ``MLP_NET`` below, recorded in every ``result.json``): the same
8 environments x 128 steps a rollout, gamma 0.99, GAE lambda 0.95 and network sizes for every algorithm, one setting
for every task, nothing tuned per task or per algorithm. RecurrentPPO gets rl-zoo3-like defaults for small memory
tasks (10 epochs of minibatches of 256 steps, learning rate 3e-4, no entropy bonus); RecurrentTRPO and TRPO
``target_kl=0.01`` and 10 critic minibatch passes. RecurrentTRPO with ``recurrent_layer_type="gru"`` replaces the
LSTM by a GRU of the same width. TRPO's MLP has two 64-wide layers per head, the LSTM policies a 64-wide LSTM (one for
the actor, one for the critic) followed by one 64-wide layer per head. On the MultiDiscrete tasks (CountRecallEasy,
AutoencodeEasy) sb3-contrib's RecurrentPPO cannot be built as it is (``TypeError: input_size should be of type int``:
SB3 counts the features as a numpy integer and ``nn.LSTM`` refuses it); it gets ``IntFlattenExtractor`` below, SB3's
FlattenExtractor with that count cast to ``int``, the same network. These are much smaller runs than POPGym's own:
its PPO baseline (``popgym/baselines/ppo.py``) trains RLlib's PPO for 15M environment steps (``POPGYM_STEPS``
default 15e6) with 4 workers x 16 environments, batches of 65,536 steps (BPTT 1024, minibatches of 8 x 1024), gamma
0.99, 128-wide LeakyReLU pre-/post-processing and actor/critic MLPs around a 256-wide memory cell, and the other
settings at RLlib's defaults; see ``PUBLISHED``.
"""

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from end_to_end import _versions  # the commit and library versions, as every benchmark records them
from partial_observability import _timed_eval_callback  # SB3's EvalCallback keeping the curve and its time

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "popgym"
ALGORITHMS = ("recurrent_trpo_lstm", "recurrent_trpo_gru", "recurrent_ppo", "trpo_mlp")

#: every algorithm, every task: 8 environments, 128 steps each a rollout (1,024 steps an update)
N_ENVS = 8
#: the recurrent policies (RecurrentPPO's and RecurrentTRPO's; RecurrentTRPO adds ``recurrent_layer_type``)
LSTM_NET: dict[str, Any] = dict(lstm_hidden_size=64, net_arch=dict(pi=[64], vf=[64]), ortho_init=True, enable_critic_lstm=True)
#: TRPO's MLP: two 64-wide layers for the actor and for the critic, in place of the LSTM and its one layer
MLP_NET: dict[str, Any] = dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), ortho_init=True)
#: sb3-contrib's RecurrentPPO, rl-zoo3-like defaults for small memory tasks (clip_range 0.2, vf_coef 0.5,
#: max_grad_norm 0.5 at their defaults)
RECURRENT_PPO: dict[str, Any] = dict(
    n_steps=128, batch_size=256, n_epochs=10, learning_rate=3e-4, gamma=0.99, gae_lambda=0.95, ent_coef=0.0
)
#: RecurrentTRPO (LSTM and GRU) and TRPO; learning_rate is the critic's Adam step (the default), batch_size the
#: critic's minibatch (of sequences for RecurrentTRPO)
TRPO: dict[str, Any] = dict(
    n_steps=128, batch_size=256, gamma=0.99, gae_lambda=0.95, target_kl=0.01, n_critic_updates=10, learning_rate=1e-3
)

TASKS: dict[str, dict[str, Any]] = {
    "RepeatPreviousEasy": dict(env_id="popgym-RepeatPreviousEasy-v0", timesteps=50_000, eval_every=5_000),
    "CountRecallEasy": dict(env_id="popgym-CountRecallEasy-v0", timesteps=50_000, eval_every=5_000),
    "PositionOnlyCartPoleEasy": dict(env_id="popgym-PositionOnlyCartPoleEasy-v0", timesteps=50_000, eval_every=5_000),
    "NoisyPositionOnlyPendulumEasy": dict(
        env_id="popgym-NoisyPositionOnlyPendulumEasy-v0", timesteps=50_000, eval_every=5_000
    ),
    # optional: its Tuple observation goes through TupleToMultiDiscrete
    "AutoencodeEasy": dict(
        env_id="popgym-AutoencodeEasy-v0", timesteps=50_000, eval_every=5_000, wrapper="TupleToMultiDiscrete"
    ),
}
DEFAULT_TASKS = ["RepeatPreviousEasy", "CountRecallEasy", "PositionOnlyCartPoleEasy", "NoisyPositionOnlyPendulumEasy"]

#: POPGym's published results for these tasks, ``{task: {model: (mean, std)}}`` of the paper's MMER metric, with
#: their source. None is recorded: the per-environment results the paper reports (Morad et al., ICLR 2023,
#: https://openreview.net/forum?id=chDrutUTs0K, arXiv 2303.01859) could not be read from where this script was
#: written, and the repository github.com/proroklab/popgym has no results table (its README's leaderboard link to
#: paperswithcode.com/dataset/popgym was removed in its commit 18b90ae). Add them here with the table they come from;
#: do not estimate them from a figure. Their budget: 15M environment steps a run (``POPGYM_STEPS`` in
#: ``popgym/baselines/ppo.py``), 300 times this benchmark's 50k; MMER is the paper's own metric over training, not
#: a deterministic evaluation like this benchmark's.
PUBLISHED: dict[str, dict[str, tuple[float, float]]] = {}
PUBLISHED_SOURCE = (
    "Morad et al., POPGym (ICLR 2023), appendix: per-environment MMER of RLlib PPO with each memory model, "
    "15M environment steps a run (popgym/baselines/ppo.py); not transcribed here"
)


def _tuple_to_multidiscrete() -> type:
    import gymnasium as gym

    class TupleToMultiDiscrete(gym.ObservationWrapper):
        """A ``Tuple`` of ``Discrete`` spaces (AutoencodeEasy's (mode, suit)) as one ``MultiDiscrete``, which SB3
        one-hot encodes: the same information in a space SB3 takes."""

        def __init__(self, env: gym.Env) -> None:
            super().__init__(env)
            parts = env.observation_space.spaces
            assert all(isinstance(part, gym.spaces.Discrete) and part.start == 0 for part in parts), parts
            self.observation_space = gym.spaces.MultiDiscrete([part.n for part in parts])

        def observation(self, observation: tuple[int, ...]) -> np.ndarray:
            return np.array(observation, dtype=np.int64)

    return TupleToMultiDiscrete


def _int_flatten_extractor() -> type:
    from stable_baselines3.common.torch_layers import FlattenExtractor

    class IntFlattenExtractor(FlattenExtractor):
        """SB3's FlattenExtractor reporting ``features_dim`` as a Python ``int``: SB3 counts a MultiDiscrete
        observation's features as ``sum(nvec)``, a numpy integer, which sb3-contrib's RecurrentPPO passes to
        ``nn.LSTM(input_size=...)``, and torch refuses it (``TypeError: input_size should be of type int``).
        RecurrentPPO gets it on the MultiDiscrete tasks (CountRecallEasy, AutoencodeEasy) and is stock elsewhere;
        RecurrentTRPO does the same cast itself."""

        def __init__(self, observation_space: Any) -> None:
            super().__init__(observation_space)
            self._features_dim = int(self._features_dim)

    return IntFlattenExtractor


def _settings(task: str, algorithm: str, timesteps: int) -> dict[str, Any]:
    """Everything a run is given, as recorded in its result."""
    task_settings = dict(TASKS[task], timesteps=timesteps)
    if algorithm == "recurrent_ppo":
        return dict(task=task_settings, n_envs=N_ENVS, algorithm=RECURRENT_PPO, policy=LSTM_NET)
    if algorithm.startswith("recurrent_trpo"):
        layer = algorithm.removeprefix("recurrent_trpo_")
        return dict(task=task_settings, n_envs=N_ENVS, algorithm=TRPO, policy=dict(LSTM_NET, recurrent_layer_type=layer))
    return dict(task=task_settings, n_envs=N_ENVS, algorithm=TRPO, policy=MLP_NET)


def run_one(job: tuple[str, str, int, str, int | None]) -> dict[str, Any]:
    """Train one (task, algorithm, seed) with periodic evaluations; write and return its result."""
    task, algorithm, seed, out, timesteps_override = job
    import popgym.envs  # noqa: F401  # registers the popgym-*-v0 ids
    import torch as th
    from stable_baselines3.common.env_util import make_vec_env

    th.set_num_threads(1)
    TimedEvalCallback = _timed_eval_callback()  # noqa: N806
    task_settings = TASKS[task]
    timesteps = timesteps_override or task_settings["timesteps"]
    settings = _settings(task, algorithm, timesteps)
    folder = Path(out) / task / algorithm / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = _tuple_to_multidiscrete() if task_settings.get("wrapper") == "TupleToMultiDiscrete" else None
    env = make_vec_env(task_settings["env_id"], n_envs=N_ENVS, seed=seed, wrapper_class=wrapper)
    eval_env = make_vec_env(task_settings["env_id"], n_envs=1, seed=seed + 1000, wrapper_class=wrapper)
    policy_kwargs = dict(settings["policy"])
    if algorithm == "recurrent_ppo":
        from gymnasium import spaces
        from sb3_contrib import RecurrentPPO

        if isinstance(env.observation_space, spaces.MultiDiscrete):
            policy_kwargs["features_extractor_class"] = _int_flatten_extractor()
            settings["policy"] = dict(settings["policy"], features_extractor_class="IntFlattenExtractor")
        model: Any = RecurrentPPO("MlpLstmPolicy", env, seed=seed, policy_kwargs=policy_kwargs, **RECURRENT_PPO)
    elif algorithm.startswith("recurrent_trpo"):
        from sb3_trpo import RecurrentTRPO

        model = RecurrentTRPO("MlpLstmPolicy", env, seed=seed, policy_kwargs=policy_kwargs, **TRPO)
    else:
        from sb3_trpo import TRPO as TRPOAlgorithm  # noqa: N811

        model = TRPOAlgorithm("MlpPolicy", env, seed=seed, policy_kwargs=policy_kwargs, **TRPO)

    evaluations = TimedEvalCallback(
        eval_env, eval_freq=task_settings["eval_every"] // N_ENVS, n_eval_episodes=10, deterministic=True, verbose=0
    )
    start = time.perf_counter()
    model.learn(timesteps, callback=evaluations)
    train_seconds = time.perf_counter() - start - evaluations.seconds
    evaluations.evaluate_now()  # the final policy
    steps, curve = evaluations.steps, evaluations.returns
    result = {
        "task": task,
        "algorithm": algorithm,
        "seed": seed,
        "final_return": curve[-1],
        "best_return": max(curve),
        "train_seconds_note": "learn() wall time without the evaluations",
        "steps": steps,
        "curve": curve,
        "train_seconds": train_seconds,
        "eval_seconds": evaluations.seconds,
        "settings": {k: repr(v) for k, v in settings.items()},
        **_versions(),
    }
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    return result


def run(tasks: list[str], seeds: list[int], algorithms: list[str], jobs: int, out: Path, timesteps: int | None = None) -> None:
    todo = [
        (task, algorithm, seed, str(out), timesteps)
        for task in tasks
        for seed in seeds
        for algorithm in algorithms
        if not (out / task / algorithm / f"seed{seed}" / "result.json").exists()
    ]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for r in pool.map(run_one, todo):
            print(
                f"{r['task']} {r['algorithm']} seed {r['seed']}: final {r['final_return']:.3f}, "
                f"best {r['best_return']:.3f}, {r['train_seconds']:.0f} s",
                flush=True,
            )


def report(out: Path) -> str:
    """The table (and ``PUBLISHED``'s) in ``OUT.md``, the curves in ``OUT.png``, both beside the ``OUT`` folder."""
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/*/seed*/result.json"))]
    commits = sorted({r["commit"] for r in results})
    lines = [
        f"# commit(s) {', '.join(commits)}; deterministic evaluation, 10 episodes; mean ± std over seeds (per-seed "
        "values); time ratio: RecurrentPPO's mean training wall time over the algorithm's (> 1: faster than "
        "RecurrentPPO)",
        "",
        "| task | algorithm | seeds | steps | final return | best evaluation | training wall time "
        "| RecurrentPPO time / time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        ppo = [r["train_seconds"] for r in results if r["task"] == task and r["algorithm"] == "recurrent_ppo"]
        for algorithm in ALGORITHMS:
            mine = [r for r in results if r["task"] == task and r["algorithm"] == algorithm]
            if not mine:
                continue
            final = np.array([r["final_return"] for r in mine])
            best = np.array([r["best_return"] for r in mine])
            seconds = np.array([r["train_seconds"] for r in mine])
            steps = sorted({r["steps"][-1] for r in mine})
            per_seed = ", ".join(f"{x:.3f}" for x in final)
            ratio = f"{np.mean(ppo) / seconds.mean():.2f}" if ppo else "-"
            lines.append(
                f"| {task} | {algorithm} | {len(mine)} | {', '.join(f'{s:,}' for s in steps)} "
                f"| {final.mean():.3f} ± {final.std():.3f} ({per_seed}) | {best.mean():.3f} ± {best.std():.3f} "
                f"| {seconds.mean():.{0 if seconds.mean() >= 10 else 1}f} s | {ratio} |"
            )
    lines += ["", f"Published (POPGym): {PUBLISHED_SOURCE}.", ""]
    if PUBLISHED:
        lines += ["| task | model | published return |", "|---|---|---|"]
        for task, models in PUBLISHED.items():
            for model, (mean, std) in models.items():
                lines.append(f"| {task} | {model} | {mean:.3f} ± {std:.3f} |")
    else:
        lines.append("No published numbers are recorded (see PUBLISHED in benchmarks/popgym_tasks.py).")
    text = "\n".join(lines) + "\n"
    (out.parent / f"{out.name}.md").write_text(text)
    if results:
        _plot_curves(results, out.parent / f"{out.name}.png")
    return text


def _plot_curves(results: list[dict[str, Any]], path: Path) -> None:
    """One panel per task: each algorithm's mean evaluation curve over seeds, with a band from the lowest seed to the
    highest (the seeds are evaluated at the same steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [task for task in TASKS if any(r["task"] == task for r in results)]
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for algorithm in ALGORITHMS:
            mine = [r for r in results if r["task"] == task and r["algorithm"] == algorithm]
            if not mine:
                continue
            length = min(len(r["curve"]) for r in mine)
            steps = np.array(mine[0]["steps"][:length])
            curves = np.array([r["curve"][:length] for r in mine])
            line = axis.plot(steps, curves.mean(axis=0), marker="." if length < 3 else None,
                             label=f"{algorithm} ({len(mine)} seeds)")[0]  # fmt: skip
            axis.fill_between(steps, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.15)
        axis.set_title(task)
        axis.set_xlabel("timesteps")
        axis.set_ylabel("evaluation return")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=list(TASKS))
    run_parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    run_parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    run_parser.add_argument("--jobs", type=int, default=2)
    run_parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    run_parser.add_argument("--timesteps", type=int, default=None, help="override every task's budget (smoke tests)")
    report_parser = sub.add_parser("report")
    report_parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.command == "run":
        run(args.tasks, args.seeds, args.algorithms, args.jobs, args.out, args.timesteps)
    print(report(args.out))


if __name__ == "__main__":
    sys.exit(main())
