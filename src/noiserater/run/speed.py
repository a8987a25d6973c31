"""Speed switches a GPU user expects, in one place (train, benchmarks and the GPU check use them).

- :func:`set_tf32`: TF32 tensor-core matmuls and convolutions for float32 on CUDA (Ampere and newer).
- bf16 autocast: ``TrainConfig.amp`` (:func:`autocast`).
- ``torch.compile``: ``TrainConfig.compile`` (off by default; never on the meta-gradient path, which
  needs double backward).
- fused AdamW on CUDA and CPU: :func:`make_adamw`.
- gradient checkpointing: ``DiT.grad_checkpointing`` / ``TrainConfig.grad_checkpointing``
  (:func:`noiserater.models.dit.checkpointed`, exact gradients, also under ``functional_call``).
- pinned host memory for latent-cache batches: :class:`noiserater.data.latents.MemmapRows`.

:func:`machine_info` describes the machine in every benchmark record (:mod:`noiserater.bench`).
"""

from __future__ import annotations

import os
import platform
from contextlib import nullcontext

import torch


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 for float32 matmuls and cuDNN convolutions (a no-op for CPU work)."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def autocast(device: torch.device | str, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled`` (CPU and CUDA), else a no-op context."""
    dev = torch.device(device)
    return torch.autocast(dev.type, dtype=torch.bfloat16) if enabled else nullcontext()


def machine_info(device: str | torch.device | None = None) -> dict:
    """What a benchmark record needs to be read later: platform, Python, torch, threads, CPU model, the
    GPU name on CUDA, and the load average when the benchmark started (a busy machine reads slower)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": str(device), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_available"] = len(os.sched_getaffinity(0))
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def make_adamw(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel on CUDA and CPU (one pass over all parameters; on a 2-core CPU it
    takes a third of the time of the default per-tensor loop), the default implementation elsewhere."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
