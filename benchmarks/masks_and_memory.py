"""Masks and memory benchmark: MaskableRecurrentTRPO against each half alone and against RecurrentPPO.

Tasks that need memory and have illegal actions:

- ``recall``: this project's Recall (``tests/test_maskable_recurrent.py``): a cue shown once, 4 blank steps in which
  only "wait" is legal, then an answer among 2 legal ones (the cue and a decoy). An illegal move pays -1 and ends
  the episode; the right answer pays 1. Optimum 1; a legal guess without memory 0.5. 30,000 steps.
- ``minesweeper``: POPGym's MineSweeperEasy (``pip install popgym``; 4x4 board, 2 mines), which nobody here wrote,
  through a small wrapper: actions flattened to one of the 16 cells, the mask is the cells not yet revealed
  (re-clicking one is penalised by POPGym: the illegal move), and the observation is POPGym's (the revealed cell's
  mine count) with the previous action, as POPGym's own ``obs_requires_prev_action`` asks. 200,000 steps.

Algorithms: ``MaskableRecurrentTRPO``; ``RecurrentTRPO`` (no masks); ``MaskableTRPO`` with an MLP and with the last 4
observations stacked (``VecFrameStack``); sb3-contrib's ``RecurrentPPO`` (no masks: sb3-contrib has no recurrent
class with masks); ``TRPO`` with an MLP (neither). All on 4 environments x 128 steps; the TRPO classes with
``target_kl=0.05`` (the value the learning test on Recall uses), RecurrentPPO with its defaults; LSTMs of 64, one
hidden layer of 64. Each
configuration is evaluated deterministically every ``EVAL_EVERY`` steps on 20 episodes (with the masks and the LSTM's
states for the maskable classes: ``sb3_trpo.masks.evaluate_policy``) and at the end on 100. A run whose
``result.json`` exists is skipped, so the benchmark resumes where it stopped.

    python benchmarks/masks_and_memory.py run --tasks recall minesweeper --seeds 0 1 2
    python benchmarks/masks_and_memory.py report      # results/masks_and_memory.md and .png

A longer budget goes to its own folder (``--timesteps 1000000 --out benchmarks/results/masks_and_memory_1m``, the
same ``--out`` for ``report``).
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "masks_and_memory"
ALGORITHMS = ("MaskableRecurrentTRPO", "RecurrentTRPO", "MaskableTRPO", "MaskableTRPO-4-frames", "RecurrentPPO", "TRPO")
MASKED = ("MaskableRecurrentTRPO", "MaskableTRPO", "MaskableTRPO-4-frames")
TASKS = {"recall": 30_000, "minesweeper": 200_000}
EVAL_EVERY = {"recall": 2_000, "minesweeper": 20_000}
N_ENVS, N_STEPS = 4, 128


class Recall(gym.Env):
    """The Recall task (the same rules as the learning test's)."""

    observation_space = spaces.Box(0.0, 1.0, (5,), np.float32)
    action_space = spaces.Discrete(4)
    DELAY = 4

    def __init__(self) -> None:
        self.cue, self.t, self.decoy = 0, 0, 1

    def action_masks(self) -> np.ndarray:
        mask = np.zeros(4, dtype=bool)
        if self.t < self.DELAY:
            mask[0] = True
        else:
            mask[[self.cue, self.decoy]] = True
        return mask

    def _obs(self) -> np.ndarray:
        obs = np.zeros(5, dtype=np.float32)
        if self.t == 0:
            obs[self.cue] = 1.0
        obs[4] = float(self.t >= self.DELAY)
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.cue, self.t = int(self.np_random.integers(4)), 0
        self.decoy = int((self.cue + 1 + self.np_random.integers(3)) % 4)
        return self._obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        legal = self.action_masks()[int(action)]
        if self.t < self.DELAY:
            self.t += 1
            return self._obs(), 0.0 if legal else -1.0, not legal, False, {}
        reward = 1.0 if int(action) == self.cue else (0.0 if legal else -1.0)
        return self._obs(), reward, True, False, {}


class MineSweeperCells(gym.Wrapper):
    """POPGym's MineSweeper with one action per cell, masks of the cells not yet revealed, and the previous action in
    the observation (one-hot, zeros at the start) next to POPGym's own (the revealed cell's mine count, one-hot)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.rows, self.cols = (int(n) for n in env.action_space.nvec)
        self.n_cells = self.rows * self.cols
        self.n_counts = int(env.observation_space.n)
        self.action_space = spaces.Discrete(self.n_cells)
        self.observation_space = spaces.Box(0.0, 1.0, (self.n_counts + self.n_cells,), np.float32)

    def _obs(self, count: int, previous: int | None) -> np.ndarray:
        obs = np.zeros(self.observation_space.shape, dtype=np.float32)
        obs[int(count)] = 1.0
        if previous is not None:
            obs[self.n_counts + previous] = 1.0
        return obs

    def action_masks(self) -> np.ndarray:
        return np.asarray(self.env.unwrapped.hidden_grid != 2).reshape(-1)  # type: ignore[attr-defined]  # 2: viewed

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        count, info = self.env.reset(seed=seed, options=options)
        return self._obs(count, None), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        cell = int(action)
        count, reward, terminated, truncated, info = self.env.step(np.array(divmod(cell, self.cols)))
        return self._obs(count, cell), float(reward), terminated, truncated, info


def make_env(task: str) -> gym.Env:
    if task == "recall":
        return Recall()
    from popgym.envs.minesweeper import MineSweeperEasy

    return MineSweeperCells(MineSweeperEasy())


def run_one(task: str, algorithm: str, seed: int, out: Path, timesteps: int | None = None) -> dict[str, Any]:
    """Train and evaluate one (task, algorithm, seed), unless its result exists.

    :param timesteps: the budget (``None``: the task's, ``TASKS``)
    """
    budget = TASKS[task] if timesteps is None else timesteps
    run_dir = out / task / algorithm / f"seed{seed}"
    result_file = run_dir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    import torch as th
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecFrameStack

    from sb3_trpo import TRPO, MaskableRecurrentTRPO, MaskableTRPO, RecurrentTRPO
    from sb3_trpo.masks import evaluate_policy

    th.set_num_threads(1)
    masked = algorithm in MASKED

    def environment(n: int, offset: int) -> Any:
        env = make_vec_env(lambda: make_env(task), n_envs=n, seed=seed + offset)
        return VecFrameStack(env, 4) if algorithm == "MaskableTRPO-4-frames" else env

    env, eval_env = environment(N_ENVS, 0), environment(1, 1000)
    lstm = dict(lstm_hidden_size=64, net_arch=[64])
    common = dict(n_steps=N_STEPS, seed=seed)
    trpo = dict(batch_size=N_ENVS * N_STEPS, target_kl=0.05, **common)
    model: Any
    if algorithm == "MaskableRecurrentTRPO":
        model = MaskableRecurrentTRPO("MlpLstmPolicy", env, policy_kwargs=lstm, **trpo)
    elif algorithm == "RecurrentTRPO":
        model = RecurrentTRPO("MlpLstmPolicy", env, policy_kwargs=lstm, **trpo)
    elif algorithm.startswith("MaskableTRPO"):
        model = MaskableTRPO("MlpPolicy", env, policy_kwargs=dict(net_arch=[64]), **trpo)
    elif algorithm == "TRPO":  # neither masks nor memory
        model = TRPO("MlpPolicy", env, policy_kwargs=dict(net_arch=[64]), **trpo)
    else:
        model = RecurrentPPO("MlpLstmPolicy", env, policy_kwargs=lstm, **common)

    def evaluate(episodes: int) -> float:
        mean, _ = evaluate_policy(model, eval_env, n_eval_episodes=episodes, deterministic=True, use_masking=masked)
        return float(mean)

    timesteps: list[int] = []
    returns: list[float] = []
    evaluating = [0.0]  # seconds spent evaluating, not counted in the training time

    class Evaluate(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps // EVAL_EVERY[task] > len(timesteps):
                begun = time.perf_counter()
                timesteps.append(self.num_timesteps)
                returns.append(evaluate(20))
                evaluating[0] += time.perf_counter() - begun
            return True

    begun = time.perf_counter()
    model.learn(budget, callback=Evaluate())
    wall = time.perf_counter() - begun - evaluating[0]
    final = evaluate(100)
    result = {
        "task": task,
        "algorithm": algorithm,
        "seed": seed,
        "timesteps": budget,
        "final_return": final,
        "best_return": max([*returns, final]),
        "train_seconds": wall,
        "curve": {"timesteps": timesteps, "returns": returns},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def random_legal_return(task: str, episodes: int = 1000, seed: int = 0) -> float:
    """The mean return of a uniformly random legal action at every step: what masks alone, with neither memory nor
    learning, score (the table's reference row)."""
    env, generator = make_env(task), np.random.default_rng(seed)
    total = 0.0
    for episode in range(episodes):
        env.reset(seed=seed + episode)
        done = False
        while not done:
            legal = np.flatnonzero(env.action_masks())  # type: ignore[attr-defined]
            _, reward, terminated, truncated, _ = env.step(int(generator.choice(legal)))
            total += reward
            done = terminated or truncated
    return total / episodes


def report(out: Path) -> None:
    """Write ``<out>.md`` (the table) and ``<out>.png`` (the curves) from the finished runs in ``out``."""
    lines = [
        "| task | algorithm | seeds | final return | best evaluation | training time |",
        "|---|---|---|---|---|---|",
    ]
    curves: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for task in TASKS:
        for algorithm in ALGORITHMS:
            results = [json.loads(p.read_text()) for p in sorted((out / task / algorithm).glob("seed*/result.json"))]
            if not results:
                continue
            curves.setdefault(task, {})[algorithm] = results
            final = [r["final_return"] for r in results]
            best = [r["best_return"] for r in results]
            seconds = [r["train_seconds"] for r in results]
            lines.append(
                f"| {task} | {algorithm} | {len(results)} | {np.mean(final):.2f} ± {np.std(final):.2f} | "
                f"{np.mean(best):.2f} ± {np.std(best):.2f} | {np.mean(seconds):.0f} s |"
            )
        if task in curves:
            lines.append(f"| {task} | *a random legal action (reference)* | | {random_legal_return(task):.2f} | | |")
    out.with_name(out.name + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(1, max(len(curves), 1), figsize=(6 * max(len(curves), 1), 4), squeeze=False)
    for axis, (task, by_algorithm) in zip(axes[0], curves.items(), strict=False):
        for algorithm, results in by_algorithm.items():
            length = min(len(r["curve"]["returns"]) for r in results)
            if length == 0:
                continue
            steps = results[0]["curve"]["timesteps"][:length]
            mean = np.mean([r["curve"]["returns"][:length] for r in results], axis=0)
            axis.plot(steps, mean, label=algorithm)
        axis.set_title(task)
        axis.set_xlabel("timesteps")
        axis.set_ylabel("evaluation return (mean over seeds)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out.with_name(out.name + ".png"), dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "report"])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the runs' folder; the report is <out>.md/.png")
    parser.add_argument("--timesteps", type=int, default=None, help="every task's budget (default: its own)")
    args = parser.parse_args()
    if args.action == "report":
        report(args.out)
        return
    for task in args.tasks:
        for seed in args.seeds:
            for algorithm in args.algorithms:
                result = run_one(task, algorithm, seed, args.out, args.timesteps)
                print(
                    f"{task} {algorithm} seed {seed}: final {result['final_return']:.2f}, best {result['best_return']:.2f}, "
                    f"{result['train_seconds']:.0f} s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
