"""GPU-only checks (skipped without CUDA; `scripts/gpu_check.sh` runs them with ``-m gpu``): the latent
cache, pinned loading, bf16/TF32/fused AdamW/compile/gradient checkpointing on CUDA, decode on CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

RES = 32


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    from test_latents import make_tiny_vae

    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    from test_latents import _write_images

    root = tmp_path_factory.mktemp("imgs") / "folder"
    _write_images(root)
    return root


@pytest.fixture(scope="module")
def cuda_cache(tmp_path_factory, image_folder, vae_dir) -> Path:
    from noiserater.data.latents import cache_latents

    out = tmp_path_factory.mktemp("cache") / "cuda"
    assert cache_latents(image_folder, vae_dir, out, resolution=RES, flip=True, batch_size=4, device="cuda",
                         progress=False).complete
    return out


def _tiny_train(tmp_path, name, **kw):
    from noiserater.models.loading import load_diffusion
    from noiserater.train import TrainConfig, train

    opts = dict(data="digits", model="DiT-N/2", run_dir=str(tmp_path / name), steps=4, batch_size=16, lr=1e-3,
                log_every=1, sample_every=1000, ckpt_every=1000, sample_steps=2, tensorboard=False, progress=False)
    opts.update(kw)
    summary = train(TrainConfig(**opts))
    model, _, state = load_diffusion(summary["checkpoint"], use_ema=False)
    return summary, model.state_dict(), state


def test_cache_latents_on_cuda_matches_cpu(tmp_path, image_folder, vae_dir, cuda_cache):
    from noiserater.data.latents import DATA_NAME, cache_latents

    cpu = tmp_path / "cpu"
    cache_latents(image_folder, vae_dir, cpu, resolution=RES, flip=True, batch_size=4, device="cpu", progress=False)
    a, b = np.load(cpu / DATA_NAME), np.load(cuda_cache / DATA_NAME)
    assert np.array_equal(a["label"], b["label"])
    np.testing.assert_allclose(a["latent"], b["latent"], rtol=1e-3, atol=1e-4)  # cuDNN vs CPU convolutions


def test_memmap_batches_are_pinned_and_copy_to_cuda(cuda_cache):
    from noiserater.data.latents import MemmapRows, load_latent_cache

    lazy = load_latent_cache(cuda_cache, in_memory=False)
    eager = load_latent_cache(cuda_cache, in_memory=True)
    assert isinstance(lazy.images, MemmapRows)
    idx = torch.tensor([5, 0, 19, 3])
    batch = lazy.images[idx]
    assert batch.is_pinned()
    on_gpu = batch.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), eager.images[idx])


def test_cuda_training_fp32_bf16_tf32_fused_adamw(tmp_path):
    s32, w32, st = _tiny_train(tmp_path, "fp32", tf32=False)
    sbf, wbf, _ = _tiny_train(tmp_path, "bf16", amp=True)
    stf, _, _ = _tiny_train(tmp_path, "tf32", tf32=True)
    for s in (s32, sbf, stf):
        assert s["step"] == 4 and np.isfinite(s["final_loss"])
    # same data, noise and init: bf16 / TF32 arithmetic moves the loss a little, not a lot
    assert abs(sbf["final_loss"] - s32["final_loss"]) < 0.05 * s32["final_loss"]
    assert abs(stf["final_loss"] - s32["final_loss"]) < 0.02 * s32["final_loss"]
    assert any(not torch.equal(wbf[k], w32[k]) for k in w32)  # autocast did change the arithmetic
    assert st["config"]["amp"] is False and st["config"]["tf32"] is False


def test_cuda_grad_checkpointing_same_gradients():
    from noiserater.models import build_dit
    from noiserater.run.speed import set_tf32

    set_tf32(False)
    torch.manual_seed(0)
    m = build_dit("DiT-S/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=False).cuda().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(4, 4, 32, 32, device="cuda")
    t, y = torch.tensor([1, 200, 600, 999], device="cuda"), torch.tensor([0, 5, 999, 1000], device="cuda")
    grads = {}
    for ck in (False, True):
        m.grad_checkpointing = ck
        m.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats()
        (m(x, t, y) ** 2).mean().backward()
        grads[ck] = [p.grad.clone() for p in m.parameters() if p.requires_grad]
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cuda_compile_trains(tmp_path):
    s, w, _ = _tiny_train(tmp_path, "compiled", compile=True)
    e, we, _ = _tiny_train(tmp_path, "eager", compile=False)
    assert s["step"] == 4 and np.isfinite(s["final_loss"])
    assert abs(s["final_loss"] - e["final_loss"]) < 0.02 * max(1.0, e["final_loss"])


def test_train_on_cache_and_decode_on_cuda(tmp_path, cuda_cache, vae_dir):
    from noiserater.sampling import sample_from_checkpoint

    s, _, state = _tiny_train(tmp_path, "latent", data=str(cuda_cache), batch_size=8, amp=True)
    assert state["data"]["latent"]["scaling_factor"] == pytest.approx(0.18215)
    imgs, _ = sample_from_checkpoint(s["checkpoint"], 4, "cycle", 1.25, 4, device="cuda")
    cpu, _ = sample_from_checkpoint(s["checkpoint"], 4, "cycle", 1.25, 4, device="cpu")
    assert imgs.shape == (4, 3, RES, RES) and imgs.device.type == "cpu"
    torch.testing.assert_close(imgs, cpu, rtol=0, atol=5e-2)


def test_dit_s2_bf16_forward_close_to_fp32():
    from noiserater.models import build_dit

    torch.manual_seed(0)
    m = build_dit("DiT-S/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True).cuda().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
        x = torch.randn(8, 4, 32, 32, device="cuda")
        t, y = torch.randint(0, 1000, (8,), device="cuda"), torch.randint(0, 1001, (8,), device="cuda")
        ref = m(x, t, y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x, t, y)
    assert out.dtype == torch.bfloat16
    rel = float((out.float() - ref).norm() / ref.norm())
    assert rel < 0.05, rel
