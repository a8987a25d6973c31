"""The device a run uses and the torchrun process group (started here, destroyed by whoever started it)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..config import ConfigError

_OWN_PROCESS_GROUP = False  # True while a process group started by init_distributed is alive


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` -> a torch.device;
    a CUDA device on a machine without one is a ConfigError naming --device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"invalid device {name!r} (flag --device): use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"invalid device {name!r} (flag --device): use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here; use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Starts a process group when launched by torchrun; ``device`` as in
    :func:`resolve_device` (under torchrun a CUDA run uses the process's LOCAL_RANK device)."""
    global _OWN_PROCESS_GROUP
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        _OWN_PROCESS_GROUP = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 or dev.index is None else dev.index
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def close_distributed() -> None:
    """Destroy the process group if :func:`init_distributed` started it (one a caller started stays)."""
    global _OWN_PROCESS_GROUP
    if _OWN_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_PROCESS_GROUP = False


def require_divisible(sizes: dict[str, int], world: int) -> None:
    """Every global batch size must split evenly over the ``world`` processes (ConfigError naming the flag)."""
    for key, size in sizes.items():
        if size % world:
            raise ConfigError(f"invalid {key}: {size} is not divisible by the {world} processes (flag "
                              f"--{key.replace('_', '-')}); the global batch must split evenly")
