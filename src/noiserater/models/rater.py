"""The noise rater phi_eta(eps, t, x0, y) -> score (paper appendix B.1) and a faster shared-image variant.

Two independent patch embeddings (image x0, noise eps) share one frozen 2D sin-cos position embedding and
get a learnable type embedding each. The conditioning vector is timestep embedding + class embedding.
Each dual-stream block has per-stream LayerNorms, MLPs and adaLN modulation (one Linear to 12*D: 6 vectors
per stream) and ONE multi-head self-attention over the concatenation of both streams' modulated tokens
(B.1: "Attention is the only sublayer shared across streams"; the parameter count is "roughly twice that
of DiT-S/2 because of the duplicated MLPs and modulation networks"). The head drops the image tokens,
mean-pools the noise tokens, applies LayerNorm and a Linear to one scalar. All Linear layers use Xavier
init: an adaLN-Zero rater scores every noise equally and gets no meta-gradient at all.

Registered families (sizes S/B/M/T/N, patch 2/4/8):

- ``Rater-*``: the paper's rater as B.1 describes it (attention weights shared by the two streams).
  ``Rater-S/2`` at 32x32x4 with 1000 classes has 57.5M parameters (paper: "about 60M").
- ``MMRater-*``: the Stable-Diffusion-3 MM-DiT reading, with per-stream qkv and output projections
  around the joint attention (64.6M at S/2). Same interface; kept for comparison.
- ``FastRater-*``: our variant for cheap selection. Image tokens attend only to image tokens, so the
  image stream is computed once per image and shared by the k candidate noises (noise tokens still
  attend to image and noise tokens). Scoring k candidates costs one image pass plus k noise passes
  instead of k joint passes; it is trained by the same meta-learning (it is just another nn.Module).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from .layers import Attention, Mlp, PatchEmbed, TimestepEmbedder, check_model_inputs, modulate, sincos_pos_embed_2d

ABLATIONS = ("full", "no_timestep", "no_image", "no_image_class", "noise_only")


@dataclass(frozen=True)
class RaterArch:
    """One registry row. ``per_stream_attn``: separate qkv/proj per stream (MM-DiT) instead of one
    shared attention module; ``shared_image``: image stream computed once and shared by k candidates."""

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    per_stream_attn: bool = False
    shared_image: bool = False
    mlp_ratio: float = 4.0


_SIZES = {
    # name: (depth, hidden, heads). S matches DiT-S (the paper's rater, B.1).
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "M": (6, 256, 4),  # mid-size: cheap selection at latent scale
    "T": (4, 128, 4),  # CPU demo
    "N": (2, 64, 2),  # unit tests and float64 meta-gradient checks
}
_FAMILIES = {"Rater": {}, "MMRater": {"per_stream_attn": True}, "FastRater": {"shared_image": True}}
RATER_CONFIGS: dict[str, RaterArch] = {
    f"{family}-{size}/{p}": RaterArch(d, h, n, p, **kw)
    for family, kw in _FAMILIES.items()
    for size, (d, h, n) in _SIZES.items()
    for p in (2, 4, 8)
}


class _StreamLayers(nn.Module):
    """The per-stream sublayers of a dual-stream block (norms, MLP and, for MM-DiT, attention projections)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, own_attn: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads) if own_attn else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def mlp_branch(self, x: torch.Tensor, attn_out: torch.Tensor, mods: list[torch.Tensor]) -> torch.Tensor:
        """Residual updates after attention: gate_msa * attn_out, then the modulated MLP."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa.unsqueeze(1) * attn_out
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def _merge_heads(o: torch.Tensor) -> torch.Tensor:
    B, H, T, d = o.shape
    return o.transpose(1, 2).reshape(B, T, H * d)


class DualStreamBlock(nn.Module):
    """Noise tokens n [B*G,T,D] and image tokens x [B,T,D] (or None), conditioning c [B,D] -> (n, x).

    G is the number of noise candidates sharing one image row; G > 1 only with ``shared_image`` (the
    joint rater carries one image copy per candidate, since there the image tokens see the noise).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, has_image: bool, arch: RaterArch):
        super().__init__()
        own = arch.per_stream_attn
        self.noise = _StreamLayers(dim, num_heads, mlp_ratio, own)
        self.image = _StreamLayers(dim, num_heads, mlp_ratio, own) if has_image else None
        self.attn = None if own else Attention(dim, num_heads)
        self.shared_image = arch.shared_image
        self.num_mods = 12 if has_image else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.num_mods * dim))

    def _attn(self, stream: _StreamLayers) -> Attention:
        return stream.attn if stream.attn is not None else self.attn

    def forward(self, n: torch.Tensor, x: torch.Tensor | None, c: torch.Tensor, groups: int = 1):
        mods = list(self.adaLN_modulation(c).chunk(self.num_mods, dim=1))
        nm = [m.repeat_interleave(groups, 0) for m in mods[:6]] if groups > 1 else mods[:6]
        hn = modulate(self.noise.norm1(n), nm[0], nm[1])
        na = self._attn(self.noise)
        if self.image is None:
            out_n = na.proj(_merge_heads(F.scaled_dot_product_attention(*na.heads(hn))))
            return self.noise.mlp_branch(n, out_n, nm), None
        im = mods[6:]
        hx = modulate(self.image.norm1(x), im[0], im[1])
        ia = self._attn(self.image)
        T = n.shape[1]
        if self.shared_image:
            qi, ki, vi = ia.heads(hx)
            qn, kn, vn = na.heads(hn)
            out_i = F.scaled_dot_product_attention(qi, ki, vi)
            if groups > 1:
                ki, vi = ki.repeat_interleave(groups, 0), vi.repeat_interleave(groups, 0)
            out_n = F.scaled_dot_product_attention(qn, torch.cat([ki, kn], 2), torch.cat([vi, vn], 2))
            out_i, out_n = ia.proj(_merge_heads(out_i)), na.proj(_merge_heads(out_n))
        elif self.attn is not None:  # B.1: one attention over the concatenated [image; noise] sequence
            out = self.attn(torch.cat([hx, hn], 1))
            out_i, out_n = out[:, :T], out[:, T:]
        else:  # MM-DiT: per-stream projections, joint attention op
            qi, ki, vi = ia.heads(hx)
            qn, kn, vn = na.heads(hn)
            out = F.scaled_dot_product_attention(torch.cat([qi, qn], 2), torch.cat([ki, kn], 2), torch.cat([vi, vn], 2))
            out_i, out_n = ia.proj(_merge_heads(out[:, :, :T])), na.proj(_merge_heads(out[:, :, T:]))
        return self.noise.mlp_branch(n, out_n, nm), self.image.mlp_branch(x, out_i, im)


@dataclass(frozen=True)
class RaterSpec:
    """Everything needed to rebuild a rater; stored in rater checkpoints and checked against the DiT."""

    name: str
    input_size: int
    in_channels: int
    num_classes: int
    ablation: str = "full"

    def to_dict(self) -> dict:
        return asdict(self)


class NoiseRater(nn.Module):
    """``rater(eps [B,C,H,W], t [B] int, x0 [B,C,H,W], y [B] int) -> scores [B]``.

    Labels equal to ``num_classes`` are the null class (unconditional or dropped label).
    ``score_candidates(eps [B,K,C,H,W], t, x0, y) -> [B,K]`` scores K candidates per image in one batched
    forward (and, for ``FastRater-*``, one image pass per image).
    """

    def __init__(self, spec: RaterSpec):
        super().__init__()
        if spec.name not in RATER_CONFIGS:
            raise ConfigError(f"unknown rater {spec.name!r}; choose one of {', '.join(RATER_CONFIGS)}")
        if spec.ablation not in ABLATIONS:
            raise ConfigError(f"unknown rater ablation {spec.ablation!r}; choose one of {', '.join(ABLATIONS)}")
        arch = RATER_CONFIGS[spec.name]
        if spec.input_size % arch.patch_size:
            raise ConfigError(
                f"input size {spec.input_size} is not divisible by the rater patch size {arch.patch_size} of "
                f"{spec.name}; pick a rater with a smaller patch (e.g. /2)"
            )
        if spec.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1 (use 1 for unconditional data), got {spec.num_classes}")
        self.spec = spec
        self.arch = arch
        dim = arch.hidden_size
        # Table 2 ablations: (1) no timestep, (2) no image, (3) no image and class, (4) noise only.
        self.use_image = spec.ablation in ("full", "no_timestep")
        self.use_class = spec.ablation in ("full", "no_timestep", "no_image")
        self.use_timestep = spec.ablation in ("full", "no_image", "no_image_class")
        self.shared_image = arch.shared_image
        self.noise_embedder = PatchEmbed(spec.input_size, arch.patch_size, spec.in_channels, dim)
        self.image_embedder = (
            PatchEmbed(spec.input_size, arch.patch_size, spec.in_channels, dim) if self.use_image else None
        )
        T = self.noise_embedder.num_patches
        self.pos_embed = nn.Parameter(  # frozen, shared by both streams
            torch.from_numpy(sincos_pos_embed_2d(dim, int(round(T**0.5)))).float()[None], requires_grad=False
        )
        self.noise_type = nn.Parameter(torch.zeros(1, 1, dim))
        self.image_type = nn.Parameter(torch.zeros(1, 1, dim)) if self.use_image else None
        self.t_embedder = TimestepEmbedder(dim) if self.use_timestep else None
        self.y_embedder = nn.Embedding(spec.num_classes + 1, dim) if self.use_class else None
        self.blocks = nn.ModuleList(
            DualStreamBlock(dim, arch.num_heads, arch.mlp_ratio, self.use_image, arch) for _ in range(arch.depth)
        )
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)
        self.hidden_size = dim
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier-uniform for every Linear and patch projection, zero biases; NOT adaLN-Zero (B.1)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for emb in (self.noise_embedder, self.image_embedder):
            if emb is not None:
                w = emb.proj.weight.data
                nn.init.xavier_uniform_(w.view(w.shape[0], -1))
                nn.init.zeros_(emb.proj.bias)
        for p in (self.noise_type, self.image_type):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)

    def _condition(self, t: torch.Tensor, y: torch.Tensor, batch: int, ref: torch.Tensor) -> torch.Tensor:
        c = torch.zeros(batch, self.hidden_size, dtype=ref.dtype, device=ref.device)
        if self.t_embedder is not None:
            c = c + self.t_embedder(t).to(ref.dtype)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y).to(ref.dtype)
        return c

    def _score(self, eps: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, y: torch.Tensor, groups: int):
        """eps [B*G,...]; t, x0, y per image [B]. Returns [B*G]."""
        B = x0.shape[0]
        n = self.noise_embedder(eps) + self.pos_embed + self.noise_type
        x = None
        if self.image_embedder is not None:
            x = self.image_embedder(x0) + self.pos_embed + self.image_type
        c = self._condition(t, y, B, n)
        if groups > 1 and not self.shared_image:
            # Joint attention: the image tokens see the noise, so each candidate needs its own image copy
            # (the paper's rater costs k full passes).
            x = x.repeat_interleave(groups, 0) if x is not None else None
            c = c.repeat_interleave(groups, 0)
            groups = 1
        for block in self.blocks:
            n, x = block(n, x, c, groups)
        return self.head(self.head_norm(n.mean(dim=1))).squeeze(-1)

    def forward(self, eps: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.spec
        check_model_inputs(eps, t, y, s.in_channels, s.input_size, f"rater {s.name} (eps)")
        if x0.shape != eps.shape:
            raise ValueError(f"rater expects x0 and eps of the same shape, got {list(x0.shape)} and {list(eps.shape)}")
        return self._score(eps, t, x0, y, 1)

    def score_candidates(self, eps: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """eps [B,K,C,H,W] -> scores [B,K] (one batched forward)."""
        s = self.spec
        check_model_inputs(x0, t, y, s.in_channels, s.input_size, f"rater {s.name} (x0)")
        if eps.dim() != 5 or eps.shape[0] != x0.shape[0] or eps.shape[2:] != x0.shape[1:]:
            raise ValueError(
                f"score_candidates expects eps [B,K,C,H,W] matching x0 {list(x0.shape)}, got {list(eps.shape)}"
            )
        B, K = eps.shape[:2]
        return self._score(eps.reshape(B * K, *eps.shape[2:]), t, x0, y, K).reshape(B, K)


def build_rater(
    name: str, *, input_size: int, in_channels: int, num_classes: int, ablation: str = "full"
) -> NoiseRater:
    """Build a registered rater: ``Rater-S/2`` (the paper's, B.1), smaller ``Rater-M/T/N``, ``MMRater-*``
    (per-stream attention projections) and ``FastRater-*`` (shared image stream). ``ablation`` is one of
    the paper's Table 2 variants: full, no_timestep, no_image, no_image_class, noise_only."""
    return NoiseRater(RaterSpec(name, input_size, in_channels, num_classes, ablation))


def group_weights(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Group-normalised weights (paper eq. 2): softmax over the K candidates of each row. [B,K] -> [B,K]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if scores.dim() != 2:
        raise ValueError(f"group_weights expects scores [B,K], got {list(scores.shape)}")
    return torch.softmax(scores / temperature, dim=-1)
