"""Where the work runs: the device (and whether its CPU computes bfloat16 natively), and every helper for
processes started by torchrun: joining and leaving the group (`torchrun_group`), this process's share of
the data, sums and values agreed by all, DistributedDataParallel, and per-process random streams; training
(cnn.py, training.py) and catalog prediction (catalog.py, cnn_use_model.py) use them. A process started by
plain `python` is a group of one: rank 0 of 1, the main process."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from galaxy10.errors import Galaxy10Error

DEVICES = ("auto", "cpu", "cuda")
T = TypeVar("T")
# Rank r's augmentation and dropout streams start from seed + r * RANK_SEED_STRIDE, far from the
# seeds a user steps through (42, 43, ...), so no two processes share a stream.
RANK_SEED_STRIDE = 1000


def select_device(name: str) -> torch.device:
    """The device a --device value names: auto is a GPU where PyTorch sees one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise Galaxy10Error("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device auto")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bfloat16 beats float32; on
    others PyTorch emulates it, slower. Training (--precision auto) and inference both decide by it."""
    if device.type != "cpu":
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def launched_by_torchrun() -> bool:
    """torchrun (or torch.distributed.run) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 alone shows progress and writes the checkpoint, the resume file and the reports."""
    return rank() == 0


def use_local_gpu() -> torch.device:
    """Under torchrun on GPUs, this process's GPU: the one numbered LOCAL_RANK, one per process."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise Galaxy10Error(f"this machine has {torch.cuda.device_count()} GPU(s), one per process: pass a "
                            "smaller --nproc_per_node to torchrun, or --device cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def join_process_group(backend: str, device_id: torch.device | None = None, **options: Any) -> None:
    """init_process_group from torchrun's environment, each attempt under keys of its own: torchrun's agent
    keeps its store across --max-restarts and the process group's keys name no attempt, so a restarted
    group would otherwise connect to the addresses of the one that died."""
    store, process_rank, process_count = next(dist.rendezvous("env://"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend, store=store, rank=process_rank, world_size=process_count,
                            device_id=device_id, **options)


def from_main_process(value: T) -> T:
    """Rank 0's value, on every process."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launcher() -> str:
    """How this process was started: python, or torchrun with this run's process counts (on several
    machines with a placeholder for the rendezvous flags, which the processes cannot see)."""
    if not launched_by_torchrun():
        return "python"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    nodes = int(os.environ["WORLD_SIZE"]) // per_node
    where = "--standalone" if nodes == 1 else f"--nnodes {nodes} <the same rendezvous flags>"
    return f"torchrun {where} --nproc_per_node {per_node}"


def torchrun_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun set them, before any process group exists; (0, 1) without torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def torchrun_group(device: str, *, gpu_collectives: bool, timeout: timedelta | None = None) -> Iterator[None]:
    """Under torchrun, join the other processes, each on its LOCAL_RANK GPU when running on GPUs, and leave
    the group at the end; a single process is left as it is. With `gpu_collectives` the group exchanges
    tensors on the GPUs (NCCL; training's gradients); otherwise, and always on CPU, it is gloo (catalogs only
    meet at a barrier)."""
    if not launched_by_torchrun():
        yield
        return
    gpu = use_local_gpu() if select_device(device).type == "cuda" else None
    options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    if gpu is not None and gpu_collectives:
        join_process_group("nccl", gpu, **options)
    else:
        join_process_group("gloo", **options)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def main_process_prints() -> Iterator[None]:
    """stdout silenced on every process but rank 0, so a run prints its lines once."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull if rank() else sys.stdout):
        yield


def wait_for_all() -> None:
    """Under torchrun, wait until every process gets here."""
    if world_size() > 1:
        dist.barrier()


def this_process_share(order: torch.Tensor) -> torch.Tensor:
    """Rank r's part order[r::N] of an order every process drew alike, cut to len(order) // N so that all
    take the same number of steps, as DDP needs; the up to N - 1 images left over sit the epoch out (the
    next epoch's permutation leaves out others). One process keeps the whole order."""
    n = world_size()
    return order[rank()::n][: len(order) // n]


def this_process_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's contiguous part of a tensor split along its first axis; parts differ in size by at
    most one."""
    return tensor.tensor_split(world_size())[rank()]


def sum_over_processes(values: Sequence[float | torch.Tensor], device: torch.device) -> list[float]:
    """Each value summed over the processes (in float64, so counts stay exact), the same on every one."""
    totals = [float(value) for value in values]
    if world_size() == 1:
        return totals
    tensor = torch.tensor(totals, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_from_every_process(value: T) -> list[T]:
    """Every process's value, in rank order, on every process."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every process: DDP sends them before each training
    step, so after the last one each process holds its own."""
    if world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def data_parallel(model: nn.Module) -> nn.Module:
    """Under torchrun, the model in DistributedDataParallel, which starts every process from rank 0's
    weights and averages the gradients; in one process the model itself."""
    if world_size() == 1:
        return model
    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def process_seed(seed: int, stream: int) -> int:
    """The seed of random stream `stream` on this process: the same as in one process for rank 0, far apart
    on the others."""
    return seed + stream + RANK_SEED_STRIDE * rank()


def seed_dropout_per_process(seed: int) -> None:
    """Under torchrun, give each process its own dropout masks (torch's global stream) once the model,
    which starts the same everywhere, is built. One process keeps the stream it has."""
    if world_size() > 1:
        torch.manual_seed(process_seed(seed, 2))
