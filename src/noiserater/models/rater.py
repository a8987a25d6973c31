"""The noise rater phi_eta(eps, t, x0, y) -> score (paper appendix B.1) and a faster shared-image variant.

Two patch-embedding streams (image x0, noise eps) share one frozen 2D sin-cos position embedding and get a
learnable type embedding each. The conditioning vector is timestep embedding + class embedding. Each
dual-stream block has per-stream LayerNorm, qkv/out projections, MLP and adaLN modulation (one Linear to
12*D: 6 vectors per stream) and one joint attention over both streams' tokens. The head mean-pools the
noise tokens, applies LayerNorm and a Linear to one scalar. All Linear layers use Xavier init: an
adaLN-Zero rater scores every noise equally and gets no meta-gradient at all.

``FastRater-*`` is our variant for cheap selection: image tokens attend only to image tokens, so the image
stream is computed once per image and shared by the k candidate noises (noise tokens still attend to the
image tokens). Scoring k candidates then costs one image pass plus k noise passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Mlp, PatchEmbed, TimestepEmbedder, check_model_inputs, modulate, sincos_pos_embed_2d

ABLATIONS = ("full", "no_timestep", "no_image", "no_image_class", "noise_only")

_SIZES = {
    # name: (depth, hidden, heads). S matches DiT-S (paper's rater, ~60M params at 32x32x4, p=2).
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "M": (6, 256, 4),  # mid-size: cheap selection at latent scale
    "T": (4, 128, 4),  # CPU demo
    "N": (2, 64, 2),  # unit tests and float64 meta-gradient checks
}
RATER_CONFIGS: dict[str, tuple[int, int, int, int, bool]] = {}
for _size, (_d, _h, _n) in _SIZES.items():
    for _p in (2, 4, 8):
        RATER_CONFIGS[f"Rater-{_size}/{_p}"] = (_d, _h, _n, _p, False)
        RATER_CONFIGS[f"FastRater-{_size}/{_p}"] = (_d, _h, _n, _p, True)


class _Stream(nn.Module):
    """Per-stream layers of a dual-stream block (everything but the shared attention op)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def qkv_heads(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
        B, T, D = x.shape
        h = modulate(self.norm1(x), shift, scale)
        qkv = self.qkv(h).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def finish(self, x, attn_out, gate_msa, shift_mlp, scale_mlp, gate_mlp):
        B, H, T, d = attn_out.shape
        x = x + gate_msa.unsqueeze(1) * self.proj(attn_out.transpose(1, 2).reshape(B, T, H * d))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DualStreamBlock(nn.Module):
    """Noise tokens n [B*G,T,D] and image tokens x [B,T,D] (or None), conditioning c [B,D].

    G is the number of noise candidates sharing one image row (G=1 in the joint-attention rater, where
    every noise row carries its own copy of the image).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, has_image: bool, shared_image: bool):
        super().__init__()
        self.noise = _Stream(dim, num_heads, mlp_ratio)
        self.image = _Stream(dim, num_heads, mlp_ratio) if has_image else None
        self.shared_image = shared_image
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (12 if has_image else 6) * dim))

    def forward(self, n: torch.Tensor, x: torch.Tensor | None, c: torch.Tensor, groups: int):
        mods = self.adaLN_modulation(c).chunk(12 if self.image is not None else 6, dim=1)
        nm = [m.repeat_interleave(groups, 0) if groups > 1 else m for m in mods[:6]]
        qn, kn, vn = self.noise.qkv_heads(n, nm[0], nm[1])
        if self.image is None:
            out_n = F.scaled_dot_product_attention(qn, kn, vn)
            return self.noise.finish(n, out_n, nm[2], nm[3], nm[4], nm[5]), None
        im = mods[6:]
        qi, ki, vi = self.image.qkv_heads(x, im[0], im[1])
        T = n.shape[1]
        if self.shared_image:
            out_i = F.scaled_dot_product_attention(qi, ki, vi)
            rep = (lambda a: a.repeat_interleave(groups, 0)) if groups > 1 else (lambda a: a)
            out_n = F.scaled_dot_product_attention(qn, torch.cat([rep(ki), kn], 2), torch.cat([rep(vi), vn], 2))
        else:
            out = F.scaled_dot_product_attention(
                torch.cat([qi, qn], 2), torch.cat([ki, kn], 2), torch.cat([vi, vn], 2)
            )
            out_i, out_n = out[:, :, :T], out[:, :, T:]
        n = self.noise.finish(n, out_n, nm[2], nm[3], nm[4], nm[5])
        x = self.image.finish(x, out_i, im[2], im[3], im[4], im[5])
        return n, x


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

    ``score_candidates(eps [B,K,C,H,W], t, x0, y) -> [B,K]`` scores K candidates per image in one batched
    forward (and, for the shared-image variant, one image pass per image).
    """

    def __init__(self, spec: RaterSpec):
        super().__init__()
        if spec.name not in RATER_CONFIGS:
            raise ValueError(f"unknown rater {spec.name!r}; choose one of {', '.join(RATER_CONFIGS)}")
        if spec.ablation not in ABLATIONS:
            raise ValueError(f"unknown rater ablation {spec.ablation!r}; choose one of {', '.join(ABLATIONS)}")
        depth, dim, heads, patch, shared = RATER_CONFIGS[spec.name]
        if spec.input_size % patch:
            raise ValueError(
                f"input size {spec.input_size} is not divisible by the rater patch size {patch} of {spec.name}"
            )
        self.spec = spec
        self.use_image = spec.ablation in ("full", "no_timestep")
        self.use_class = spec.ablation in ("full", "no_timestep", "no_image")
        self.use_timestep = spec.ablation in ("full", "no_image", "no_image_class")
        self.shared_image = shared
        self.noise_embedder = PatchEmbed(spec.input_size, patch, spec.in_channels, dim)
        self.image_embedder = PatchEmbed(spec.input_size, patch, spec.in_channels, dim) if self.use_image else None
        T = self.noise_embedder.num_patches
        self.pos_embed = nn.Parameter(
            torch.from_numpy(sincos_pos_embed_2d(dim, int(T**0.5))).float()[None], requires_grad=False
        )
        self.noise_type = nn.Parameter(torch.zeros(1, 1, dim))
        self.image_type = nn.Parameter(torch.zeros(1, 1, dim)) if self.use_image else None
        self.t_embedder = TimestepEmbedder(dim) if self.use_timestep else None
        self.y_embedder = nn.Embedding(spec.num_classes + 1, dim) if self.use_class else None
        self.blocks = nn.ModuleList(
            DualStreamBlock(dim, heads, 4.0, self.use_image, shared) for _ in range(depth)
        )
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)
        self.hidden_size = dim
        self._init_weights()

    def _init_weights(self) -> None:
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
            c = c + self.y_embedder(y)
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
            # Joint attention needs an image copy per candidate (the paper's rater cost).
            x = x.repeat_interleave(groups, 0) if x is not None else None
            c = c.repeat_interleave(groups, 0)
            groups = 1
        for block in self.blocks:
            n, x = block(n, x, c, groups)
        return self.head(self.head_norm(n.mean(dim=1))).squeeze(-1)

    def forward(self, eps: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.spec
        check_model_inputs(eps, t, y, s.in_channels, s.input_size, s.num_classes, "rater (eps)")
        if x0.shape != eps.shape:
            raise ValueError(f"rater expects x0 and eps of the same shape, got {list(x0.shape)} and {list(eps.shape)}")
        return self._score(eps, t, x0, y, 1)

    def score_candidates(self, eps: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """eps [B,K,C,H,W] -> scores [B,K] (one batched forward)."""
        if eps.dim() != 5 or eps.shape[0] != x0.shape[0] or eps.shape[2:] != x0.shape[1:]:
            raise ValueError(f"score_candidates expects eps [B,K,C,H,W] matching x0 {list(x0.shape)}, got {list(eps.shape)}")
        B, K = eps.shape[:2]
        check_model_inputs(x0, t, y, self.spec.in_channels, self.spec.input_size, self.spec.num_classes, "rater (x0)")
        return self._score(eps.reshape(B * K, *eps.shape[2:]), t, x0, y, K).reshape(B, K)


def build_rater(
    name: str, *, input_size: int, in_channels: int, num_classes: int, ablation: str = "full"
) -> NoiseRater:
    """Build a registered rater: ``Rater-S/2`` (the paper's, ~60M at 32x32x4), smaller ``Rater-M/T/N``,
    and ``FastRater-*`` (shared image stream). ``ablation`` is one of paper Table 3's variants."""
    return NoiseRater(RaterSpec(name, input_size, in_channels, num_classes, ablation))


def group_weights(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Group-normalised weights: softmax over the K candidates of each row. scores [B,K] -> [B,K]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(scores / temperature, dim=-1)
