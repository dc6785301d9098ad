"""Latency of one gloo all-reduce over loopback, at the payload sizes one TRPO update reduces.

    python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/allreduce_latency.py \
        [--output benchmarks/results/allreduce_latency.md]

Rank 0 writes a markdown table: median and 10-90% range of the wall time of one all-reduce (sum) of a float32
tensor, for the sizes of the critic's gradient and the actor's Fisher-vector product with 64×64 and 256×256
networks (benchmarks/results/distributed.md lists them), and a scalar (the line search's surrogate and KL).
"""

import argparse
import platform
import subprocess
import time
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
REPEATS = 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=None, help="markdown file for rank 0's table")
    args = parser.parse_args()
    th.set_num_threads(1)
    dist.init_process_group(backend="gloo")
    rows = []
    for name, size in SIZES:
        tensor = th.ones(size)
        for _ in range(20):  # warm-up
            dist.all_reduce(tensor)
        times = []
        for _ in range(REPEATS):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - start)
        ms = np.array(times) * 1e3
        rows.append(f"| {name} | {size:,} | {np.median(ms):.3f} | {np.percentile(ms, 10):.3f}-{np.percentile(ms, 90):.3f} |")
    if dist.get_rank() == 0:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
        header = (
            f"# commit {commit.stdout.strip() or 'unknown'}, torch {th.__version__}, python {platform.python_version()}, "
            f"gloo on loopback, {dist.get_world_size()} processes, 1 thread each, {REPEATS} timed calls per size\n\n"
            "| all-reduce of | float32 elements | median (ms) | 10-90% (ms) |\n|---|---|---|---|\n"
        )
        text = header + "\n".join(rows) + "\n"
        print(text)
        if args.output is not None:
            args.output.write_text(text, encoding="utf-8")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
