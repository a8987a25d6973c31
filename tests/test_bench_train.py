"""`noiserater bench train`: the plain-PyTorch reference computes our DiT's function, and the JSON is complete."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from noiserater.bench.train import CONFIGS, PlainDiT, _memory_child, _Ours, _Plain
from noiserater.cli import main
from noiserater.models import build_dit


def test_plain_formulation_computes_the_same_function_and_gradients():
    torch.manual_seed(0)
    dit = build_dit("DiT-T/4", input_size=8, in_channels=3, num_classes=10, learn_sigma=False)
    with torch.no_grad():  # leave the adaLN-Zero start so every branch contributes
        for p in dit.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    plain = PlainDiT.from_dit(dit)
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])
    a, b = dit(x, t, y), plain(x, t, y)
    assert a.abs().mean() > 0.1
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(plain.qkv[1].weight.grad, dit.blocks[1].attn.qkv.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain.ada.weight.grad[6 * 128: 12 * 128], dit.blocks[1].adaLN_modulation[1].weight.grad,
                               rtol=1e-4, atol=1e-5)


def test_both_steps_take_one_adamw_step_at_lr():
    """AdamW's first step (bias-corrected, weight decay 0) moves each parameter with gradient g by
    lr * |g| / (|g| + eps), i.e. by lr wherever |g| >> eps: both formulations must show exactly that."""
    cfg = CONFIGS["digits-tiny"]
    for runner_cls in (_Ours, _Plain):
        r = runner_cls(cfg, torch.device("cpu"))
        before = [p.detach().clone() for p in r.model.parameters()]
        r.step()
        deltas = torch.cat([(p.detach() - p0).abs().flatten() for p0, p in zip(before, r.model.parameters())])
        moved = deltas[deltas > 0]
        # at the first step only the layers after the DiT's zero-initialised adaLN / output get a gradient
        assert moved.numel() >= 100, runner_cls.__name__
        assert float(moved.max()) <= 1e-4 * (1 + 1e-3), runner_cls.__name__  # never more than lr
        assert float(moved.median()) == pytest.approx(1e-4, rel=0.02), runner_cls.__name__


def test_memory_probe_reports_peak():
    m = _memory_child("digits-tiny", "ours", 1)
    assert m["kind"] == "cpu_peak_rss" and m["peak_mb"] > 50 and m["step_mb"] >= 0


def test_bench_train_writes_json(tmp_path):
    out = tmp_path / "train.json"
    result = CliRunner().invoke(main, ["bench", "train", "--setups", "digits-tiny", "--steps", "1", "--repeats", "1",
                                       "--warmup", "0", "--loop-steps", "1", "--no-memory", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    rec = data["records"][0]
    assert rec["config"] == "digits-tiny" and rec["model"] == "DiT-T/2" and rec["batch_size"] == 128
    assert rec["ours_images_per_s"] > 0 and rec["plain_images_per_s"] > 0 and rec["ratio_ours_over_plain"] > 0
    assert rec["train_loop_images_per_s"] > 0
    assert data["machine"]["torch"] == torch.__version__
    assert "| digits-tiny |" in result.stdout
    bad = CliRunner().invoke(main, ["bench", "train", "--setups", "nope", "--json", str(out)])
    assert bad.exit_code == 2 and "unknown config" in bad.output
