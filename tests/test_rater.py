"""The noise rater (paper appendix B.1): size, architecture, init, ablations, batched candidate scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from noiserater.checkpoint import CheckpointError
from noiserater.models import ABLATIONS, RATER_CONFIGS, DiTSpec, build_dit, build_rater, group_weights
from noiserater.models.loading import load_rater, save_rater

SMALL = dict(input_size=8, in_channels=2, num_classes=5)


def _inputs(B=3, K=4, C=2, S=8, classes=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, C, S, S, generator=g, dtype=dtype)
    eps = torch.randn(B, K, C, S, S, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, classes + 1, (B,), generator=g)  # includes the null class
    return eps, t, x0, y


def _rater(name="Rater-N/2", ablation="full", seed=0, **kw):
    torch.manual_seed(seed)
    return build_rater(name, **{**SMALL, **kw}, ablation=ablation).double().eval()


# ---- size ----------------------------------------------------------------------------------------------


def _expected_params(D, depth, C, p, T, classes, per_stream_attn=False, freq=256):
    """Parameter count of B.1's rater, from the description (not from the module)."""
    patch = 2 * (C * p * p * D + D)  # two independent PatchEmbed convs
    pos = T * D  # one frozen sin-cos table shared by both streams
    types = 2 * D  # learnable per-stream type embeddings
    t_mlp = freq * D + D + D * D + D  # sinusoid -> Linear -> SiLU -> Linear
    y_emb = (classes + 1) * D  # with the null class
    attn = 3 * D * D + 3 * D + D * D + D
    mlp = D * 4 * D + 4 * D + 4 * D * D + D
    ada = D * 12 * D + 12 * D  # ONE Linear to 12 modulation vectors
    block = (2 if per_stream_attn else 1) * attn + 2 * mlp + ada
    head = 2 * D + D + 1  # LayerNorm (affine) + Linear -> scalar
    return patch + pos + types + t_mlp + y_emb + depth * block + head


def test_rater_s2_has_about_60m_parameters_as_in_b1():
    with torch.device("meta"):
        rater = build_rater("Rater-S/2", input_size=32, in_channels=4, num_classes=1000)
        dit = build_dit("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)
    n = sum(p.numel() for p in rater.parameters())
    assert n == _expected_params(384, 12, 4, 2, 256, 1000)
    assert 55e6 < n < 62e6  # "approximately 60M"
    n_dit = sum(p.numel() for p in dit.parameters())
    assert 1.6 < n / n_dit < 2.1  # "roughly twice that of DiT-S/2"
    # The MM-DiT reading (per-stream attention projections) is the other registered family.
    with torch.device("meta"):
        mm = build_rater("MMRater-S/2", input_size=32, in_channels=4, num_classes=1000)
    assert sum(p.numel() for p in mm.parameters()) == _expected_params(384, 12, 4, 2, 256, 1000, True)


def test_rater_s2_uses_the_dit_s2_block_config():
    a = RATER_CONFIGS["Rater-S/2"]
    assert (a.depth, a.hidden_size, a.num_heads, a.patch_size, a.mlp_ratio) == (12, 384, 6, 2, 4.0)
    with torch.device("meta"):
        r = build_rater("Rater-S/2", input_size=32, in_channels=4, num_classes=1000)
    assert r.noise_embedder.num_patches == 256  # T = (32/2)^2 tokens per stream
    assert not r.pos_embed.requires_grad and r.noise_type.requires_grad and r.image_type.requires_grad


# ---- architecture facts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Rater-N/2", "MMRater-N/2", "FastRater-N/2"])
def test_twelve_modulation_vectors_per_block(name):
    r = _rater(name)
    D = r.hidden_size
    for block in r.blocks:
        assert block.adaLN_modulation[-1].out_features == 12 * D  # 6 per stream, one Linear
        assert block.noise.mlp is not block.image.mlp
    # Only the noise stream is left without the image: 6 vectors.
    assert _rater(name, "no_image").blocks[0].adaLN_modulation[-1].out_features == 6 * D


def _reference_score(r, eps, t, x0, y):
    """B.1 written out with plain tensor ops from the state dict: explicit LayerNorm, softmax attention,
    tanh-GELU. FastRater = the joint rater with image queries masked off the noise keys."""
    sd = r.state_dict()
    a = r.arch
    D, H, p = a.hidden_size, a.num_heads, a.patch_size
    d = D // H

    def lin(z, name):
        return z @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(z, eps_=1e-6):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return (z - mu) / torch.sqrt(var + eps_)

    def gelu(z):
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))

    def silu(z):
        return z / (1 + torch.exp(-z))

    def embed(img, name):
        w = sd[name + ".proj.weight"]  # [D,C,p,p]: non-overlapping patches, row-major
        B, C, S, _ = img.shape
        g = S // p
        patches = img.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)
        return patches @ w.reshape(D, -1).T + sd[name + ".proj.bias"]

    use_img = r.image_embedder is not None
    n = embed(eps, "noise_embedder") + sd["pos_embed"] + sd["noise_type"]
    x = embed(x0, "image_embedder") + sd["pos_embed"] + sd["image_type"] if use_img else None
    c = torch.zeros(eps.shape[0], D, dtype=eps.dtype)
    if r.t_embedder is not None:
        half = 128
        # The sinusoid is float32 (as in DiT), whatever the model dtype; the rest is float64.
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        tf = torch.cat([torch.cos(args), torch.sin(args)], -1).to(eps.dtype)
        c = c + lin(silu(lin(tf, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    if r.y_embedder is not None:
        c = c + sd["y_embedder.weight"][y]
    T = n.shape[1]
    for i in range(a.depth):
        pre = f"blocks.{i}."
        mods = lin(silu(c), pre + "adaLN_modulation.1").chunk(12 if use_img else 6, dim=1)
        streams = [("noise", n, mods[:6])] + ([("image", x, mods[6:])] if use_img else [])
        hs = {s: ln(z) * (1 + m[1][:, None]) + m[0][:, None] for s, z, m in streams}
        order = ["image", "noise"] if use_img else ["noise"]
        tokens = torch.cat([hs[s] for s in order], 1)
        if a.per_stream_attn:
            qkv = torch.cat([lin(hs[s], pre + f"{s}.attn.qkv") for s in order], 1)
        else:
            qkv = lin(tokens, pre + "attn.qkv")
        B, L, _ = qkv.shape
        q, k, v = qkv.reshape(B, L, 3, H, d).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d)
        if a.shared_image and use_img:  # image queries must not see noise keys
            mask = torch.zeros(L, L, dtype=torch.bool)
            mask[:T, T:] = True
            logits = logits.masked_fill(mask, float("-inf"))
        att = torch.softmax(logits, -1) @ v
        att = att.transpose(1, 2).reshape(B, L, D)
        outs = {}
        for j, s in enumerate(order):
            part = att[:, j * T:(j + 1) * T]
            outs[s] = lin(part, pre + (f"{s}.attn.proj" if a.per_stream_attn else "attn.proj"))
        new = {}
        for s, z, m in streams:
            z = z + m[2][:, None] * outs[s]
            h = ln(z) * (1 + m[4][:, None]) + m[3][:, None]
            new[s] = z + m[5][:, None] * lin(gelu(lin(h, pre + f"{s}.mlp.fc1")), pre + f"{s}.mlp.fc2")
        n, x = new["noise"], new.get("image")
    pooled = n.mean(1)  # image tokens dropped, noise tokens mean-pooled
    mu, var = pooled.mean(-1, keepdim=True), pooled.var(-1, unbiased=False, keepdim=True)
    pooled = (pooled - mu) / torch.sqrt(var + 1e-5) * sd["head_norm.weight"] + sd["head_norm.bias"]
    return lin(pooled, "head").squeeze(-1)


@pytest.mark.parametrize("name", ["Rater-N/2", "MMRater-N/2", "FastRater-N/2", "Rater-N/4"])
@pytest.mark.parametrize("ablation", ["full", "no_image"])
def test_forward_matches_an_independent_reference_of_b1(name, ablation):
    r = _rater(name, ablation)
    eps, t, x0, y = _inputs(K=1)
    got = r(eps[:, 0], t, x0, y)
    want = _reference_score(r, eps[:, 0], t, x0, y)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_fast_rater_differs_from_the_joint_rater_with_the_same_weights():
    """The mask matters: with identical weights, image tokens that see the noise give other scores."""
    fast = _rater("FastRater-N/2")
    joint = _rater("Rater-N/2")
    joint.load_state_dict(fast.state_dict())
    eps, t, x0, y = _inputs(K=1)
    assert not torch.allclose(fast(eps[:, 0], t, x0, y), joint(eps[:, 0], t, x0, y))


# ---- initialisation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_xavier_init_gives_different_scores_to_different_noises(ablation):
    r = _rater("Rater-N/2", ablation)
    eps, t, x0, y = _inputs(B=4, K=8)
    s = r.score_candidates(eps, t, x0, y)
    assert s.std(dim=1).min() > 1e-3  # not adaLN-Zero: the group softmax is not uniform at init
    w = group_weights(s)
    assert (w.max(dim=1).values - w.min(dim=1).values).min() > 1e-4


def test_every_linear_is_xavier_uniform_not_zero():
    torch.manual_seed(0)
    r = build_rater("Rater-T/2", input_size=16, in_channels=4, num_classes=10)
    linears = [(n, m) for n, m in r.named_modules() if isinstance(m, torch.nn.Linear)]
    assert any("adaLN" in n for n, _ in linears) and any(n == "head" for n, _ in linears)
    for name, m in linears:
        fan_out, fan_in = m.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = m.weight.detach()
        assert w.abs().max() <= bound + 1e-7, name
        if w.numel() >= 2000:  # uniform(-b, b) has std b/sqrt(3)
            assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3), name
        else:
            assert w.abs().max() > 0.3 * bound, name
        assert torch.count_nonzero(m.bias) == 0, name


# ---- ablations really ignore what they drop --------------------------------------------------------------

IGNORES = {
    "full": set(),
    "no_timestep": {"t"},
    "no_image": {"x0"},
    "no_image_class": {"x0", "y"},
    "noise_only": {"x0", "t", "y"},
}


@pytest.mark.parametrize("name", ["Rater-N/2", "FastRater-N/2"])
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_ablations_ignore_exactly_what_they_drop(name, ablation):
    r = _rater(name, ablation)
    eps, t, x0, y = _inputs(B=4, K=1)
    eps = eps[:, 0]
    base = r(eps, t, x0, y)
    changed = {
        "x0": (eps, t, torch.randn_like(x0), y),
        "t": (eps, (t + 437) % 1000, x0, y),
        "y": (eps, t, x0, (y + 1) % 6),
        "eps": (torch.randn_like(eps), t, x0, y),
    }
    for what, args in changed.items():
        out = r(*args)
        if what in IGNORES[ablation]:
            assert torch.equal(out, base), f"{ablation} must ignore {what}"
        else:
            assert not torch.allclose(out, base, atol=1e-6), f"{ablation} must use {what}"


def test_ablation_parameters_are_not_built():
    r = _rater("Rater-N/2", "noise_only")
    assert r.image_embedder is None and r.t_embedder is None and r.y_embedder is None
    assert all(b.image is None for b in r.blocks)


# ---- batched candidate scoring -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Rater-N/2", "MMRater-N/2", "FastRater-N/2"])
@pytest.mark.parametrize("ablation", ["full", "no_image", "noise_only"])
def test_score_candidates_equals_scoring_each_candidate_separately(name, ablation):
    r = _rater(name, ablation)
    eps, t, x0, y = _inputs(B=3, K=5)
    batched = r.score_candidates(eps, t, x0, y)
    separate = torch.stack([r(eps[:, k], t, x0, y) for k in range(5)], dim=1)
    assert batched.shape == (3, 5)
    torch.testing.assert_close(batched, separate, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,image_rows", [("FastRater-N/2", 3), ("Rater-N/2", 12)])
def test_fast_rater_computes_the_image_stream_once_per_image(name, image_rows):
    r = _rater(name)
    seen = []
    r.blocks[0].image.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    eps, t, x0, y = _inputs(B=3, K=4)
    r.score_candidates(eps, t, x0, y)
    assert seen == [image_rows]  # B for the shared image stream, B*K for the joint rater


def test_rater_input_errors_are_clear():
    r = _rater("Rater-N/2")
    eps, t, x0, y = _inputs(B=2, K=3)
    with pytest.raises(ValueError, match=r"expects images \[B,2,8,8\]"):
        r(eps[:, 0, :1], t, x0, y)
    with pytest.raises(ValueError, match="same shape"):
        r(eps[:, 0], t, x0[:1].expand(2, 2, 8, 8)[:, :, :4, :4], y)
    with pytest.raises(ValueError, match=r"eps \[B,K,C,H,W\]"):
        r.score_candidates(eps[:, 0], t, x0, y)
    with pytest.raises(ValueError, match="unknown rater"):
        build_rater("Rater-Q/2", **SMALL)
    with pytest.raises(ValueError, match="unknown rater ablation"):
        build_rater("Rater-N/2", **SMALL, ablation="no_noise")
    with pytest.raises(ValueError, match="not divisible by the rater patch size 8"):
        build_rater("Rater-N/8", input_size=12, in_channels=1, num_classes=2)


# ---- group weights --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 9)),
           elements=st.floats(-30, 30, allow_nan=False)),
    st.floats(-1e3, 1e3, allow_nan=False),
    st.floats(0.05, 20),
)
def test_group_weights_are_a_softmax_invariant_to_a_shift_of_one_group(scores, shift, temperature):
    s = torch.from_numpy(scores)
    w = group_weights(s, temperature)
    z = scores / temperature
    ref = np.exp(z - z.max(axis=1, keepdims=True))
    ref /= ref.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-9, atol=1e-12)
    shifted = s.clone()
    shifted[0] += shift  # a constant added to one group's scores only
    torch.testing.assert_close(group_weights(shifted, temperature), w, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(w.sum(1), torch.ones(s.shape[0], dtype=s.dtype))


def test_group_weights_refuses_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        group_weights(torch.zeros(2, 3), 0.0)


# ---- checkpoints ------------------------------------------------------------------------------------------------


def test_save_and_load_rater_round_trip_and_refusals(tmp_path):
    r = build_rater("FastRater-N/2", input_size=8, in_channels=1, num_classes=10, ablation="no_image")
    path = tmp_path / "r.pt"
    save_rater(path, r)
    spec = DiTSpec("DiT-N/2", 8, 1, 10)
    loaded = load_rater(path, expect=spec)
    assert loaded.spec == r.spec
    for k, v in r.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    for field, bad in (("input_size", DiTSpec("DiT-N/2", 16, 1, 10)), ("in_channels", DiTSpec("DiT-N/2", 8, 3, 10)),
                       ("num_classes", DiTSpec("DiT-N/2", 8, 1, 7))):
        with pytest.raises(CheckpointError, match=f"{field}="):
            load_rater(path, expect=bad)
