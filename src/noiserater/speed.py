"""Speed switches a GPU user expects, in one place (train, benchmarks and the GPU check use them).

- :func:`set_tf32`: TF32 tensor-core matmuls and convolutions for float32 on CUDA (Ampere and newer).
- bf16 autocast: ``TrainConfig.amp`` (:func:`autocast`).
- ``torch.compile``: ``TrainConfig.compile`` (off by default; never on the meta-gradient path, which
  needs double backward).
- fused AdamW on CUDA and CPU: chosen by :func:`noiserater.train.train`.
- gradient checkpointing: ``DiT.grad_checkpointing`` / ``TrainConfig.grad_checkpointing``
  (:func:`noiserater.models.dit.checkpointed`, exact gradients, also under ``functional_call``).
- pinned host memory for latent-cache batches: :class:`noiserater.data.latents.MemmapRows`.
"""

from __future__ import annotations

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
