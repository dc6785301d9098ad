"""Small environments and policies shared by the tests."""

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.utils import obs_as_tensor


class RandomEnv(gym.Env):
    """Observations drawn at random from ``observation_space``; reward favours actions near a fixed target.

    Works with any observation/action space SB3 can handle, for tests that exercise spaces, not learning.
    """

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, ep_length: int = 20) -> None:
        self.observation_space = observation_space
        self.action_space = action_space
        self.ep_length = ep_length
        self._steps = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        if seed is not None:  # seed(None) would draw fresh entropy at every automatic reset: runs not reproducible
            self.observation_space.seed(seed)
            self.action_space.seed(seed)
        self._steps = 0
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        self._steps += 1
        flat = np.asarray(action, dtype=np.float64).ravel()
        reward = float(-np.abs(flat - 0.5).mean())
        return self.observation_space.sample(), reward, False, self._steps >= self.ep_length, {}


BOX_OBS = spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)

ACTION_SPACES: dict[str, spaces.Space] = {
    "discrete": spaces.Discrete(3),
    "box": spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32),
    "multidiscrete": spaces.MultiDiscrete([2, 3]),
    "multibinary": spaces.MultiBinary(3),
}


class NaNAfter(gym.Wrapper):
    """Turns the observation of the ``at``-th step (counted across episodes) into NaN."""

    def __init__(self, env: gym.Env, at: int) -> None:
        super().__init__(env)
        self.at, self.count = at, 0

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.count += 1
        return (obs * np.nan if self.count == self.at else obs), reward, terminated, truncated, info


def tiny_policy(action_space: spaces.Space, seed: int = 0, **kwargs: Any) -> ActorCriticPolicy:
    """A small actor-critic policy on 3-D observations (the critic kept apart from the actor).

    The distribution heads are re-initialized with a larger gain so the distributions are far from uniform,
    which makes the Fisher matrix less degenerate and the comparisons more telling.
    """
    th.manual_seed(seed)
    kwargs.setdefault("net_arch", dict(pi=[5], vf=[4]))
    policy = ActorCriticPolicy(BOX_OBS, action_space, lambda _: 1e-3, **kwargs)
    with th.no_grad():
        for param in policy.action_net.parameters():
            param.normal_(0.0, 0.8)
        if hasattr(policy, "log_std"):
            policy.log_std.uniform_(-0.5, 0.3)
    return policy


def sample_batch(policy: ActorCriticPolicy, n: int = 16, seed: int = 0) -> tuple[th.Tensor, th.Tensor]:
    """Observations and actions sampled from ``policy`` (actions in the shape ``log_prob`` expects)."""
    BOX_OBS.seed(seed)
    obs = obs_as_tensor(np.stack([BOX_OBS.sample() for _ in range(n)]), policy.device)
    th.manual_seed(seed)
    with th.no_grad():
        actions = policy.get_distribution(obs).sample()
    return obs, actions


def torch_distributions(policy: ActorCriticPolicy, obs: th.Tensor) -> list[th.distributions.Distribution]:
    """The torch.distributions behind an SB3 policy's action distribution, as a list of independent parts."""
    with th.no_grad():
        dist = policy.get_distribution(obs).distribution
    return list(dist) if isinstance(dist, list) else [dist]


def reference_kl(old: list[th.distributions.Distribution], new: list[th.distributions.Distribution]) -> th.Tensor:
    """Per-state KL(old || new) computed by torch.distributions, summed over independent parts and dimensions.

    Independent of sb3_trpo's own KL code, so tests can check it.
    """
    total = th.zeros(())
    for p, q in zip(old, new, strict=True):
        kl = th.distributions.kl_divergence(p, q)
        total = total + (kl.sum(dim=-1) if kl.dim() > 1 else kl)
    return total


def import_sb3_contrib() -> ModuleType:
    """sb3-contrib, for the drop-in tests. It is a dev dependency: in CI (``CI`` set) its absence fails the test
    instead of silently skipping the comparison; elsewhere the test is skipped."""
    if os.environ.get("CI"):
        return importlib.import_module("sb3_contrib")
    return pytest.importorskip("sb3_contrib")


def launcher_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment to launch torchrun with from a test: this one, the repository on ``PYTHONPATH`` (for the
    ``tests`` modules), ``extra``, and none of the variables torchrun sets for its workers.

    :param extra: variables to add
    """
    from pathlib import Path

    from sb3_trpo.distributed import LAUNCHER_VARIABLES

    root = str(Path(__file__).resolve().parent.parent)
    environment = {**os.environ, **(extra or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    for name in LAUNCHER_VARIABLES:  # the launcher sets these for its workers; none may leak in from outside
        environment.pop(name, None)
    return environment


def free_port() -> int:
    """:return: a TCP port on the loopback interface that nothing listens on (for a rendezvous endpoint)"""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch_two_nodes(command: list[str], env: dict[str, str], cwd: str, timeout: float = 300) -> list[Any]:
    """Run ``command`` as two one-process "nodes" on this machine, as two machines would be launched, over loopback:
    ``torchrun --nnodes=2 --node-rank=R --nproc_per_node=1 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT``.

    :param command: what torchrun runs (a script and its arguments, or ``-m module ...``)
    :param env: the environment of both launches
    :param cwd: their working directory
    :return: the two ``subprocess.CompletedProcess`` results, node 0's first
    """
    import subprocess
    import sys
    import uuid

    port, run_id = free_port(), uuid.uuid4().hex
    launches = [
        subprocess.Popen(
            [
                *[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}"],
                *["--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}"],
                *command,
            ],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in range(2)
    ]
    results = []
    for launch in launches:
        stdout, stderr = launch.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(launch.args, launch.returncode, stdout, stderr))
    return results


def without_embedded_statistics(model_file: "os.PathLike[str] | str") -> None:
    """Rewrite a run's model file as runs made before the models carried their VecNormalize statistics inside."""
    import zipfile

    from sb3_trpo.cli.runs import STATISTICS_MEMBER

    with zipfile.ZipFile(model_file) as archive:
        members = {name: archive.read(name) for name in archive.namelist() if name != STATISTICS_MEMBER}
    with zipfile.ZipFile(model_file, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)


def run_cli(*argv: str, env: dict[str, str] | None = None) -> "subprocess.CompletedProcess[str]":
    """``python -m sb3_trpo ARGV`` in a subprocess from the repository's root, with ``env`` added to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "sb3_trpo", *argv],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
