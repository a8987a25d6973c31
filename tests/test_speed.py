"""Speed switches: gradient checkpointing (exact gradients, also under functional_call and double backward),
torch.compile on CPU, TF32/autocast helpers."""

from __future__ import annotations

import time

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from noiserater.models import build_dit
from noiserater.run.speed import autocast, set_tf32


def _model_and_batch(seed: int = 0):
    torch.manual_seed(seed)
    m = build_dit("DiT-N/2", input_size=8, in_channels=4, num_classes=3, learn_sigma=False).double()
    with torch.no_grad():  # leave adaLN-Zero's identity start so every block matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    return m, x, torch.tensor([1, 500, 900]), torch.tensor([0, 2, 3])


def _grads(m, x, t, y, ckpt: bool):
    m.grad_checkpointing = ckpt
    m.zero_grad(set_to_none=True)
    (m(x, t, y) ** 2).mean().backward()
    return [p.grad.clone() for p in m.parameters() if p.requires_grad]


def test_grad_checkpointing_gives_the_same_gradients():
    m, x, t, y = _model_and_batch()
    m.train()
    torch.manual_seed(5)  # label dropout draws: same on both passes
    plain = _grads(m, x, t, y, False)
    torch.manual_seed(5)
    ck = _grads(m, x, t, y, True)
    assert len(plain) == len(ck) > 0
    for a, b in zip(plain, ck):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    assert any(float(a.abs().max()) > 0 for a in plain[-20:])


def test_grad_checkpointing_is_exact_under_functional_call_and_double_backward():
    """The meta-gradient calls the DiT through functional_call and differentiates twice: plain
    torch.utils.checkpoint would recompute with the module's own weights there (wrong gradients)."""
    m, x, t, y = _model_and_batch()
    m.eval()
    params = {k: (v.detach() * 1.1).requires_grad_() for k, v in m.named_parameters() if v.requires_grad}
    out = {}
    with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
        for ck in (False, True):
            m.grad_checkpointing = ck
            loss = (functional_call(m, params, (x, t, y)) ** 2).mean()
            g = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            v = [torch.randn(a.shape, dtype=a.dtype, generator=torch.Generator().manual_seed(i)) for i, a in enumerate(g)]
            hv = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v)), list(params.values()), allow_unused=True)
            out[ck] = (g, hv)
    for a, b in zip(out[False][0], out[True][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    n = 0
    for a, b in zip(out[False][1], out[True][1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
            n += 1
    assert n > 0
    # the weights given to functional_call, not the module's own, were differentiated
    m.grad_checkpointing = False
    own = torch.autograd.grad((m(x, t, y) ** 2).mean(), [p for p in m.parameters() if p.requires_grad])
    assert not all(torch.allclose(a, b) for a, b in zip(own, out[True][0]))


def test_train_with_grad_checkpointing_matches_without(tmp_path):
    from noiserater.models.loading import load_diffusion
    from noiserater.train import TrainConfig, train

    def run(name, ck):
        cfg = TrainConfig(data="digits", model="DiT-N/2", run_dir=str(tmp_path / name), steps=3, batch_size=8, lr=1e-3,
                          log_every=1, sample_every=1000, ckpt_every=1000, sample_steps=2, tensorboard=False,
                          progress=False, grad_checkpointing=ck)
        return load_diffusion(train(cfg)["checkpoint"], use_ema=False)[0].state_dict()

    a, b = run("plain", False), run("ckpt", True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_tf32_switch_and_autocast_helpers():
    before = torch.get_float32_matmul_precision()
    try:
        set_tf32(True)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        set_tf32(False)
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cudnn.allow_tf32 = True
    lin = torch.nn.Linear(4, 4)
    with autocast("cpu", True):
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast("cpu", False):
        assert lin(torch.randn(2, 4)).dtype == torch.float32


@pytest.mark.slow
def test_compile_trains_on_cpu(tmp_path):
    """`--compile` (torch.compile, inductor) runs a few CPU steps and lands near the eager result."""
    pytest.importorskip("torch._inductor")
    from noiserater.models.loading import load_diffusion
    from noiserater.train import TrainConfig, train

    def run(name, compiled):
        cfg = TrainConfig(data="digits", model="DiT-N/2", run_dir=str(tmp_path / name), steps=3, batch_size=8, lr=1e-3,
                          log_every=1, sample_every=1000, ckpt_every=1000, sample_steps=2, tensorboard=False,
                          progress=False, compile=compiled)
        s = train(cfg)
        return s, load_diffusion(s["checkpoint"], use_ema=False)[0].state_dict()

    t0 = time.perf_counter()
    s_c, w_c = run("compiled", True)
    secs = time.perf_counter() - t0
    s_e, w_e = run("eager", False)
    assert s_c["step"] == 3 and abs(s_c["final_loss"] - s_e["final_loss"]) < 1e-3 * max(1.0, abs(s_e["final_loss"]))
    for k in w_e:  # the checkpoint holds the plain module's names (no _orig_mod. prefix)
        torch.testing.assert_close(w_c[k], w_e[k], rtol=1e-3, atol=1e-4, msg=k)
    print(f"compiled 3 steps in {secs:.1f}s")
