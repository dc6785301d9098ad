"""A worker script for tests/test_distributed.py, launched with torchrun (one process per rank).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_worker.py MODE OUT_DIR

Modes:
- ``train``: data-parallel TRPO on CartPole-v1 (VecNormalize, TensorBoard, SB3's CheckpointCallback on every rank);
  each rank writes what it ended with to ``OUT_DIR/rank{R}.pt``.
- ``maskable``, ``recurrent``: MaskableTRPO or RecurrentTRPO in data-parallel training, parameters to
  ``OUT_DIR/rank{R}.pt``.
- ``uneven``: ranks with different numbers of environments (refused).
- ``update``: loads ``OUT_DIR/start.zip``, fills its rollout buffer with its share of ``OUT_DIR/rollout.npz``
  (environment column R), makes one ``train()`` call and writes its parameters to ``OUT_DIR/rank{R}.pt``
  (``WORKER_SETTINGS``: JSON of settings given to ``TRPO.load``, e.g. ``{"distributed_critic": "gradients"}``).
- ``recurrent_update``: as ``update``, for RecurrentTRPO or MaskableRecurrentTRPO (LSTM states and masks included).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback, ProgressBarCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import VecNormalize
from torch import distributed as dist

from sb3_trpo import TRPO
from sb3_trpo.distributed import raw_moments

BUFFER_FIELDS = ("observations", "actions", "rewards", "advantages", "returns", "episode_starts", "values", "log_probs")
TRAIN_TIMESTEPS = 12_288  # global: 6 iterations of 2 ranks x 2 envs x 512 steps


class FirstObservations(BaseCallback):
    """Records the observations this rank's environments started from and how many steps this rank collected."""

    def __init__(self) -> None:
        super().__init__()
        self.first: np.ndarray | None = None
        self.local_steps = 0

    def _on_training_start(self) -> None:
        self.first = np.array(self.model._last_obs)

    def _on_step(self) -> bool:
        self.local_steps += self.training_env.num_envs
        return True


class RolloutStarts(BaseCallback):
    """Records, at the start of every rollout, this rank's parameters and VecNormalize statistics (after the ranks'
    agreement: the same on every rank but in the first rollout, which starts after each rank's own reset)."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[dict] = []

    def _on_rollout_start(self) -> None:
        env = self.model.get_env()
        self.starts.append(
            {
                "parameters": flat_parameters(self.model),
                "obs_rms": raw_moments(env.obs_rms),
                "ret_rms": raw_moments(env.ret_rms),
            }
        )

    def _on_step(self) -> bool:
        return True


#: SB3's CheckpointCallback, given to every rank, as users write it: every 640 calls (in the 2nd, 3rd, 4th rollout, and
#: at the last step of the 5th, of 512 calls each)
CHECKPOINT_FREQ = 640


def flat_parameters(model: TRPO) -> th.Tensor:
    return th.cat([t.detach().reshape(-1).cpu() for t in model.policy.state_dict().values()])


def train(out: Path) -> None:
    env = VecNormalize(make_vec_env("CartPole-v1", n_envs=2), gamma=0.99)
    model = TRPO("MlpPolicy", env, n_steps=512, batch_size=128, seed=0, distributed=True, tensorboard_log=str(out / "tb"))
    initial = flat_parameters(model)
    callback = FirstObservations()
    starts = RolloutStarts()
    checkpoints = CheckpointCallback(CHECKPOINT_FREQ, str(out / "checkpoints"), save_vecnormalize=True)
    statistics_written: list[str] = []  # the VecNormalize files this rank writes
    save_statistics = VecNormalize.save
    VecNormalize.save = lambda self, path: statistics_written.append(str(path)) or save_statistics(self, path)  # type: ignore[method-assign]
    set_up = TRPO._init_callback
    callbacks: list[BaseCallback] = []
    # keep the callback learn() builds, to read its progress bar afterwards (patched on the class: the checkpoints
    # pickle the model's attributes)
    TRPO._init_callback = lambda self, *args, **kwargs: callbacks.append(set_up(self, *args, **kwargs)) or callbacks[-1]  # type: ignore[method-assign]
    model.learn(TRAIN_TIMESTEPS, callback=[callback, starts, checkpoints], progress_bar=True)
    TRPO._init_callback = set_up  # type: ignore[method-assign]
    VecNormalize.save = save_statistics  # type: ignore[method-assign]
    bars = [c for c in getattr(callbacks[0], "callbacks", []) if isinstance(c, ProgressBarCallback)]
    model.save(out / "model")
    env.training = False
    mean_return, _ = evaluate_policy(model, env, n_eval_episodes=5, deterministic=True)
    th.save(
        {
            "initial": initial,
            "final": flat_parameters(model),
            "num_timesteps": model.num_timesteps,
            "local_steps": callback.local_steps,
            "first_observations": callback.first,
            "obs_rms": (env.obs_rms.mean, env.obs_rms.var, env.obs_rms.count),
            "ret_rms": (env.ret_rms.mean, env.ret_rms.var, env.ret_rms.count),
            "mean_return": mean_return,
            "progress_bars": [bar.pbar.n for bar in bars],  # rank 0 alone shows one
            "rollout_starts": starts.starts,
            "statistics_written": statistics_written,
        },
        out / f"rank{dist.get_rank()}.pt",
    )


def update(out: Path) -> None:
    rank = int(dist.get_rank()) if dist.is_initialized() else int(os.environ["RANK"])
    rollout = np.load(out / "rollout.npz")
    n_steps = rollout["rewards"].shape[0]
    # a local minibatch of the local rollout by default: with two ranks, the global minibatch is the single process's
    settings = json.loads(os.environ.get("WORKER_SETTINGS", "{}"))
    model = TRPO.load(
        out / "start.zip",
        env=make_vec_env("CartPole-v1", n_envs=1),
        distributed=True,
        **{"batch_size": n_steps, **settings},
    )
    model.set_logger(Logger(folder=None, output_formats=[]))
    buffer = model.rollout_buffer
    for name in BUFFER_FIELDS:
        getattr(buffer, name)[:] = rollout[name][:, rank : rank + 1]
    buffer.pos, buffer.full, buffer.generator_ready = buffer.buffer_size, True, False
    model.train()
    th.save({"final": flat_parameters(model), "logged": dict(model.logger.name_to_value)}, out / f"rank{rank}.pt")


def maskable(out: Path) -> None:
    """MaskableTRPO in data-parallel training: the ranks' masked rollouts make one update."""
    from sb3_contrib.common.envs import InvalidActionEnvDiscrete

    from sb3_trpo import MaskableTRPO

    env = make_vec_env(lambda: InvalidActionEnvDiscrete(dim=10, n_invalid_actions=7), n_envs=2)
    model = MaskableTRPO("MlpPolicy", env, n_steps=128, batch_size=128, seed=0, distributed=True)
    initial = flat_parameters(model)
    model.learn(2 * 2 * 128 * 3)
    result = {"initial": initial, "final": flat_parameters(model), "num_timesteps": model.num_timesteps}
    th.save(result, out / f"rank{dist.get_rank()}.pt")


def recurrent(out: Path) -> None:
    """RecurrentTRPO in data-parallel training: the ranks' padded sequences (of different real lengths) make one
    update."""
    from sb3_trpo import RecurrentTRPO

    env = make_vec_env("CartPole-v1", n_envs=2)
    kwargs = dict(n_steps=64, batch_size=64, seed=0, policy_kwargs=dict(lstm_hidden_size=8, net_arch=[8]))
    model = RecurrentTRPO("MlpLstmPolicy", env, distributed=True, **kwargs)
    initial = flat_parameters(model)
    model.learn(2 * 2 * 64 * 3)
    result = {"initial": initial, "final": flat_parameters(model), "num_timesteps": model.num_timesteps}
    th.save(result, out / f"rank{dist.get_rank()}.pt")


def uneven(out: Path) -> None:
    """Rollouts of one size from different numbers of environments (rank 0: 2 x 64 steps, rank 1: 1 x 128): refused,
    on every rank, with the message written to ``OUT_DIR/rank{R}.pt``."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    n_envs = 2 - rank
    model = TRPO(
        "MlpPolicy", make_vec_env("CartPole-v1", n_envs=n_envs), n_steps=128 // n_envs, batch_size=64, distributed=True
    )
    try:
        model.learn(256)
        message = None
    except ValueError as error:
        message = str(error)
    th.save({"message": message}, out / f"rank{rank}.pt")


RECURRENT_FIELDS = ("hidden_states_pi", "cell_states_pi", "hidden_states_vf", "cell_states_vf")


def recurrent_update(out: Path) -> None:
    """As ``update``, for RecurrentTRPO (or, with ``WORKER_SETTINGS={"algorithm": "MaskableRecurrentTRPO"}``, the
    maskable recurrent class, the rollout's masks included): this rank's environment column of the rollout (LSTM
    states included), cut into sequences at episode starts only (the buffer's random split fixed at 0, as in the
    single process)."""
    import sb3_trpo

    np.random.randint = lambda *args, **kwargs: 0  # type: ignore[assignment]  # the buffer's split point
    rank = int(dist.get_rank()) if dist.is_initialized() else int(os.environ["RANK"])
    rollout = np.load(out / "rollout.npz")
    n_steps = rollout["rewards"].shape[0]
    algorithm = getattr(sb3_trpo, json.loads(os.environ.get("WORKER_SETTINGS", "{}")).get("algorithm", "RecurrentTRPO"))
    env = make_vec_env("CartPole-v1", n_envs=1)  # the spaces only: the rollout is given
    model = algorithm.load(out / "start.zip", env=env, distributed=True, batch_size=n_steps)
    model.set_logger(Logger(folder=None, output_formats=[]))
    buffer = model.rollout_buffer
    for name in BUFFER_FIELDS:
        getattr(buffer, name)[:] = rollout[name][:, rank : rank + 1]
    for name in RECURRENT_FIELDS:  # (n_steps, layers, n_envs, hidden)
        getattr(buffer, name)[:] = rollout[name][:, :, rank : rank + 1]
    if "action_masks" in rollout:  # (n_steps, n_envs, mask size)
        buffer.action_masks[:] = rollout["action_masks"][:, rank : rank + 1]
    buffer.pos, buffer.full, buffer.generator_ready = buffer.buffer_size, True, False
    model.train()
    th.save({"final": flat_parameters(model), "logged": dict(model.logger.name_to_value)}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    th.set_num_threads(1)
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    modes = {"train": train, "update": update, "maskable": maskable, "recurrent": recurrent, "uneven": uneven}
    {**modes, "recurrent_update": recurrent_update}[mode](out_dir)
    if dist.is_initialized():
        # Every rank past its last collective before any closes its connections: without this barrier, a rank of the
        # short `update` mode sometimes died with SIGABRT ("terminate called without an active exception": 1 run in
        # 15 here, once in CI); with it, 0 in 30 under pytest and 0 in 80 launched directly.
        dist.barrier()
        dist.destroy_process_group()
    # the results are on disk: leave without the interpreter's teardown too, in case gloo's threads abort there
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
