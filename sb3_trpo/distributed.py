"""Data-parallel TRPO over ``torch.distributed``: process-group set-up and the few reductions an update needs.

Every rank collects its own rollout and computes the same quantities as a single process would, on its own
data; the update then only needs means over ranks of a handful of tensors: the surrogate and its gradient, each
Fisher-vector product, the surrogate and KL of each line-search candidate, the advantage statistics and the
critic's minibatch gradients. With equal rollout sizes on every rank, the mean over ranks of per-rank means is the
mean over the global batch, so the update is the single-process update on the concatenated data (up to float
summation order). All-reduce leaves bit-identical results on every rank, and everything after it is
deterministic, so the parameters stay bit-identical across ranks without further synchronization.

:class:`Replica` is the context of one process. A single process gets a :class:`Replica` of world size 1 whose
reductions return their input: ``train()`` has one code path.
"""

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import ProgressBarCallback
from stable_baselines3.common.running_mean_std import RunningMeanStd
from torch import distributed as dist

Distributed = bool | Literal["auto"]

#: the variables torchrun (``torch.distributed.run``) sets for every worker; ``env://`` initialization needs them
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """:return: whether this process has the environment torchrun gives its workers"""
    return all(name in os.environ for name in LAUNCHER_VARIABLES)


def local_rank() -> int:
    """:return: the rank of this process on its machine (``LOCAL_RANK``), 0 when not launched by torchrun"""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """:return: the number of processes on this machine (``LOCAL_WORLD_SIZE``, else ``WORLD_SIZE``, else 1)"""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def gpu_for_process(rank_on_machine: int, processes_on_machine: int, gpus_on_machine: int) -> tuple[th.device, str]:
    """The GPU a data-parallel process takes when its device is plain ``"cuda"`` (or ``"auto"`` with a GPU),
    and the process-group backend that works with it.

    Processes are spread over the GPUs round-robin (``LOCAL_RANK % device_count``). With one process per GPU (or
    fewer), that is nccl's usual layout. nccl refuses two ranks on one GPU, so with more processes than GPUs the
    group uses gloo, which also reduces CUDA tensors (all-reduce and broadcast, all that :class:`Replica` uses).

    :param rank_on_machine: this process's rank on its machine (torchrun's ``LOCAL_RANK``)
    :param processes_on_machine: processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``)
    :param gpus_on_machine: CUDA devices visible to this process (``torch.cuda.device_count()``)
    :return: the device and the backend (``"nccl"`` or ``"gloo"``)
    :raises RuntimeError: if no GPU is visible, or the ranks are inconsistent
    """
    if gpus_on_machine < 1:
        raise RuntimeError(
            'device="cuda", but this process sees no CUDA device: pass device="cpu" (or "auto", which takes a GPU '
            "only if there is one), or check CUDA_VISIBLE_DEVICES."
        )
    if not 0 <= rank_on_machine < processes_on_machine:
        raise RuntimeError(
            f"LOCAL_RANK={rank_on_machine} is not below LOCAL_WORLD_SIZE={processes_on_machine}: launch with torchrun, "
            "which sets both."
        )
    backend = "nccl" if processes_on_machine <= gpus_on_machine else "gloo"
    return th.device("cuda", rank_on_machine % gpus_on_machine), backend


def cuda_device_for_process(
    requested: th.device, rank_on_machine: int, processes_on_machine: int, gpus_on_machine: int
) -> tuple[th.device, str | None]:
    """The CUDA device of a process torchrun launched, and its process-group backend (``None``: the device's default).

    A plain ``"cuda"`` spreads the machine's processes over its GPUs (:func:`gpu_for_process`). A device with an
    index names one GPU, which every process of the machine would take, and nccl refuses two ranks on one GPU: it is
    kept for a single process per machine and refused otherwise.

    :param requested: the CUDA device asked for
    :param rank_on_machine: this process's rank on its machine (torchrun's ``LOCAL_RANK``)
    :param processes_on_machine: processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``)
    :param gpus_on_machine: CUDA devices visible to this process (``torch.cuda.device_count()``)
    :raises ValueError: for an indexed device shared by several processes of the machine
    :raises RuntimeError: if no GPU is visible (see :func:`gpu_for_process`)
    """
    if requested.index is None:
        return gpu_for_process(rank_on_machine, processes_on_machine, gpus_on_machine)
    if processes_on_machine > 1:
        raise ValueError(
            f'device="{requested}" names one GPU, which all {processes_on_machine} processes torchrun started on this '
            'machine would take (nccl refuses two processes on one GPU): pass device="cuda" (or "auto"), and each '
            "process takes GPU LOCAL_RANK % device count, or launch one process per machine."
        )
    return requested, None


def join_process_group(distributed: Distributed, device: th.device, backend: str | None = None) -> "Replica":
    """The data-parallel context of this process, initializing the default process group if needed.

    :param distributed: ``True``: a process group is required (initialized by the user, or from torchrun's
        environment); ``"auto"``: use one if there is one or torchrun launched this process, else run alone;
        ``False``: run alone
    :param device: the policy's device; it chooses the backend when the group is initialized here and
        ``backend`` is not given (nccl for CUDA, gloo otherwise)
    :param backend: the backend to initialize the group with, if not the device's default
    :return: the context (world size 1 when running alone)
    :raises RuntimeError: if ``distributed=True`` and there is neither a process group nor a launcher environment
    """
    if distributed is False:
        return Replica.alone()
    if not dist.is_available():
        if distributed == "auto":
            return Replica.alone()
        raise RuntimeError("distributed=True needs torch.distributed, which this torch build does not provide.")
    if not dist.is_initialized():
        if not launched_by_torchrun():
            if distributed == "auto":
                return Replica.alone()
            missing = ", ".join(name for name in LAUNCHER_VARIABLES if name not in os.environ)
            raise RuntimeError(
                f"distributed=True, but this process was not started by a launcher ({missing} not set) and no "
                "torch.distributed process group is initialized. Launch the script with "
                "`torchrun --nproc_per_node=M train.py` (add --nnodes=N --rdzv-endpoint=HOST:PORT for several "
                'machines), initialize a process group yourself, or pass distributed="auto" to run as a single '
                "process when no launcher is present."
            )
        if backend is None:
            backend = "nccl" if device.type == "cuda" else "gloo"
        _init_from_launcher(backend)
    return Replica(rank=dist.get_rank(), world_size=dist.get_world_size())


def _init_from_launcher(backend: str) -> None:
    """Initialize the default process group from torchrun's environment (``env://``), with keys of its own for each
    attempt when torchrun restarts the workers.

    torchrun's workers share its rendezvous store, which keeps the keys of earlier attempts; after a restart
    (``--max-restarts``) a worker could read the address a killed worker had published and fail to connect (gloo's
    "connectFullMesh failed ... Connection refused", about 1 restart in 3 here; pytorch/pytorch#135712). Prefixing
    the keys with the attempt number leaves only the current attempt's to read.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        dist.init_process_group(backend=backend)
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False)
    dist.init_process_group(
        backend=backend, store=dist.PrefixStore(f"sb3_trpo/attempt_{attempt}/", store), rank=rank, world_size=world_size
    )


class Replica:
    """One process of data-parallel training: its rank, the world size, and the reductions over ranks.

    All reductions are collective: every rank must call them in the same order with tensors of the same shape.

    :param rank: this process's rank
    :param world_size: number of processes
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        #: payload bytes and number of the all-reduces since the counters were last reset (the training loop logs
        #: and resets them once per iteration: they measure the communication a multi-node run would need)
        self.bytes_reduced = 0
        self.all_reduces = 0
        #: all-gathers since the counters were last reset (their payload counts in ``bytes_reduced``)
        self.all_gathers = 0

    @classmethod
    def alone(cls) -> "Replica":
        """:return: the context of a single process (reductions are the identity)"""
        return cls(rank=0, world_size=1)

    @property
    def is_distributed(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes logs and checkpoints."""
        return self.rank == 0

    def _all_reduce_sum(self, tensor: th.Tensor) -> th.Tensor:
        self.bytes_reduced += tensor.numel() * tensor.element_size()
        self.all_reduces += 1
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean(self, tensor: th.Tensor) -> th.Tensor:
        """:return: the mean over ranks of ``tensor`` (a new tensor; the input itself when alone)"""
        if not self.is_distributed:
            return tensor
        return self._all_reduce_sum(tensor.detach().clone()).div_(self.world_size)

    def sum(self, tensor: th.Tensor) -> th.Tensor:
        """:return: the sum over ranks of ``tensor`` (a new tensor; the input itself when alone)"""
        if not self.is_distributed:
            return tensor
        return self._all_reduce_sum(tensor.detach().clone())

    def averaged(self, function: Callable[[th.Tensor], th.Tensor]) -> Callable[[th.Tensor], th.Tensor]:
        """:return: ``v ↦`` the mean over ranks of ``function(v)`` (``function`` itself when alone)"""
        if not self.is_distributed:
            return function
        return lambda vector: self.mean(function(vector))

    def mean_of_floats(self, values: Sequence[float], device: th.device) -> list[float]:
        """:return: the mean over ranks of each number, in one all-reduce"""
        if not self.is_distributed:
            return list(values)
        return self.mean(th.tensor(values, dtype=th.float64, device=device)).tolist()

    def sum_of_floats(self, values: Sequence[float], device: th.device) -> list[float]:
        """:return: the sum over ranks of each number, in one all-reduce"""
        if not self.is_distributed:
            return list(values)
        return self.sum(th.tensor(values, dtype=th.float64, device=device)).tolist()

    def mean_and_std(self, values: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """Mean and unbiased standard deviation of ``values`` over the global batch (equal sizes on every rank).

        Two passes (the mean, then the squared deviations from it), as stable as ``Tensor.std``.
        """
        if not self.is_distributed:
            return values.mean(), values.std()
        n = values.numel() * self.world_size
        mean = self.mean(values.mean())
        sum_sq = self.sum(((values - mean) ** 2).sum())
        return mean, (sum_sq / (n - 1)).sqrt()

    def weighted_mean_and_std(self, values: th.Tensor, weights: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """Mean and unbiased standard deviation of ``values`` over the rows of weight 1 of every rank (the real
        steps of padded batches, which differ in number between ranks).

        :param values: one value per row
        :param weights: 1 for a row that counts, 0 for padding
        """
        real = weights > 0  # padding is selected away, not multiplied by 0 (it may hold anything)
        count = self.sum(weights.sum())
        mean = self.sum(th.where(real, values, 0.0).sum()) / count
        sum_sq = self.sum(th.where(real, (values - mean) ** 2, 0.0).sum())
        return mean, (sum_sq / (count - 1)).sqrt()

    def mean_of_tensors(self, tensors: Sequence[th.Tensor | None], like: Sequence[th.Tensor]) -> list[th.Tensor]:
        """The mean over ranks of several tensors, flattened into one buffer for a single all-reduce.

        :param tensors: the tensors (``None`` stands for zeros shaped like the matching entry of ``like``)
        :param like: tensors giving the shapes
        """
        filled = [th.zeros_like(ref) if t is None else t for t, ref in zip(tensors, like, strict=True)]
        if not self.is_distributed:
            return filled
        flat = self.mean(th.cat([t.reshape(-1) for t in filled]))
        return [chunk.view_as(t) for chunk, t in zip(th.split(flat, [t.numel() for t in filled]), filled, strict=True)]

    def all_gather(self, tensor: th.Tensor) -> th.Tensor:
        """:return: every rank's ``tensor`` (the same shape on every rank), concatenated along the first dimension in
        rank order (the input itself when alone)"""
        if not self.is_distributed:
            return tensor
        self.bytes_reduced += tensor.numel() * tensor.element_size()
        self.all_gathers += 1
        parts = [th.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.detach().contiguous())
        return th.cat(parts)

    def all_agree(self, value: int, device: th.device) -> bool:
        """:return: whether every rank passed the same integer ``value``"""
        if not self.is_distributed:
            return True
        # all values are equal iff W·Σv² = (Σv)² (Cauchy-Schwarz), and both sums fit one all-reduce
        total, total_sq = self.sum_of_floats([value, value**2], device)
        return self.world_size * total_sq == total**2

    def broadcast_tensors(self, tensors: Iterable[th.Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's values, in place."""
        if not self.is_distributed:
            return
        with th.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor, src=0)


class GlobalProgressBarCallback(ProgressBarCallback):
    """SB3's progress bar, counting the samples of every rank.

    The total is the global budget (``total_timesteps`` counts all ranks' samples), so rank 0 advances it by what
    all ranks collect per step: its own ``num_envs`` times the world size (every rank has the same rollout size,
    checked when learning starts).

    :param world_size: number of processes
    """

    def __init__(self, world_size: int) -> None:
        super().__init__()
        self.world_size = world_size

    def _on_step(self) -> bool:
        self.pbar.update(self.training_env.num_envs * self.world_size)
        return True


def synchronize_running_stats(
    replica: Replica, stats: Sequence[RunningMeanStd], since: list[np.ndarray], device: th.device
) -> None:
    """Merge every rank's updates of running mean/variance statistics (VecNormalize's) since the last merge.

    Each rank started from the same statistics ``since`` and updated them with its own samples. Raw moments
    (count, count·mean, count·E[x²]) add up over disjoint samples, so the merged statistics are ``since`` plus
    the sum over ranks of each rank's change in raw moments: exactly the statistics of all samples seen by all
    ranks. Computed in float64 and written back on every rank, so all ranks continue from identical statistics.

    :param replica: the data-parallel context
    :param stats: the running statistics of this rank, in the same order on every rank
    :param since: the raw moments of each statistic at the last merge (updated in place to the merged ones)
    :param device: where the all-reduce runs (the policy's device, which the backend supports)
    """
    moments = [raw_moments(s) for s in stats]
    change = np.concatenate([now - then for now, then in zip(moments, since, strict=True)])
    total_change = replica.sum(th.from_numpy(change).to(device)).cpu().numpy()
    offset = 0
    for index, (stat, then) in enumerate(zip(stats, since, strict=True)):
        merged = then + total_change[offset : offset + then.size]
        offset += then.size
        set_from_raw_moments(stat, merged)
        since[index] = merged


def raw_moments(stat: RunningMeanStd) -> np.ndarray:
    """:return: ``[count, count·mean..., count·E[x²]...]`` of running statistics, in float64"""
    mean = np.asarray(stat.mean, dtype=np.float64).reshape(-1)
    second = np.asarray(stat.var, dtype=np.float64).reshape(-1) + mean**2
    return np.concatenate([[float(stat.count)], stat.count * mean, stat.count * second])


def set_from_raw_moments(stat: RunningMeanStd, moments: np.ndarray) -> None:
    """Write raw moments (see :func:`raw_moments`) back into running statistics, keeping their shapes and dtypes."""
    count = float(moments[0])
    size = (moments.size - 1) // 2
    mean = moments[1 : 1 + size] / count
    var = np.maximum(moments[1 + size :] / count - mean**2, 0.0)
    shape = np.shape(stat.mean)
    stat.mean = mean.reshape(shape).astype(np.asarray(stat.mean).dtype)
    stat.var = var.reshape(shape).astype(np.asarray(stat.var).dtype)
    stat.count = count


def broadcast_running_stats(replica: Replica, stats: Sequence[RunningMeanStd], device: th.device) -> list[np.ndarray]:
    """Give every rank rank 0's running statistics, the common start of :func:`synchronize_running_stats`.

    :param replica: the data-parallel context
    :param stats: the running statistics of this rank, in the same order on every rank
    :param device: where the broadcast runs
    :return: the raw moments of each statistic, as :func:`synchronize_running_stats` takes them
    """
    moments = [raw_moments(s) for s in stats]
    if replica.is_distributed and moments:
        flat = th.from_numpy(np.concatenate(moments)).to(device)
        replica.broadcast_tensors([flat])
        values = flat.cpu().numpy()
        starts = np.cumsum([0, *(m.size for m in moments)])
        moments = [values[start : start + m.size].copy() for start, m in zip(starts, moments, strict=False)]
        for stat, moment in zip(stats, moments, strict=True):
            set_from_raw_moments(stat, moment)
    return moments
