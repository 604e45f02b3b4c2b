"""Where the work runs: the device (and whether its CPU computes bfloat16 natively), and the helpers for
processes started by torchrun that training (cnn.py) and catalog prediction (catalog.py) share. A process
started by plain `python` is a group of one: rank 0 of 1, the main process."""
from __future__ import annotations

import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from galaxy10 import Galaxy10Error

DEVICES = ("auto", "cpu", "cuda")
T = TypeVar("T")
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
