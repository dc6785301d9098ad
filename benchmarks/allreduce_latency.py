"""Latency of one gloo collective over loopback, at the payload sizes one TRPO update communicates.

    python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/allreduce_latency.py \
        [--output benchmarks/results/allreduce_latency.md]

Rank 0 writes a markdown table: median and 10-90% range of the wall time of one collective, for

- an all-reduce (sum) of a float32 tensor of the sizes of the critic's gradient and the actor's Fisher-vector
  product with 64×64 and 256×256 networks (benchmarks/results/distributed.md lists them), and of a scalar pair
  (the line search's surrogate and KL);
- an all-gather of what ``distributed_critic="gather"`` gathers once per update on Pendulum-v1 (benchmarks/
  distributed.py's pendulum-256 case, 2048 samples per global rollout): the critic data, 3 observation floats and
  the return per sample, and the minibatch orders, 20 epochs of int64 indices per rank. Each rank contributes
  its share (2048 / world size samples) and receives everyone's, with the same call as
  ``sb3_trpo.distributed.Replica.all_gather`` (``dist.all_gather`` into a list, then one ``torch.cat``).

With ``--output``, the table is appended to the file as a new ``## Run N`` section (earlier runs are kept).
"""

import argparse
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch as th
from torch import distributed as dist

# (what is reduced, number of float32 elements); parameter counts from benchmarks/results/distributed.md
SIZES = [
    ("2 scalars (a line-search trial)", 2),
    ("actor, 64x64 CartPole (a Fisher-vector product)", 4_610),
    ("critic, 64x64 CartPole (a minibatch gradient)", 4_545),
    ("actor, 256x256 Pendulum", 67_074),
    ("critic, 256x256 Pendulum", 67_073),
]
#: the pendulum-256 case of benchmarks/distributed.py: samples of the global rollout, critic epochs
GLOBAL_SAMPLES, CRITIC_EPOCHS = 2048, 20
REPEATS = 300


def time_collective(call: Callable[[], object]) -> np.ndarray:
    """:return: the wall times (ms) of ``REPEATS`` calls of ``call``, each started right after a barrier"""
    for _ in range(20):  # warm-up
        call()
    times = []
    for _ in range(REPEATS):
        dist.barrier()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return np.array(times) * 1e3


def row(name: str, elements: int, ms: np.ndarray) -> str:
    return f"| {name} | {elements:,} | {np.median(ms):.3f} | {np.percentile(ms, 10):.3f}-{np.percentile(ms, 90):.3f} |"


def all_gather(tensor: th.Tensor) -> th.Tensor:
    """What ``Replica.all_gather`` does: every rank's tensor, concatenated in rank order."""
    parts = [th.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return th.cat(parts)


def append_run(path: Path, text: str, load: tuple[float, float, float]) -> None:
    """Append ``text`` (starting with a level-1 heading) to ``path`` as the next ``## Run N`` section, keeping what is
    there; ``load`` is the load average before the run."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    n = len(re.findall(r"^## Run \d+", old, flags=re.MULTILINE)) + 1
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    before = ", ".join(f"{x:.2f}" for x in load)
    section = f"## Run {n}\n\n{when}, load average before the run {before} (1, 5, 15 min).\n\n##{text}"
    path.write_text(old.rstrip("\n") + "\n\n" + section if old else section, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=None, help="markdown file to append rank 0's table to")
    args = parser.parse_args()
    load = os.getloadavg()
    th.set_num_threads(1)
    dist.init_process_group(backend="gloo")
    world_size = dist.get_world_size()
    rows = []
    for name, size in SIZES:
        tensor = th.ones(size)
        rows.append(row(f"all-reduce: {name}", size, time_collective(lambda tensor=tensor: dist.all_reduce(tensor))))
    per_rank = GLOBAL_SAMPLES // world_size
    gathers = [
        (f"all-gather: critic data, 256x256 Pendulum ({GLOBAL_SAMPLES} samples x 4 float32)", th.ones(per_rank, 4)),
        (
            f"all-gather: critic minibatch orders, 256x256 Pendulum ({CRITIC_EPOCHS} epochs x {GLOBAL_SAMPLES} int64)",
            th.zeros(1, CRITIC_EPOCHS, per_rank, dtype=th.int64),
        ),
    ]
    for name, tensor in gathers:
        rows.append(row(name, tensor.numel(), time_collective(lambda tensor=tensor: all_gather(tensor))))
    if dist.get_rank() == 0:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
        header = (
            f"# commit {commit.stdout.strip() or 'unknown'}, torch {th.__version__}, python {platform.python_version()}, "
            f"gloo on loopback, {world_size} processes, 1 thread each, {REPEATS} timed calls per size\n\n"
            "| collective | elements per rank | median (ms) | 10-90% (ms) |\n|---|---|---|---|\n"
        )
        text = header + "\n".join(rows) + "\n"
        print(text)
        if args.output is not None:
            append_run(args.output, text, load)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
