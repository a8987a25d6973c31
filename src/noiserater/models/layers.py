"""Building blocks shared by the DiT backbone and the rater.

Parameter names follow facebookresearch/DiT (which uses timm's PatchEmbed, Attention and Mlp) so that
published DiT checkpoints load with ``load_state_dict`` unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..randomness import drop_labels


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift. x [B,T,D], shift/scale [B,D]. One fused ``addcmul``
    instead of three elementwise passes over x (measurably faster on CPU; see docs/performance-train.md)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + gate * branch with x, branch [B,T,D] and gate [B,D], as one ``addcmul``."""
    return torch.addcmul(x, gate.unsqueeze(1), branch)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """Frozen 2D sin-cos position embedding, [grid_size**2, embed_dim], as in DiT/MAE."""
    if embed_dim % 4:
        raise ConfigError(f"embed_dim must be divisible by 4 for a 2D sin-cos embedding, got {embed_dim}")
    gw, gh = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    # DiT stacks (w, h) and embeds the first half from grid[0] (the w grid); keep that order for
    # bit-compatible checkpoints.
    emb_h = _sincos_1d(embed_dim // 2, gw.reshape(-1))
    emb_w = _sincos_1d(embed_dim // 2, gh.reshape(-1))
    return np.concatenate([emb_h, emb_w], axis=1)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


class PatchEmbed(nn.Module):
    """Image [B,C,H,W] -> tokens [B,T,D] with a strided conv (timm's PatchEmbed, `proj` naming)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ConfigError(
                f"input size {img_size} is not divisible by patch size {patch_size}; "
                "pick a model with a smaller patch (e.g. /2) or pad the images"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same function as the strided conv (and the same `proj` parameters), computed as non-overlapping
        # patches @ flattened kernel: one matmul, faster than a convolution for these tiny kernels on CPU.
        B, C, H, W = x.shape
        p, D = self.patch_size, self.proj.out_channels
        if H % p or W % p:
            raise ConfigError(f"image size {H}x{W} is not divisible by the patch size {p}")
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
        return F.linear(patches, self.proj.weight.reshape(D, C * p * p), self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (qkv, proj) on top of fused SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,T,D] -> q, k, v each [B,heads,T,D/heads]."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.heads(x)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (DiT's choice), timm's fc1/fc2 names."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """Integer or real timesteps [B] -> [B,D] via sinusoidal features and a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels [B] -> [B,D]. Index ``num_classes`` is the null (unconditional) class.

    In training mode, labels are replaced by the null class with probability ``dropout_prob``
    (classifier-free guidance training, as in DiT).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor) -> torch.Tensor:
        return drop_labels(labels, self.num_classes, self.dropout_prob, None)

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            labels = self.token_drop(labels)
        return self.embedding_table(labels)


def check_model_inputs(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, channels: int, size: int,
                       name: str) -> None:
    """Shape checks with messages that say what was expected (cheap; avoids deep torch errors)."""
    if x.dim() != 4 or x.shape[1] != channels or x.shape[2] != size or x.shape[3] != size:
        raise ValueError(f"{name} expects images [B,{channels},{size},{size}], got {list(x.shape)}")
    if t.shape != (x.shape[0],):
        raise ValueError(f"{name} expects timesteps t of shape [{x.shape[0]}], got {list(t.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{name} expects labels y of shape [{x.shape[0]}], got {list(y.shape)}")
