"""Time one ``train()`` call of sb3_trpo.TRPO and sb3_contrib.TRPO side by side, in one process.

For each case both models are built with identical hyperparameters and identical initial weights, one rollout
is collected and copied into both buffers (set-up, not timed), then ``train()`` calls are timed interleaved,
each from the same restored state, with ``torch.set_num_threads(1)``. Reported: median milliseconds per
``train()``, the ratio sb3-contrib / sb3_trpo, and where the time goes inside sb3_trpo's ``train()``.

    python benchmarks/update_speed.py [--repeats 15] [--cases mujoco64 mujoco64-policy mujoco256 cartpole-zoo]
    python benchmarks/update_speed.py --fisher          # cost of one Fisher-vector product, three ways
    python benchmarks/update_speed.py --sub-sampling    # policy step vs sub_sampling_factor
"""

import argparse
import copy
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from timing import Section

import sb3_trpo
import sb3_trpo.policy_step
import sb3_trpo.trpo


class MujocoShapedEnv(gym.Env):
    """17-D observations, 6-D actions in [-1, 1], smooth random dynamics: the shape of HalfCheetah, none of its cost."""

    observation_space = spaces.Box(-np.inf, np.inf, shape=(17,), dtype=np.float32)
    action_space = spaces.Box(-1.0, 1.0, shape=(6,), dtype=np.float32)

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self._a = rng.normal(0, 0.3, (17, 17)).astype(np.float32)
        self._b = rng.normal(0, 0.5, (17, 6)).astype(np.float32)
        self._state = np.zeros(17, dtype=np.float32)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._state = self.np_random.normal(0, 0.1, 17).astype(np.float32)
        self._t = 0
        return self._state, {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        action = np.clip(action, -1, 1)
        noise = self.np_random.normal(0, 0.05, 17)
        self._state = np.tanh(self._a @ self._state + self._b @ action + noise).astype(np.float32)
        self._t += 1
        reward = float(self._state[0] - 0.1 * np.square(action).sum())
        return self._state, reward, False, self._t >= 1000, {}


MUJOCO = dict(
    n_steps=1024,
    batch_size=128,
    gamma=0.99,
    gae_lambda=0.95,
    cg_max_steps=25,
    cg_damping=0.1,
    n_critic_updates=20,
    learning_rate=1e-3,
    sub_sampling_factor=1,
    line_search_shrinking_factor=0.8,
    line_search_max_iter=10,
)


@dataclass
class Case:
    env: Callable[[], Any]
    n_envs: int
    kwargs: dict[str, Any]
    policy_kwargs: dict[str, Any] = field(default_factory=dict)


CASES = {
    "mujoco64": Case(MujocoShapedEnv, 2, MUJOCO, dict(net_arch=[64, 64])),
    "mujoco64-policy": Case(MujocoShapedEnv, 2, {**MUJOCO, "n_critic_updates": 0}, dict(net_arch=[64, 64])),
    "mujoco256": Case(MujocoShapedEnv, 2, MUJOCO, dict(net_arch=[256, 256])),
    # rl-zoo3's tuned CartPole settings; the CG and line-search settings zoo leaves at sb3-contrib's defaults
    "cartpole-zoo": Case(
        lambda: gym.make("CartPole-v1"),
        2,
        dict(
            n_steps=512,
            batch_size=512,
            cg_damping=1e-3,
            gae_lambda=0.98,
            gamma=0.99,
            learning_rate=1e-3,
            n_critic_updates=20,
            cg_max_steps=15,
            line_search_shrinking_factor=0.8,
            line_search_max_iter=10,
        ),
    ),
}


def build(cls: type[OnPolicyAlgorithm], case: Case) -> OnPolicyAlgorithm:
    env = make_vec_env(case.env, n_envs=case.n_envs, seed=0)
    model = cls("MlpPolicy", env, seed=0, policy_kwargs=case.policy_kwargs, **case.kwargs)
    _, callback = model._setup_learn(total_timesteps=10**9, callback=None)
    return model, callback


def fill_identically(ours: OnPolicyAlgorithm, theirs: OnPolicyAlgorithm, callback: Any) -> None:
    """Collect one rollout with ``ours`` and give ``theirs`` the same weights and the same buffer."""
    theirs.policy.load_state_dict(ours.policy.state_dict())
    ours.collect_rollouts(ours.env, callback, ours.rollout_buffer, n_rollout_steps=ours.n_steps)
    for name in ("observations", "actions", "rewards", "returns", "episode_starts", "values", "log_probs", "advantages"):
        setattr(theirs.rollout_buffer, name, getattr(ours.rollout_buffer, name).copy())
    theirs.rollout_buffer.full = True
    theirs.rollout_buffer.pos = ours.rollout_buffer.pos


def run_case(name: str, case: Case, repeats: int) -> dict[str, Any]:
    import sb3_contrib

    th.manual_seed(0)
    ours, callback = build(sb3_trpo.TRPO, case)
    theirs, _ = build(sb3_contrib.TRPO, case)
    fill_identically(ours, theirs, callback)
    snapshots = {
        id(m): (copy.deepcopy(m.policy.state_dict()), copy.deepcopy(m.policy.optimizer.state_dict())) for m in (ours, theirs)
    }

    def restore(model: OnPolicyAlgorithm) -> None:
        state, optimizer = snapshots[id(model)]
        model.policy.load_state_dict(state)
        model.policy.optimizer.load_state_dict(optimizer)

    times: dict[str, list[float]] = {"sb3_trpo": [], "sb3_contrib": []}
    sections = Section()
    models = [("sb3_trpo", ours), ("sb3_contrib", theirs)]
    for rep in range(repeats + 1):  # the first round warms up and is not counted
        for label, model in models if rep % 2 == 0 else models[::-1]:
            restore(model)
            th.manual_seed(rep)
            np.random.seed(rep)
            start = time.perf_counter()
            model.train()
            if rep > 0:
                times[label].append(time.perf_counter() - start)
    # where the time goes inside sb3_trpo's train(), on separate (non-compared) calls
    with (
        sections.patched(sb3_trpo.policy_step, "conjugate_gradient", "conjugate gradient"),
        sections.patched(sb3_trpo.policy_step, "backtracking_line_search", "line search"),
        sections.patched(sb3_trpo.trpo.TRPO, "_policy_step", "policy step"),
        sections.patched(sb3_trpo.trpo.TRPO, "_critic_step", "critic step"),
    ):
        total = 0.0
        for _ in range(repeats):
            restore(ours)
            start = time.perf_counter()
            ours.train()
            total += time.perf_counter() - start
    policy = sections.seconds["policy step"]
    breakdown = {
        "gradient, max step and commit": policy - sections.seconds["conjugate gradient"] - sections.seconds["line search"],
        "conjugate gradient": sections.seconds["conjugate gradient"],
        "line search": sections.seconds["line search"],
        "critic step": sections.seconds["critic step"],
        "rest (batch, logging)": total - policy - sections.seconds["critic step"],
    }
    ours_ms = 1000 * statistics.median(times["sb3_trpo"])
    theirs_ms = 1000 * statistics.median(times["sb3_contrib"])
    return {
        "case": name,
        "ours_ms": ours_ms,
        "theirs_ms": theirs_ms,
        "ratio": theirs_ms / ours_ms,
        "breakdown": {k: 100 * v / total for k, v in breakdown.items()},
    }


def _fisher_product_ms(name: str, repeats: int) -> dict[str, float]:
    from torch.func import jvp

    from sb3_trpo.actor import mlp_fisher_product
    from sb3_trpo.fisher import JacobianFisherProduct, kl_hessian_vector_product, mean_kl_from

    model, callback = build(sb3_trpo.TRPO, CASES[name])
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)
    batch = model._rollout_batch()
    actor = model._get_actor_view(batch)
    obs, actions = batch.observations, batch.actions
    theta_old = actor.flat()
    theta = theta_old.clone().requires_grad_(True)
    params = actor.evaluate(theta, obs, actions).params

    def params_at(t: th.Tensor) -> tuple[th.Tensor, ...]:
        return actor.evaluate(t, obs, actions).params.tensors

    def forward_mode(v: th.Tensor) -> tuple[th.Tensor, ...]:
        return jvp(params_at, (theta_old,), (v,))[1]

    variants = {
        "double": kl_hessian_vector_product(
            mean_kl_from(params.detach(), lambda t: actor.evaluate(t, obs, actions).params), theta_old, 0.1
        ),
        "forward": JacobianFisherProduct(theta, params, 0.1, jvp=forward_mode),
        "reverse": JacobianFisherProduct(theta, params, 0.1),
        "written-out": mlp_fisher_product(actor, obs, 0.1),
    }
    v = th.randn_like(theta_old)
    ms = {}
    for label, product in variants.items():
        product(v)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            product(v)
            samples.append(time.perf_counter() - start)
        ms[label] = 1000 * statistics.median(samples)
    return ms


def fisher_variants(repeats: int) -> None:
    """Milliseconds per Fisher-vector product on the rollout of each MuJoCo-shaped case, computed four ways."""
    print("\nOne Fisher-vector product (ms, median), 2048 states, 6-D Gaussian policy:\n")
    print(
        "| network | double backprop through the KL (reference) | Jᵀ M J, J v in forward mode "
        "| Jᵀ M J, J v reverse-over-reverse (other policies) | Jᵀ M J written out for MLPs (used here) |"
    )
    print("|---|---|---|---|---|")
    for name in ("mujoco64", "mujoco256"):
        ms = _fisher_product_ms(name, repeats)
        width = name.removeprefix("mujoco")
        print(
            f"| {width}x{width} | {ms['double']:.2f} | {ms['forward']:.2f} | {ms['reverse']:.2f} | {ms['written-out']:.2f} |"
        )


def sub_sampling(repeats: int) -> None:
    """sb3_trpo's policy step (no critic) on the MuJoCo-shaped 64x64 case, for several sub_sampling_factor."""
    print("\nPolicy step vs sub_sampling_factor (MuJoCo-shaped, 64x64, n_critic_updates=0, ms, median):\n")
    print("| sub_sampling_factor | sb3_trpo | sb3_contrib | sb3_trpo speed-up over its own k=1 |")
    print("|---|---|---|---|")
    base = None
    for factor in (1, 2, 4, 8):
        case = CASES["mujoco64-policy"]
        result = run_case(
            f"k={factor}",
            Case(case.env, case.n_envs, {**case.kwargs, "sub_sampling_factor": factor}, case.policy_kwargs),
            repeats,
        )
        base = base or result["ours_ms"]
        print(f"| {factor} | {result['ours_ms']:.1f} | {result['theirs_ms']:.1f} | {base / result['ours_ms']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--fisher", action="store_true", help="compare the Fisher-vector product implementations")
    parser.add_argument("--sub-sampling", action="store_true", help="policy step time vs sub_sampling_factor")
    args = parser.parse_args()
    th.set_num_threads(1)
    import sb3_contrib

    # every output starts with the commit and versions it was measured at (benchmarks/README.md promises it)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(
        f"# commit {commit}, sb3_trpo {sb3_trpo.__version__}, sb3_contrib {sb3_contrib.__version__}, "
        f"torch {th.__version__}, python {platform.python_version()}, {args.repeats} timed calls per case, 1 thread"
    )
    if args.fisher:
        fisher_variants(args.repeats)
        return
    if args.sub_sampling:
        sub_sampling(args.repeats)
        return
    results = [run_case(name, CASES[name], args.repeats) for name in args.cases]
    print("\n| case | sb3_trpo train() (ms, median) | sb3_contrib train() (ms, median) | speed-up |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['ours_ms']:.1f} | {r['theirs_ms']:.1f} | {r['ratio']:.2f}x |")
    labels = list(results[0]["breakdown"])
    print("\nWhere sb3_trpo's train() spends its time (% of the call):\n")
    print("| case | " + " | ".join(labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    for r in results:
        print(f"| {r['case']} | " + " | ".join(f"{r['breakdown'][k]:.0f}%" for k in labels) + " |")


if __name__ == "__main__":
    main()
