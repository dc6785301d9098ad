"""Measure how well each TRPO implementation keeps its trust region.

For every update of a training run, the KL(old || new) between the policy before and after ``train()`` is
measured on every state of the rollout with ``torch.distributions`` (independently of either
implementation's own KL code), each state's KL summed over its action dimensions. Reported per run: the
largest mean KL of an update (what the trust region bounds), the largest single-state KL seen, and the
fraction of updates whose mean KL exceeded ``target_kl``.

    python benchmarks/trust_region.py --env Pendulum-v1 --timesteps 50000 --seeds 0 1 2
"""

import argparse
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.utils import obs_as_tensor

import sb3_trpo

# rl-zoo3's TRPO settings for the MuJoCo tasks
MUJOCO = dict(
    n_envs=2,
    kwargs=dict(
        batch_size=128, n_steps=1024, gamma=0.99, gae_lambda=0.95, cg_max_steps=25, cg_damping=0.1, n_critic_updates=20
    ),
)
# settings per environment: the defaults for CartPole, rl-zoo3-like ones for the continuous tasks
SETTINGS: dict[str, dict] = {
    "CartPole-v1": dict(n_envs=1, kwargs={}),
    "Pendulum-v1": dict(n_envs=2, kwargs=dict(gamma=0.9, n_steps=1024, use_sde=True, sde_sample_freq=4)),
    "HalfCheetah-v5": MUJOCO,
    "Hopper-v5": MUJOCO,
}


@dataclass
class RunKL:
    updates: int
    accepted: int
    max_mean_kl: float
    max_state_kl: float
    over_target: int
    final_mean_return: float
    seconds: float


def _torch_distributions(policy: ActorCriticPolicy, obs: th.Tensor) -> list[th.distributions.Distribution]:
    with th.no_grad():
        dist = policy.get_distribution(obs).distribution
    return list(dist) if isinstance(dist, list) else [dist]


def _per_state_kl(old: list[th.distributions.Distribution], new: list[th.distributions.Distribution]) -> th.Tensor:
    total: th.Tensor | float = 0.0
    for p, q in zip(old, new, strict=True):
        kl = th.distributions.kl_divergence(p, q)
        total = total + (kl.sum(dim=-1) if kl.dim() > 1 else kl)
    assert isinstance(total, th.Tensor)
    return total


def measure(make_model: Callable[[], object], timesteps: int, target_kl: float) -> RunKL:
    model = make_model()
    mean_kls: list[float] = []
    state_kls: list[float] = []
    train = model.train  # type: ignore[attr-defined]

    def measured_train() -> None:
        buffer = model.rollout_buffer  # type: ignore[attr-defined]
        obs_shape = buffer.obs_shape
        obs = obs_as_tensor(buffer.observations.reshape(-1, *obs_shape), model.device)  # type: ignore[attr-defined]
        before = _torch_distributions(model.policy, obs)  # type: ignore[attr-defined]
        train()
        kl = _per_state_kl(before, _torch_distributions(model.policy, obs))  # type: ignore[attr-defined]
        mean_kls.append(kl.mean().item())
        state_kls.append(kl.max().item())

    model.train = measured_train  # type: ignore[attr-defined]
    start = time.perf_counter()
    model.learn(timesteps)  # type: ignore[attr-defined]
    seconds = time.perf_counter() - start
    episodes = [info["r"] for info in model.ep_info_buffer]  # type: ignore[attr-defined]
    return RunKL(
        updates=len(mean_kls),
        accepted=sum(kl > 0 for kl in mean_kls),
        max_mean_kl=max(mean_kls),
        max_state_kl=max(state_kls),
        over_target=sum(kl > target_kl * (1 + 1e-4) for kl in mean_kls),
        final_mean_return=float(np.mean(episodes)) if episodes else float("nan"),
        seconds=seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Pendulum-v1", choices=sorted(SETTINGS))
    parser.add_argument("--timesteps", type=int, default=50_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target-kl", type=float, default=0.01)
    args = parser.parse_args()
    th.set_num_threads(1)

    import sb3_contrib  # benchmark extra, never imported by sb3_trpo itself

    implementations = {"sb3_trpo": sb3_trpo.TRPO, "sb3_contrib": sb3_contrib.TRPO}
    setting = SETTINGS[args.env]
    action_space = gym.make(args.env).action_space
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {args.env} (actions: {action_space}), {args.timesteps} steps, target_kl={args.target_kl}")
    print(
        f"# commit {commit}, sb3_trpo {sb3_trpo.__version__}, sb3_contrib {sb3_contrib.__version__}, "
        f"torch {th.__version__}, python {platform.python_version()}"
    )
    print(
        "| implementation | seed | updates | accepted | max mean KL | max single-state KL | updates over target | "
        "mean episode return (last 100) | time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        for name, cls in implementations.items():

            def make(cls=cls, seed=seed):  # noqa: ANN001
                env = make_vec_env(args.env, n_envs=setting["n_envs"], seed=seed)
                return cls("MlpPolicy", env, seed=seed, target_kl=args.target_kl, **setting["kwargs"])

            r = measure(make, args.timesteps, args.target_kl)
            print(
                f"| {name} | {seed} | {r.updates} | {r.accepted} | {r.max_mean_kl:.5f} | {r.max_state_kl:.4f} | "
                f"{r.over_target} | {r.final_mean_return:.1f} | {r.seconds:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
