"""``sb3-trpo train`` under torchrun: one run on 2 processes (gloo, loopback), and torchrun restarting the workers
after one of them is killed, which resume from the run's latest checkpoint."""

import json
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch as th

from sb3_trpo import TRPO
from sb3_trpo.cli import checkpointing, main
from sb3_trpo.cli.runs import CONFIG, EVALUATIONS, MODEL
from tests.helpers import launch_two_nodes, launcher_environment

ROOT = Path(__file__).resolve().parent.parent
DOOMED = "tests.cli_envs.doomed:CliDoomed-v0"
BUDGET = 640
# the run's 2 environments and critic minibatch of 16 are split over the processes: rollouts of 32 in all
RUN = [
    *["--timesteps", str(BUDGET), "--n-envs", "2", "--eval-freq", "64", "--eval-episodes", "2", "--seed", "3"],
    *["--checkpoint-freq", "128", "--hyperparams", "n_steps=16", "batch_size=16", "n_critic_updates=2", "normalize=True"],
    "--no-progress-bar",
]


def torchrun(*argv: str, env: dict[str, str], restarts: int = 0) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 [--max-restarts=K] -m sb3_trpo ...``, as a user runs it."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    if restarts:
        launcher.append(f"--max-restarts={restarts}")
    return subprocess.run(
        [*launcher, "-m", "sb3_trpo", *argv],
        cwd=ROOT,
        env=launcher_environment(env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def ranks(folder: Path) -> list[dict]:
    return [th.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def flat(model: TRPO) -> th.Tensor:
    return th.cat([t.detach().reshape(-1) for t in model.policy.state_dict().values()])


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("torchrun")
    output = folder / "run"
    result = torchrun("train", DOOMED, "--output", str(output), *RUN, env={"DOOMED_DUMP": str(folder)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output


def test_train_under_torchrun_trains_one_run_on_two_processes(two_processes):
    output = two_processes
    config = json.loads((output / CONFIG).read_text())
    assert config["processes"] == 2
    assert config["n_envs"] == 2  # of both processes together
    final = ranks(output.parent)
    assert th.equal(final[0]["parameters"], final[1]["parameters"])
    assert final[0]["num_timesteps"] == final[1]["num_timesteps"] == BUDGET
    model = TRPO.load(output / MODEL)  # an ordinary model
    assert th.equal(flat(model), final[0]["parameters"])
    assert model.n_envs == 1  # each process's share
    assert model.batch_size == 8
    # the evaluations, on rank 0, at the global timesteps
    assert list(np.load(output / EVALUATIONS)["timesteps"]) == list(range(64, BUDGET + 1, 64))
    assert main(["eval", str(output), "--episodes", "2"]) == 0
    pytest.importorskip("matplotlib")
    assert main(["plot", str(output), "--output", str(output.parent / "curve.png")]) == 0
    assert (output.parent / "curve.png").stat().st_size > 0


def test_two_nodes_over_loopback_train_the_run_two_processes_of_one_node_train(two_processes, tmp_path):
    # the multi-machine command line, run for real as two one-process "nodes" (c10d rendezvous over loopback)
    output = tmp_path / "run"
    environment = launcher_environment({"DOOMED_DUMP": str(tmp_path)})
    nodes = launch_two_nodes(["-m", "sb3_trpo", "train", DOOMED, "--output", str(output), *RUN], environment, str(ROOT))
    for node in nodes:
        assert node.returncode == 0, node.stdout[-3000:] + node.stderr[-3000:]
    assert sum("Training TRPO" in node.stdout for node in nodes) == 1  # rank 0 alone reports and writes
    one_node, two_nodes = ranks(two_processes.parent), ranks(tmp_path)
    for a, b in zip(one_node, two_nodes, strict=True):
        assert th.equal(a["parameters"], b["parameters"])
    assert th.equal(flat(TRPO.load(output / MODEL)), flat(TRPO.load(two_processes / MODEL)))
    for key in ("timesteps", "results", "ep_lengths"):
        np.testing.assert_array_equal(np.load(output / EVALUATIONS)[key], np.load(two_processes / EVALUATIONS)[key])


@pytest.mark.parametrize(
    "kill", [{"DOOMED_STEP": "150"}, {"DOOMED_UPDATE": "9"}], ids=["rank-1-mid-rollout", "rank-1-mid-update"]
)
def test_torchrun_restarts_a_killed_worker_and_the_run_resumes_from_its_checkpoint(tmp_path, kill):
    output = tmp_path / "run"
    # rank 1 kills itself once: at its 150th step (global timestep 300), or as its 9th update starts (after 288)
    doom = {"DOOMED_MARKER": str(tmp_path / "killed"), "DOOMED_RANK": "1", "DOOMED_DUMP": str(tmp_path), **kill}
    result = torchrun("train", DOOMED, "--output", str(output), *RUN, env=doom, restarts=1)
    log = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, log
    assert (tmp_path / "killed").is_file()
    assert f"(exitcode: {-signal.SIGKILL}) local_rank: 1" in result.stderr, log
    assert "Restarted by torchrun: resuming" in result.stdout, log
    assert "From the checkpoint at 256 timesteps" in result.stdout, log
    final = ranks(tmp_path)
    assert th.equal(final[0]["parameters"], final[1]["parameters"])
    assert final[0]["num_timesteps"] == final[1]["num_timesteps"] == BUDGET
    with zipfile.ZipFile(output / MODEL) as archive:
        assert json.loads(archive.read("data"))["num_timesteps"] == BUDGET
    assert th.equal(flat(TRPO.load(output / MODEL)), final[0]["parameters"])
    assert list(np.load(output / EVALUATIONS)["timesteps"]) == list(range(64, BUDGET + 1, 64))
    config = json.loads((output / CONFIG).read_text())
    assert [r["from_timesteps"] for r in config["resumes"]] == [256]
    assert checkpointing.latest_checkpoint(output) == output / "checkpoints" / str(BUDGET)


def test_a_worker_killed_after_the_last_checkpoint_does_not_fail_the_finished_run(tmp_path):
    # rank 0 killed as it saves the final model: the restarted workers find the budget trained and finish the run
    output = tmp_path / "run"
    doom = {"DOOMED_MARKER": str(tmp_path / "killed"), "DOOMED_RANK": "0", "DOOMED_FINAL_SAVE": "1"}
    result = torchrun("train", DOOMED, "--output", str(output), *RUN, env=doom, restarts=1)
    log = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, log
    assert (tmp_path / "killed").is_file()
    assert "finished training: writing its final model" in result.stdout, log
    with zipfile.ZipFile(output / MODEL) as archive:
        assert json.loads(archive.read("data"))["num_timesteps"] == BUDGET
    assert list(np.load(output / EVALUATIONS)["timesteps"]) == list(range(64, BUDGET + 1, 64))


def test_max_restarts_needs_an_output_folder(tmp_path):
    result = torchrun("train", DOOMED, *RUN, env={}, restarts=1)
    assert result.returncode != 0
    assert "torchrun --max-restarts restarts the workers with the same command line: give --output" in result.stderr


def test_processes_that_cannot_split_the_environments_are_refused(tmp_path):
    result = torchrun("train", DOOMED, "--output", str(tmp_path / "run"), *RUN, "--n-envs", "3", env={})
    assert result.returncode != 0
    assert "2 processes share the run's n_envs=3, which they cannot split evenly" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("form", ["module-colon-id", "gym-packages"])
def test_a_single_process_run_resumes_on_two_processes(tmp_path, form):
    # the run's environments and minibatch are global: any number of processes that divides them may go on with it;
    # every rank imports the modules the run recorded (--gym-packages is not repeated with --resume)
    output = tmp_path / "run"
    # CliTiny-v0: importing the doomed module here would patch TRPO in this test process
    env = (
        ["tests.cli_envs.tiny:CliTiny-v0"]
        if form == "module-colon-id"
        else ["CliTiny-v0", "--gym-packages", "tests.cli_envs.tiny"]
    )
    assert main(["train", *env, "--output", str(output), *RUN, "--timesteps", "320"]) == 0
    result = torchrun("train", "--resume", str(output), "--timesteps", str(BUDGET), "--no-progress-bar", env={})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert list(np.load(output / EVALUATIONS)["timesteps"]) == list(range(64, BUDGET + 1, 64))
    config = json.loads((output / CONFIG).read_text())
    assert config["processes"] == 2
    assert [(r["from_timesteps"], r["processes"]) for r in config["resumes"]] == [(320, 2)]
    with zipfile.ZipFile(output / MODEL) as archive:
        assert json.loads(archive.read("data"))["num_timesteps"] == BUDGET
