"""The DiT backbone (Peebles & Xie, 2023) and its registry.

State-dict names and shapes match facebookresearch/DiT, so its published checkpoints (for example
``DiT-XL-2-256x256.pt``) load with :func:`load_reference_dit`. Unlike the reference ``forward_with_cfg``,
classifier-free guidance in :mod:`noiserater.diffusion` is applied to all channels.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import torch
import torch.func
import torch.nn as nn
import torch.utils.checkpoint

from ..checkpoint import CheckpointError, load_state_dict_checked, safe_torch_load
from ..config import ConfigError
from .layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    check_model_inputs,
    gated_residual,
    modulate,
    sincos_pos_embed_2d,
)


@dataclass(frozen=True)
class DiTArch:
    """One row of the DiT paper's model table: depth, width, heads, patch size."""

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0


_SIZES = {
    # name: (depth, hidden, heads) -- DiT paper Table 1, plus tiny CPU configs of our own.
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "M": (6, 192, 3),  # CPU: the "larger backbone" of the CPU transfer study (Table 4)
    "T": (4, 128, 4),  # CPU demo / tests
    "N": (2, 64, 2),  # "nano": unit tests and float64 meta-gradient checks
}
DIT_CONFIGS: dict[str, DiTArch] = {
    f"DiT-{size}/{p}": DiTArch(depth=d, hidden_size=h, num_heads=n, patch_size=p)
    for size, (d, h, n) in _SIZES.items()
    for p in (2, 4, 8)
}


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning. x [B,T,D], c [B,D]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = gated_residual(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


def checkpointed(block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """``block(*inputs)`` with its activations recomputed in backward (torch.utils.checkpoint).

    The block's parameters are passed as checkpoint inputs, so the recomputation uses the tensors of the
    forward pass even under ``torch.func.functional_call`` (whose substitution is gone by backward time);
    gradients and double-backward products are exactly those without checkpointing.
    """
    names, params = zip(*block.named_parameters())

    def run(*args: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(block, dict(zip(names, args[len(inputs):])), args[:len(inputs)])

    return torch.utils.checkpoint.checkpoint(run, *inputs, *params, use_reentrant=False)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer. ``model(x_t [B,C,H,W], t [B] int, y [B] int) -> [B,C or 2C,H,W]``.

    Labels equal to ``num_classes`` are the null class (unconditional). With ``learn_sigma`` the first
    C output channels are the epsilon prediction and the rest the variance interpolation.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Frozen, as in DiT: a buffer would drop it from the state dict and break checkpoint loading.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.grad_checkpointing = False  # recompute each block in backward (saves activation memory)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _xavier(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_xavier)
        grid = int(self.x_embedder.num_patches**0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every residual branch starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B,T,p*p*C] -> images [B,C,H,W]."""
        c, p = self.out_channels, self.patch_size
        h = w = self.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)  # n c h p w q
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_model_inputs(x, t, y, self.in_channels, self.input_size, "DiT")
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = checkpointed(block, x, c) if self.grad_checkpointing and torch.is_grad_enabled() else block(x, c)
        return self.unpatchify(self.final_layer(x, c))


@dataclass(frozen=True)
class DiTSpec:
    """Everything needed to rebuild a DiT: stored in every checkpoint and compared on load."""

    name: str
    input_size: int
    in_channels: int
    num_classes: int
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


def build_dit(
    name: str,
    *,
    input_size: int,
    in_channels: int,
    num_classes: int,
    learn_sigma: bool = True,
    class_dropout_prob: float = 0.1,
) -> DiT:
    """Build a registered DiT (``DiT-S/2`` ... ``DiT-XL/8``, tiny ``DiT-T/*`` and ``DiT-N/*``)."""
    if name not in DIT_CONFIGS:
        raise ConfigError(f"unknown DiT model {name!r}; choose one of {', '.join(DIT_CONFIGS)}")
    arch = DIT_CONFIGS[name]
    if input_size % arch.patch_size:
        raise ConfigError(
            f"input size {input_size} is not divisible by the patch size {arch.patch_size} of {name}; "
            f"choose a model with a patch size that divides {input_size}"
        )
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1 (use 1 for unconditional data), got {num_classes}")
    return DiT(
        input_size=input_size,
        patch_size=arch.patch_size,
        in_channels=in_channels,
        hidden_size=arch.hidden_size,
        depth=arch.depth,
        num_heads=arch.num_heads,
        mlp_ratio=arch.mlp_ratio,
        class_dropout_prob=class_dropout_prob,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
    )


def build_dit_from_spec(spec: DiTSpec | dict) -> DiT:
    spec = spec if isinstance(spec, DiTSpec) else DiTSpec(**spec)
    return build_dit(
        spec.name,
        input_size=spec.input_size,
        in_channels=spec.in_channels,
        num_classes=spec.num_classes,
        learn_sigma=spec.learn_sigma,
        class_dropout_prob=spec.class_dropout_prob,
    )


def load_reference_dit(path: str, name: str = "DiT-XL/2", *, image_size: int = 256, num_classes: int = 1000) -> DiT:
    """Load a facebookresearch/DiT checkpoint (a bare state dict, or one under ``ema``/``model``).

    ``image_size`` is the pixel resolution; the latent input size is image_size // 8 with 4 channels.
    Loading uses ``weights_only=True``: no code in the file is executed.
    """
    # DiT's own training checkpoints also hold ``args`` (an argparse.Namespace): allow just that class.
    state = safe_torch_load(path, "DiT checkpoint", allowed_globals=(argparse.Namespace,))
    if isinstance(state, dict) and "ema" in state and isinstance(state["ema"], dict):
        state = state["ema"]
    elif isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a DiT state dict (a mapping of parameter names to tensors)")
    model = build_dit(name, input_size=image_size // 8, in_channels=4, num_classes=num_classes, learn_sigma=True)
    load_state_dict_checked(model, state, f"{path} (loaded as {name} at {image_size}px; check the model name and image size)")
    return model
