"""What one update costs as the number of actions grows, with 10 legal actions drawn anew at every step.

sb3-contrib's users report masked categoricals failing torch's simplex validation after long runs or with ~1000
actions (sb3-contrib #322); the long runs are tests (``tests/test_masks.py``, slow). This script measures the cost:
for ``N`` actions (20, 200, 2,000, 20,000), one rollout of 4 environments x 256 steps is collected, then ``train()``
is timed (median of ``--repeats`` calls on the same rollout, one torch thread), with the Fisher-vector product alone
(the written-out MLP product of the masked categorical) and, side by side, sb3-contrib's ``MaskablePPO.train()`` on
the same rollout size with its defaults (10 epochs of minibatches of 64). ``MaskableRecurrentTRPO`` (an LSTM of 64 before
the same MLP; sb3-contrib has no recurrent class with masks to set beside it) is timed the same way, with its Fisher-vector
product over the padded sequences as its policy step builds it.

    python benchmarks/large_action_spaces.py [--repeats 5] [--actions 20 200 2000 20000]
"""

import argparse
import statistics
import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces

LEGAL = 10


class ManyActions(gym.Env):
    """``n`` actions, 10 legal, drawn anew at every step; pays 1 for the lowest legal one."""

    observation_space = spaces.Box(-1.0, 1.0, (4,), np.float32)

    def __init__(self, n: int) -> None:
        self.action_space = spaces.Discrete(n)
        self.legal = np.zeros(n, dtype=bool)
        self.t = 0

    def _draw(self) -> None:
        self.legal[:] = False
        self.legal[self.np_random.choice(len(self.legal), LEGAL, replace=False)] = True

    def action_masks(self) -> np.ndarray:
        return self.legal.copy()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t = 0
        self._draw()
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        assert self.legal[int(action)]
        reward = float(int(action) == int(np.flatnonzero(self.legal)[0]))
        self.t += 1
        self._draw()
        return self.observation_space.sample(), reward, False, self.t >= 50, {}


def _median_ms(function: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _ready_model(cls: Any, n: int) -> Any:
    """A model of ``cls`` on ``n`` actions, built by one update, with a fresh rollout in its buffer."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import Logger

    from sb3_trpo import MaskableTRPO

    env = make_vec_env(lambda: ManyActions(n), n_envs=4, seed=0)
    if cls.__name__ == "MaskableRecurrentTRPO":
        model = cls("MlpLstmPolicy", env, n_steps=256, batch_size=256, seed=0, policy_kwargs=dict(lstm_hidden_size=64))
    else:
        model = cls("MlpPolicy", env, n_steps=256, batch_size=256 if cls is MaskableTRPO else 64, seed=0)
    model.learn(1024)
    model.set_logger(Logger(folder=None, output_formats=[]))
    model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, model.n_steps)
    return model


def _train_ms(model: Any, repeats: int) -> float:
    """Median time of ``train()`` on the model's rollout, every call from the same parameters."""
    state = {k: v.clone() for k, v in model.policy.state_dict().items()}

    def train() -> None:
        model.policy.load_state_dict(state)
        model.train()

    return _median_ms(train, repeats)


def _recurrent_fisher_ms(model: Any, repeats: int) -> float:
    """Median time of one Fisher-vector product of the maskable recurrent class, on the graph of the gradient's forward
    pass through the rollout's padded sequences, as its policy step builds it."""
    batch = model._rollout_batch()
    actor = model._get_actor_view(batch)
    evaluator = model._evaluator(actor, batch)
    theta = actor.flat().detach().clone().requires_grad_(True)
    product = evaluator.fisher_product(theta, evaluator.evaluate(theta))
    vector = th.randn(actor.size)
    return _median_ms(lambda: product(vector), repeats * 10)


def measure(n: int, repeats: int) -> dict[str, float]:
    from sb3_contrib import MaskablePPO

    from sb3_trpo import MaskableRecurrentTRPO, MaskableTRPO
    from sb3_trpo.actor import mlp_fisher_product

    trpo = _ready_model(MaskableTRPO, n)
    batch = trpo._rollout_batch()
    actor = trpo._get_actor_view(batch)
    product = mlp_fisher_product(actor, batch.observations, trpo.cg_damping, batch.action_masks)
    assert product is not None
    vector = th.randn(actor.size)
    return {
        "actor parameters": float(actor.size),
        "MaskableTRPO train()": _train_ms(trpo, repeats),
        "Fisher-vector product": _median_ms(lambda: product(vector), repeats * 10),
        "MaskablePPO train()": _train_ms(_ready_model(MaskablePPO, n), repeats),
        "MaskableRecurrentTRPO train()": _train_ms(recurrent := _ready_model(MaskableRecurrentTRPO, n), repeats),
        "MaskableRecurrentTRPO Fisher-vector product": _recurrent_fisher_ms(recurrent, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--actions", type=int, nargs="+", default=[20, 200, 2000, 20000])
    args = parser.parse_args()
    th.set_num_threads(1)
    header = ["actions", "actor parameters", "MaskableTRPO `train()` ms", "one Fisher-vector product, ms"]
    recurrent = ["MaskableRecurrentTRPO `train()` ms", "its Fisher-vector product, ms"]
    print(f"| {' | '.join([*header, 'MaskablePPO `train()` ms', *recurrent])} |")
    print("|---|---|---|---|---|---|---|")
    for n in args.actions:
        r = measure(n, args.repeats)
        print(
            f"| {n:,} | {int(r['actor parameters']):,} | {r['MaskableTRPO train()']:.1f} | {r['Fisher-vector product']:.2f} "
            f"| {r['MaskablePPO train()']:.1f} | {r['MaskableRecurrentTRPO train()']:.1f} "
            f"| {r['MaskableRecurrentTRPO Fisher-vector product']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
