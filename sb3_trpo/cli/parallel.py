"""``sb3-trpo train`` under torchrun: one run trained by several processes, restarted by torchrun after a failure.

Every process runs the same command line. They join the process group before anything else, so that rank 0 alone
decides what the run is (a drawn seed, the next free run folder, the checkpoint a resumed run starts from) and the
others receive its decision; rank 0 alone writes the run folder. When a worker fails, ``torchrun --max-restarts=K``
starts all of them again with the same command line; they recognize the run their launch began by the launch id
recorded in its ``config.json`` and resume it from its latest checkpoint.
"""

import os
import sys
from collections.abc import Callable
from typing import TypeVar

import torch as th
from stable_baselines3.common.utils import get_device
from torch import distributed as dist

from sb3_trpo.cli.presets import CliError
from sb3_trpo.distributed import (
    Replica,
    cuda_device_for_process,
    join_process_group,
    launched_by_torchrun,
    local_rank,
    local_world_size,
)

T = TypeVar("T")


def device_for_process(requested: str) -> tuple[th.device, str | None]:
    """The device of this process, and the backend of its process group (``None``: the device's default).

    Under torchrun with a CUDA device, the processes of a machine spread over its GPUs as the library spreads them
    (:func:`sb3_trpo.distributed.gpu_for_process`).

    :param requested: ``--device``
    :raises CliError: for a device torch does not know
    """
    try:
        device = get_device(requested)
    except RuntimeError as error:
        raise CliError(f"--device {requested}: {error}") from None
    if device.type == "cuda" and launched_by_torchrun():
        try:
            device, backend = cuda_device_for_process(device, local_rank(), local_world_size(), th.cuda.device_count())
        except ValueError as error:
            raise CliError(f"--device {requested}: {error}") from None
        th.cuda.set_device(device)
        return device, backend
    return device, None


def join_if_launched(device: th.device, backend: str | None) -> Replica:
    """Join the process group when torchrun launched this process, else run alone.

    :param device: this process's device (it chooses the backend unless ``backend`` is given)
    :param backend: the backend, if not the device's default
    """
    return join_process_group("auto", device, backend)


def decided_by_rank_0(replica: Replica, decide: Callable[[], T]) -> T:
    """What rank 0's ``decide()`` returns, on every rank; a refusal (``CliError``) is raised on every rank.

    :param replica: this process's place in the run
    :param decide: called on rank 0 only
    """
    if not replica.is_distributed:
        return decide()
    decision: list[object] = [None]
    if replica.is_main:
        try:
            decision[0] = decide()
        except CliError as error:
            decision[0] = error
    dist.broadcast_object_list(decision, src=0)
    if isinstance(decision[0], CliError):
        raise decision[0]
    return decision[0]  # type: ignore[return-value]


def leave(replica: Replica) -> None:
    """Leave the process group once every rank is done (rank 0 evaluates and saves last), and end the process.

    A data-parallel process ends here with ``os._exit(0)`` once its output is flushed: at a normal interpreter exit,
    gloo's threads are sometimes destroyed while still joinable, and the process aborts ("terminate called without
    an active exception", SIGABRT) after all its work is done, which torchrun reports as a failure of the run.
    """
    if not (replica.is_distributed and dist.is_initialized()):
        return
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()
    end_process(0)


def end_process(status: int) -> None:
    """End a data-parallel process with ``status`` once its output is flushed, without the interpreter's exit (see
    :func:`leave`); do nothing in a process without a process group.

    :param status: the exit status
    """
    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def elastic_restart() -> str | None:
    """:return: the launch id when torchrun restarted this worker after a failure, else ``None``"""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return elastic_launch_id()
    return None


def elastic_launch_id() -> str | None:
    """:return: torchrun's id of this launch (the same for every worker and across restarts), if launched by it"""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def max_restarts() -> int:
    """:return: how many times torchrun may restart the workers (``--max-restarts``; 0 when not launched by it)"""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))


def processes_on_this_machine(world_size: int) -> int:
    """:return: the training processes sharing this machine's cores: torchrun's ``LOCAL_WORLD_SIZE``, else all of
    them"""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
