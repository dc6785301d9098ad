"""Data-parallel training: 2 processes launched by torchrun (gloo, loopback), and the single-process fallbacks."""

import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import Logger

from sb3_trpo import TRPO, load_latest_checkpoint
from sb3_trpo.distributed import (
    LAUNCHER_VARIABLES,
    Replica,
    cuda_device_for_process,
    gpu_for_process,
    raw_moments,
    set_from_raw_moments,
)
from tests.distributed_worker import BUFFER_FIELDS, CHECKPOINT_FREQ, TRAIN_TIMESTEPS, flat_parameters
from tests.helpers import launch_two_nodes, launcher_environment

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
ROOT = WORKER.parent.parent


def launch(mode: str, out: Path, settings: dict | None = None) -> None:
    """Run the worker script on 2 local processes with torchrun, as a user would."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*launcher, str(WORKER), mode, str(out)]
    env = launcher_environment({"WORKER_SETTINGS": json.dumps(settings or {})})
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def load_ranks(out: Path) -> list[dict]:
    return [th.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("distributed_train")
    launch("train", out)
    return out, load_ranks(out)


def test_two_processes_train_cartpole_with_identical_parameters(trained):
    _, (rank0, rank1) = trained
    assert th.equal(rank0["initial"], rank1["initial"])  # rank 0's initial parameters were broadcast
    assert th.equal(rank0["final"], rank1["final"])  # bit-identical after training
    assert not th.equal(rank0["initial"], rank0["final"])
    assert rank0["mean_return"] >= 200  # CartPole learns: a random policy scores about 20


def test_two_nodes_over_loopback_train_what_two_processes_of_one_node_train(trained, tmp_path):
    # the multi-machine launch, run for real: two torchrun launches with --nnodes=2 and a c10d rendezvous, one
    # process each, as on two machines (over loopback here)
    for node in launch_two_nodes([str(WORKER), "train", str(tmp_path)], launcher_environment(), str(ROOT)):
        assert node.returncode == 0, node.stdout[-3000:] + node.stderr[-3000:]
    _, one_node = trained
    two_nodes = load_ranks(tmp_path)
    assert th.equal(two_nodes[0]["final"], two_nodes[1]["final"])
    for a, b in zip(one_node, two_nodes, strict=True):  # rank by rank: the same data, the same reductions
        assert th.equal(a["final"], b["final"])
        assert a["num_timesteps"] == b["num_timesteps"]
        for key in ("obs_rms", "ret_rms"):
            for x, y in zip(a[key], b[key], strict=True):
                np.testing.assert_array_equal(x, y)


def test_total_timesteps_is_the_global_budget(trained):
    _, ranks = trained
    for rank in ranks:
        assert rank["num_timesteps"] == TRAIN_TIMESTEPS  # every rank counts the samples of both
        assert rank["local_steps"] == TRAIN_TIMESTEPS // 2  # each collected half of them


def test_the_progress_bar_of_rank_0_counts_the_samples_of_all_ranks(trained):
    _, (rank0, rank1) = trained
    assert rank0["progress_bars"] == [TRAIN_TIMESTEPS]  # the global budget, reached
    assert rank1["progress_bars"] == []  # one bar, not one per rank


def test_each_rank_seeds_its_environments_differently(trained):
    _, (rank0, rank1) = trained
    assert not np.allclose(rank0["first_observations"], rank1["first_observations"])


def test_vec_normalize_statistics_are_merged_across_ranks(trained):
    _, (rank0, rank1) = trained
    for key in ("obs_rms", "ret_rms"):
        for a, b in zip(rank0[key], rank1[key], strict=True):
            np.testing.assert_array_equal(a, b)
    # every observation of both ranks counted once: the 2 x 2 reset observations, then every step
    assert rank0["obs_rms"][2] == pytest.approx(TRAIN_TIMESTEPS + 4, abs=1e-3)
    assert rank0["ret_rms"][2] == pytest.approx(TRAIN_TIMESTEPS, abs=1e-3)


def test_only_rank_0_logs_and_its_checkpoint_loads_in_a_single_process(trained):
    out, (rank0, _) = trained
    assert [p.name for p in (out / "tb").iterdir()] == ["TRPO_1"]  # one TensorBoard run, not one per rank
    model = TRPO.load(out / "model.zip")
    assert model.distributed is False  # an ordinary model
    assert th.equal(flat_parameters(model), rank0["final"])
    obs = make_vec_env("CartPole-v1", n_envs=1).reset()
    model.predict(obs, deterministic=True)


def test_checkpoint_callback_on_every_rank_writes_once_the_state_of_the_rollout_start(trained):
    """SB3's CheckpointCallback(save_vecnormalize=True) given to every rank, saving in the middle of rollouts: rank 0
    alone writes, the statistics are those all ranks agreed on, and the model is the state they go with."""
    out, (rank0, rank1) = trained
    folder = out / "checkpoints"
    rollout = 2 * 2 * 512  # global samples per rollout: 2 ranks x 2 envs x 512 steps
    # call k of the callback is step k of every rank: the global count is the rollout start plus 2 x 2 per step
    calls = range(CHECKPOINT_FREQ, TRAIN_TIMESTEPS // 4 + 1, CHECKPOINT_FREQ)
    names = [(call - 1) // 512 * rollout + 4 * ((call - 1) % 512 + 1) for call in calls]
    assert names == [2560, 5120, 7680, 10240]
    assert rank1["statistics_written"] == []  # not once per rank
    assert rank0["statistics_written"] == [str(folder / f"rl_model_vecnormalize_{name}_steps.pkl") for name in names]
    for call, name in zip(calls, names, strict=True):
        start = (call - 1) // 512  # the rollout the callback saved in
        with zipfile.ZipFile(folder / f"rl_model_{name}_steps.zip") as archive:
            assert json.loads(archive.read("data"))["num_timesteps"] == start * rollout
        # rank 1's own statistics at that rollout's start: the agreed ones, independently of rank 0's view
        agreed = rank1["rollout_starts"][start]
        with open(folder / f"rl_model_vecnormalize_{name}_steps.pkl", "rb") as file:
            saved = pickle.load(file)
        for key in ("obs_rms", "ret_rms"):
            np.testing.assert_allclose(raw_moments(getattr(saved, key)), agreed[key], rtol=1e-6)
        assert saved.obs_rms.count == pytest.approx(start * rollout + 4, abs=1e-3)  # both ranks' samples and resets
    # the latest resumes from its rollout's start: its parameters, statistics and count go together
    model = load_latest_checkpoint(folder, make_vec_env("CartPole-v1", n_envs=2))
    assert model is not None
    assert model.num_timesteps == 4 * rollout
    assert th.equal(flat_parameters(model), rank1["rollout_starts"][4]["parameters"])
    np.testing.assert_allclose(raw_moments(model.get_env().obs_rms), rank1["rollout_starts"][4]["obs_rms"], rtol=1e-6)


def test_ranks_with_different_numbers_of_environments_are_refused(tmp_path):
    # the same rollout size from 2 x 64 and 1 x 128 steps: seeds seed + rank * n_envs would overlap, and a rank's step
    # would not be a step of all
    launch("uneven", tmp_path)
    for rank in load_ranks(tmp_path):
        assert rank["message"] is not None
        assert "Every rank must have the same n_steps and number of environments" in rank["message"]


def test_two_ranks_with_half_the_data_take_the_single_process_update(tmp_path):
    n_steps = 64
    model = TRPO(
        "MlpPolicy",
        make_vec_env("CartPole-v1", n_envs=2, seed=0),
        n_steps=n_steps,
        batch_size=2 * n_steps,  # one critic minibatch: the whole rollout (each rank: its half)
        n_critic_updates=2,
        seed=0,
    )
    model.learn(2 * n_steps)  # one rollout and one update, then a fresh rollout is collected below
    callback = model._init_callback(None)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_steps)
    model.save(tmp_path / "start")
    np.savez(tmp_path / "rollout.npz", **{name: getattr(model.rollout_buffer, name) for name in BUFFER_FIELDS})

    model.set_logger(Logger(folder=None, output_formats=[]))
    model.train()
    launch("update", tmp_path)

    rank0, rank1 = load_ranks(tmp_path)
    assert th.equal(rank0["final"], rank1["final"])
    start = flat_parameters(TRPO.load(tmp_path / "start.zip"))
    single = flat_parameters(model)
    assert not th.allclose(single, start)  # the update moved the parameters
    logged = dict(model.logger.name_to_value)
    for key in ("train/step_size", "train/kl_divergence_loss", "train/surrogate_improvement", "train/value_loss"):
        assert rank0["logged"][key] == pytest.approx(logged[key], rel=1e-4), key
    # the entropy of the global batch (rank-local entropies differ from it by about 2e-4 here)
    assert rank0["logged"]["train/entropy"] == rank1["logged"]["train/entropy"]
    assert rank0["logged"]["train/entropy"] == pytest.approx(logged["train/entropy"], rel=1e-6)
    th.testing.assert_close(rank0["final"], single, rtol=1e-4, atol=1e-5)


def test_the_gathered_critic_regression_is_the_regression_of_all_reduced_minibatch_gradients(tmp_path):
    # several minibatches per epoch: the order of the SGD steps and each minibatch's composition show in the result
    n_steps = 64
    model = TRPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), n_steps=n_steps, n_critic_updates=5, seed=0)
    model.learn(2 * n_steps)
    model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, n_steps)
    model.save(tmp_path / "start")
    np.savez(tmp_path / "rollout.npz", **{name: getattr(model.rollout_buffer, name) for name in BUFFER_FIELDS})
    results = {}
    for mode in ("gather", "gradients"):
        launch("update", tmp_path, {"distributed_critic": mode, "batch_size": 12})  # 6 minibatches, the last of 4
        results[mode] = load_ranks(tmp_path)
        assert th.equal(results[mode][0]["final"], results[mode][1]["final"])
    gather, gradients = results["gather"][0], results["gradients"][0]
    # the same update, up to float summation order (the same minibatches in reverse order differ by 5e-3 here)
    th.testing.assert_close(gather["final"], gradients["final"], rtol=1e-5, atol=1e-6)
    assert gather["logged"]["train/value_loss"] == pytest.approx(gradients["logged"]["train/value_loss"], rel=1e-5)
    # the critic's all-reduces (5 epochs x 6 minibatch gradients, then the mean loss) become two all-gathers (the
    # data, the minibatch orders)
    assert gradients["logged"]["distributed/all_reduces"] - gather["logged"]["distributed/all_reduces"] == 5 * 6 + 1
    assert gather["logged"]["distributed/all_gathers"] == 2
    assert gradients["logged"]["distributed/all_gathers"] == 0
    start = flat_parameters(TRPO.load(tmp_path / "start.zip"))
    assert not th.allclose(gather["final"], start)


def test_maskable_trpo_trains_data_parallel_with_identical_parameters(tmp_path):
    pytest.importorskip("sb3_contrib")
    launch("maskable", tmp_path)
    ranks = load_ranks(tmp_path)
    assert th.equal(ranks[0]["final"], ranks[1]["final"])
    assert not th.equal(ranks[0]["initial"], ranks[0]["final"])
    assert ranks[0]["num_timesteps"] == ranks[1]["num_timesteps"] == 2 * 2 * 128 * 3


def test_recurrent_trpo_trains_data_parallel_with_identical_parameters(tmp_path):
    pytest.importorskip("sb3_contrib")
    launch("recurrent", tmp_path)
    ranks = load_ranks(tmp_path)
    assert th.equal(ranks[0]["final"], ranks[1]["final"])
    assert not th.equal(ranks[0]["initial"], ranks[0]["final"])
    assert ranks[0]["num_timesteps"] == ranks[1]["num_timesteps"] == 2 * 2 * 64 * 3


class LeanMasks(gym.Wrapper):
    """CartPole whose "push left" is illegal while the pole leans right by more than 0.02 rad: masks that change within
    episodes of different lengths."""

    def action_masks(self) -> np.ndarray:
        return np.array([self.env.unwrapped.state[2] <= 0.02, True])


@pytest.mark.parametrize("algorithm", ["RecurrentTRPO", "MaskableRecurrentTRPO"])
def test_recurrent_ranks_with_half_the_data_take_the_single_process_update(algorithm, tmp_path, monkeypatch):
    """The ranks' episodes end at different steps, so their sequences and padded batches differ in number and
    length; with padding that never counts (its masks included), two ranks still take the one-process update."""
    pytest.importorskip("sb3_contrib")
    import sb3_trpo
    from tests.distributed_worker import RECURRENT_FIELDS

    n_steps = 64
    masked = algorithm == "MaskableRecurrentTRPO"
    model = getattr(sb3_trpo, algorithm)(
        "MlpLstmPolicy",
        make_vec_env("CartPole-v1", n_envs=2, seed=0, wrapper_class=LeanMasks if masked else None),
        n_steps=n_steps,
        batch_size=2 * n_steps,  # one critic minibatch: the whole rollout (each rank: its half)
        n_critic_updates=2,
        seed=0,
        policy_kwargs=dict(lstm_hidden_size=8, net_arch=[8]),
    )
    model.learn(2 * n_steps)
    callback = model._init_callback(None)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_steps)
    model.save(tmp_path / "start")
    fields = (*BUFFER_FIELDS, *RECURRENT_FIELDS, *(["action_masks"] if masked else []))
    np.savez(tmp_path / "rollout.npz", **{name: getattr(model.rollout_buffer, name) for name in fields})
    starts = model.rollout_buffer.episode_starts
    assert not np.array_equal(starts[:, 0], starts[:, 1]), "the ranks should hold different episode structures"
    if masked:
        masks = model.rollout_buffer.action_masks
        assert 0 < (masks[..., 0] == 0).sum() < masks[..., 0].size, "the masks should change within the rollout"

    monkeypatch.setattr(np.random, "randint", lambda *args, **kwargs: 0)  # sequences cut at episode starts only
    model.set_logger(Logger(folder=None, output_formats=[]))
    model.train()
    launch("recurrent_update", tmp_path, {"algorithm": algorithm})

    rank0, rank1 = load_ranks(tmp_path)
    assert th.equal(rank0["final"], rank1["final"])
    single = flat_parameters(model)
    assert not th.allclose(single, flat_parameters(type(model).load(tmp_path / "start.zip")))
    logged = dict(model.logger.name_to_value)
    for key in ("train/step_size", "train/kl_divergence_loss", "train/surrogate_improvement", "train/value_loss"):
        assert rank0["logged"][key] == pytest.approx(logged[key], rel=1e-4), key
    # the entropy of the global batch (rank-local entropies differ from it by about 2e-4 here)
    assert rank0["logged"]["train/entropy"] == rank1["logged"]["train/entropy"]
    assert rank0["logged"]["train/entropy"] == pytest.approx(logged["train/entropy"], rel=1e-6)
    th.testing.assert_close(rank0["final"], single, rtol=1e-4, atol=1e-5)


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_distributed_true_without_a_launcher_says_how_to_launch(no_launcher):
    with pytest.raises(RuntimeError, match=r"distributed=True.*RANK.*torchrun --nproc_per_node=M.*distributed=\"auto\""):
        TRPO("MlpPolicy", "CartPole-v1", distributed=True)


def test_distributed_auto_without_a_launcher_runs_as_one_process(no_launcher, tmp_path):
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, distributed="auto", seed=0)
    model.learn(128)
    assert model._replica.world_size == 1
    assert model.num_timesteps == 128
    alone = TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, seed=0).learn(128)
    assert th.equal(flat_parameters(model), flat_parameters(alone))  # exactly the single-process algorithm


def test_distributed_passed_to_load_is_checked(tmp_path):
    TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64).save(tmp_path / "model")
    with pytest.raises(ValueError, match=r"distributed='yes' is not allowed: distributed must be True, False or \"auto\""):
        TRPO.load(tmp_path / "model", distributed="yes")


def test_merged_raw_moments_are_the_statistics_of_all_samples():
    from stable_baselines3.common.running_mean_std import RunningMeanStd

    rng = np.random.default_rng(0)
    start, batches = rng.normal(3.0, 2.0, (50, 2)), [rng.normal(-1.0, 0.5, (30, 2)), rng.normal(5.0, 1.0, (20, 2))]
    common = RunningMeanStd(shape=(2,))
    common.update(start)
    since = raw_moments(common)
    ranks = []
    for batch in batches:  # each rank updates its copy of the common statistics with its own samples
        stat = RunningMeanStd(shape=(2,))
        set_from_raw_moments(stat, since)
        stat.update(batch)
        ranks.append(raw_moments(stat))
    merged = RunningMeanStd(shape=(2,))
    set_from_raw_moments(merged, since + sum(r - since for r in ranks))
    one_process = RunningMeanStd(shape=(2,))  # what a single process that saw every sample would hold
    for samples in (start, *batches):
        one_process.update(samples)
    np.testing.assert_allclose(merged.mean, one_process.mean, rtol=1e-10)
    np.testing.assert_allclose(merged.var, one_process.var, rtol=1e-10)
    assert merged.count == pytest.approx(one_process.count, rel=1e-12)


def test_a_single_replica_reduces_to_the_identity():
    replica = Replica.alone()
    x = th.randn(5)
    assert replica.mean(x) is x
    assert replica.sum(x) is x
    mean, std = replica.mean_and_std(x)
    assert th.equal(mean, x.mean())
    assert th.equal(std, x.std())
    assert replica.mean_of_floats([1.0, 2.0], th.device("cpu")) == [1.0, 2.0]
    assert replica.all_agree(3, th.device("cpu"))
    assert replica.bytes_reduced == 0


@pytest.mark.parametrize(
    ("local_rank", "processes", "gpus", "device", "backend"),
    [
        (0, 1, 1, "cuda:0", "nccl"),
        (1, 2, 2, "cuda:1", "nccl"),  # one GPU per process
        (3, 4, 8, "cuda:3", "nccl"),  # fewer processes than GPUs
        (0, 2, 1, "cuda:0", "gloo"),  # two processes share one GPU: nccl would refuse it
        (1, 2, 1, "cuda:0", "gloo"),
        (2, 3, 2, "cuda:0", "gloo"),  # round-robin
    ],
)
def test_processes_spread_over_the_gpus_and_share_them_over_gloo(local_rank, processes, gpus, device, backend):
    assert gpu_for_process(local_rank, processes, gpus) == (th.device(device), backend)


@pytest.mark.parametrize(
    ("requested", "local_rank", "processes", "gpus", "device", "backend"),
    [
        ("cuda", 1, 2, 2, "cuda:1", "nccl"),  # spread over the GPUs
        ("cuda:1", 0, 1, 2, "cuda:1", None),  # one process on the machine: the GPU it names
        ("cuda:0", 1, 2, 2, None, None),  # two processes would both take cuda:0: refused
        ("cuda:1", 0, 4, 8, None, None),
    ],
)
def test_the_device_each_rank_takes(requested, local_rank, processes, gpus, device, backend):
    if device is None:
        with pytest.raises(ValueError, match=rf'device="{requested}" names one GPU, which all {processes} processes'):
            cuda_device_for_process(th.device(requested), local_rank, processes, gpus)
    else:
        chosen = cuda_device_for_process(th.device(requested), local_rank, processes, gpus)
        assert chosen == (th.device(device), backend)


def test_a_process_that_sees_no_gpu_is_told_what_to_pass():
    with pytest.raises(RuntimeError, match=r'sees no CUDA device: pass device="cpu"'):
        gpu_for_process(0, 2, 0)


class _GroupJoinedError(Exception):
    """Raised by the fake process-group set-up, to stop before anything is put on the (absent) GPU."""


def test_two_processes_on_a_machine_with_one_gpu_share_it_and_may_not_both_name_it(monkeypatch):
    import sb3_trpo.data_parallel

    launcher = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    for name, value in {**launcher, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(th.cuda, "is_available", lambda: True)  # SB3 would otherwise turn "cuda" into "cpu"
    monkeypatch.setattr(th.cuda, "device_count", lambda: 1)
    chosen = []
    monkeypatch.setattr(th.cuda, "set_device", chosen.append)

    def join(distributed, device, backend=None):
        chosen.append((device, backend))
        raise _GroupJoinedError

    monkeypatch.setattr(sb3_trpo.data_parallel, "join_process_group", join)
    with pytest.warns(UserWarning, match=r"2 processes share 1 GPU\(s\).*gloo"), pytest.raises(_GroupJoinedError):
        TRPO("MlpPolicy", "CartPole-v1", device="cuda", distributed=True)
    assert chosen == [th.device("cuda", 0), (th.device("cuda", 0), "gloo")]  # cuda:1 does not exist here
    chosen.clear()
    # an indexed GPU would be taken by both processes of the machine: refused before anything joins or moves
    with pytest.raises(ValueError, match=r'device="cuda:0" names one GPU.*pass device="cuda"'):
        TRPO("MlpPolicy", "CartPole-v1", device="cuda:0", distributed=True)
    assert chosen == []
    from sb3_trpo.cli import parallel
    from sb3_trpo.cli.presets import CliError

    with pytest.raises(CliError, match=r'--device cuda:0: device="cuda:0" names one GPU'):
        parallel.device_for_process("cuda:0")
    assert chosen == []
