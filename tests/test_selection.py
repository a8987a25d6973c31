"""Noise-selection policies, the drop-in NoiseSelector, and stage-iii continuation with a policy."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from noiserater.checkpoint import CheckpointError, RunDirError
from noiserater.cli import main
from noiserater.data import load_dataset
from noiserater.models import build_dit, build_rater
from noiserater.models.loading import save_rater
from noiserater.objectives import get_objective
from noiserater.randomness import batch_indices
from noiserater.selection import NoiseSelector, get_policy, policy_names
from noiserater.train import TrainConfig, draw_step_randomness, train

ROOT = Path(__file__).resolve().parents[1]


def _batch(B=5, K=6, C=2, S=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, C, S, S, generator=g)
    cand = torch.randn(B, K, C, S, S, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, 3, (B,), generator=g)
    return x0, t, y, cand


def _np_norms(a: np.ndarray) -> np.ndarray:
    return np.sqrt((a.reshape(a.shape[0], a.shape[1], -1).astype(np.float64) ** 2).sum(-1))


# ---- each policy's choice against an independent reference -------------------------------------------------


@pytest.mark.parametrize("name,pick", [
    ("max_norm", lambda x0, c: _np_norms(c).argmax(1)),
    ("min_norm", lambda x0, c: _np_norms(c).argmin(1)),
    ("knn", lambda x0, c: _np_norms(c - x0[:, None]).argmin(1)),
])
def test_plain_policies_pick_what_they_promise(name, pick):
    x0, t, y, cand = _batch()
    # Spread the norms so the choice is clear: candidate k scaled by a random factor per image.
    cand = cand * torch.rand(cand.shape[:2], generator=torch.Generator().manual_seed(1))[..., None, None, None] * 3
    noise, index = get_policy(name, k=6).select(x0, t, y, cand)
    want = pick(x0.numpy(), cand.numpy())
    np.testing.assert_array_equal(index.numpy(), want)
    for b in range(len(x0)):
        assert torch.equal(noise[b], cand[b, want[b]])  # the very candidate, not a copy with changes


def test_max_and_min_norm_on_a_constructed_case():
    base = torch.randn(2, 1, 3, 4, 4)
    scales = torch.tensor([[0.5, 2.0, 1.0], [3.0, 0.1, 1.0]])
    cand = base * scales[..., None, None, None]
    x0, t, y = torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    assert get_policy("max_norm", 3).select(x0, t, y, cand)[1].tolist() == [1, 0]
    assert get_policy("min_norm", 3).select(x0, t, y, cand)[1].tolist() == [0, 1]
    # knn: a candidate equal to the image is at distance 0
    x0 = cand[:, 2].clone()
    assert get_policy("knn", 3).select(x0, t, y, cand)[1].tolist() == [2, 2]


@pytest.mark.parametrize("rater_name", ["Rater-N/2", "FastRater-N/2"])
def test_rater_policy_picks_the_argmax_of_independently_computed_scores(rater_name):
    torch.manual_seed(0)
    rater = build_rater(rater_name, input_size=4, in_channels=2, num_classes=3)
    x0, t, y, cand = _batch()
    policy = get_policy("rater", k=6, rater=rater)
    noise, index = policy.select(x0, t, y, cand)
    with torch.no_grad():  # one candidate at a time, through the plain forward
        scores = torch.stack([rater(cand[:, k], t, x0, y) for k in range(6)], dim=1)
    np.testing.assert_array_equal(index.numpy(), scores.numpy().argmax(1))
    assert torch.equal(noise, cand[torch.arange(5), index])
    assert not rater.training and not any(p.requires_grad for p in rater.parameters())
    w = policy.weights(x0, t, y, cand)
    ref = np.exp(scores.double().numpy() - scores.double().numpy().max(1, keepdims=True))
    np.testing.assert_allclose(w.numpy(), ref / ref.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)


def test_policy_errors_are_clear():
    rater = build_rater("Rater-N/2", input_size=4, in_channels=2, num_classes=3)
    with pytest.raises(ValueError, match="unknown selection policy 'best'"):
        get_policy("best", 2)
    with pytest.raises(ValueError, match="vanilla.*set k"):
        get_policy("vanilla", 4)
    with pytest.raises(ValueError, match="needs a rater checkpoint"):
        get_policy("rater", 4)
    with pytest.raises(ValueError, match="does not use a rater"):
        get_policy("max_norm", 4, rater=rater)
    with pytest.raises(ValueError, match=">= 1"):
        get_policy("knn", 0)
    x0, t, y, cand = _batch(K=3)
    with pytest.raises(ValueError, match=r"expected candidates \[B=5,k=4"):
        get_policy("max_norm", 4).select(x0, t, y, cand)


# ---- the drop-in API -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rater_file(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("rater") / "rater.pt"
    save_rater(path, build_rater("FastRater-N/2", input_size=8, in_channels=1, num_classes=10))
    return path


def test_noise_selector_from_checkpoint_returns_the_rater_top1(rater_file):
    sel = NoiseSelector.from_checkpoint(rater_file, k=4, device="cpu")
    x0 = torch.randn(6, 1, 8, 8)
    t = torch.randint(0, 1000, (6,))
    y = torch.randint(0, 10, (6,))
    eps = sel(x0, t, y, generator=torch.Generator().manual_seed(7))
    assert eps.shape == x0.shape and eps.dtype == x0.dtype
    cand = torch.randn(6, 4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        scores = torch.stack([sel.rater(cand[:, k], t, x0, y) for k in range(4)], 1)
    assert torch.equal(eps, cand[torch.arange(6), scores.argmax(1)])
    # y=None means unconditional: the rater's null class.
    g = lambda: torch.Generator().manual_seed(8)  # noqa: E731
    assert torch.equal(sel(x0, t, None, generator=g()), sel(x0, t, torch.full((6,), 10), generator=g()))
    assert torch.equal(sel(x0, 500, y, generator=g()), sel(x0, torch.full((6,), 500), y, generator=g()))


def test_noise_selector_plain_policies_and_soft(rater_file):
    x0 = torch.randn(5, 1, 8, 8)
    t = torch.randint(0, 1000, (5,))
    eps = NoiseSelector("max_norm", k=3)(x0, t, generator=torch.Generator().manual_seed(1))
    cand = torch.randn(5, 3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(eps, cand[torch.arange(5), _np_norms(cand.numpy()).argmax(1)])
    assert NoiseSelector("vanilla", 1)(x0, t).shape == x0.shape
    default = NoiseSelector()  # the evidence: no policy beats all its controls, so plain Gaussian noise
    assert default.name == "vanilla" and default.k == 1
    g = torch.Generator().manual_seed(3)
    assert torch.equal(default(x0, t, generator=g), torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)))
    picker = NoiseSelector("max_norm")  # a selection policy named without k draws the study's 4 candidates
    assert picker.k == 4
    cand = torch.randn(x0.shape[0], 4, *x0.shape[1:])
    eps, idx = picker.select(x0, t, None, cand)
    assert torch.equal(idx, cand.flatten(2).norm(dim=-1).argmax(1))
    soft = NoiseSelector.from_checkpoint(rater_file, k=3, policy="rater_soft", temperature=2.0)
    with pytest.raises(ValueError, match="weighted"):
        soft(x0, t)
    cand, w = soft.weighted(x0, t, generator=torch.Generator().manual_seed(2))
    assert cand.shape == (5, 3, 1, 8, 8)
    with torch.no_grad():
        s = torch.stack([soft.rater(cand[:, k], t, x0, torch.full((5,), 10)) for k in range(3)], 1)
    torch.testing.assert_close(w, torch.softmax(s / 2.0, 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="for 'knn' use NoiseSelector"):
        NoiseSelector.from_checkpoint(rater_file, policy="knn")


def test_noise_selector_refuses_a_rater_for_another_model(rater_file):
    for dit in (build_dit("DiT-N/2", input_size=16, in_channels=1, num_classes=10),
                build_dit("DiT-N/2", input_size=8, in_channels=3, num_classes=10),
                build_dit("DiT-N/2", input_size=8, in_channels=1, num_classes=4)):
        with pytest.raises(CheckpointError, match="was trained for"):
            NoiseSelector.from_checkpoint(rater_file, k=2, model=dit)
    ok = NoiseSelector.from_checkpoint(rater_file, k=2, model=build_dit("DiT-N/2", input_size=8, in_channels=1,
                                                                         num_classes=10))
    with pytest.raises(ValueError, match=r"expects images \[B,1,8,8\]"):
        ok(torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))


def test_the_plain_pytorch_loop_in_the_docs_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "selection.md").read_text()
    blocks = re.findall(r"<!-- test: plain-loop -->\s*```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/selection.md must keep one example marked <!-- test: plain-loop -->"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "docs/selection.md", "exec"), scope)
    assert np.isfinite(scope["loss"].item())
    assert scope["selector"].name == "rater" and scope["selector"].k == 4


# ---- training: continuation with each policy, same noise for input and target ---------------------------------

B = 6


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    cfg = TrainConfig(model="DiT-N/2", run_dir=str(root / "run"), steps=2, batch_size=8, sample_steps=2,
                      tensorboard=False, progress=False)
    train(cfg)
    # A 2-step DiT still predicts ~0 (adaLN-Zero), and a zero prediction makes the loss blind to which noise
    # is the target within a batch. Give the init checkpoint a non-trivial output head.
    from noiserater.checkpoint import load_checkpoint, save_checkpoint

    ckpt = root / "run" / "checkpoints" / "latest.pt"
    state = load_checkpoint(ckpt, kind="diffusion")
    g = torch.Generator().manual_seed(11)
    for key in ("model", "ema"):
        for name, v in state[key].items():
            if "adaLN_modulation" in name or "final_layer" in name:
                state[key][name] = torch.randn(v.shape, generator=g) * 0.1
    save_checkpoint(ckpt, {k: v for k, v in state.items() if k not in ("format", "format_version", "kind")},
                    kind="diffusion")
    torch.manual_seed(5)
    rater = build_rater("Rater-N/2", input_size=8, in_channels=1, num_classes=10)
    save_rater(root / "rater.pt", rater)
    return root / "run" / "checkpoints" / "latest.pt", root / "rater.pt"


def _schedule_abar() -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


def _recording_train(cfg: TrainConfig):
    """Run ``train`` and record every DiT forward made with autograd on in training mode (the step)."""
    from noiserater.models import DiT

    calls = []

    def hook(module, args, output):
        if isinstance(module, DiT) and module.training and torch.is_grad_enabled():
            calls.append(([a.detach().clone() for a in args], output.detach().clone()))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        summary = train(cfg)
    finally:
        handle.remove()
    return summary, calls


@pytest.mark.parametrize("policy,k", [("vanilla", 1), ("max_norm", 3), ("min_norm", 3), ("knn", 3),
                                      ("rater", 3), ("rater_soft", 3)])
def test_continuation_uses_the_chosen_noise_for_input_and_target(policy, k, pretrained, tmp_path):
    init, rater_path = pretrained
    uses_rater = policy in ("rater", "rater_soft")
    cfg = TrainConfig(model="DiT-N/2", run_dir=str(tmp_path / "run"), steps=1, batch_size=B, log_every=1,
                      sample_steps=2, tensorboard=False, progress=False, init_checkpoint=str(init),
                      policy=policy, candidates=k, rater=str(rater_path) if uses_rater else None, temperature=0.5)
    summary, calls = _recording_train(cfg)
    assert summary["step"] == 1 and summary["init_step"] == 2
    assert len(calls) == 1
    (x_t, t_in, y_in), out = calls[0]

    # The step's randomness is a function of (seed, step); recompute it and choose independently.
    data = load_dataset("digits", "train", seed=0, val_fraction=0.1)
    idx = batch_indices(len(data), B, 0, 0)
    x0 = data.images[idx].double()
    t, y, cand = draw_step_randomness(cfg, 0, data.labels[idx], 10, (1, 8, 8), get_objective("ddpm"))
    cand = cand.double()
    abar = torch.from_numpy(_schedule_abar()[t.numpy()])[:, None, None, None]
    if uses_rater:
        from noiserater.models.loading import load_rater

        rater = load_rater(rater_path).eval()
        with torch.no_grad():
            scores = torch.stack([rater(cand[:, j].float(), t, x0.float(), y) for j in range(k)], 1).double()
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    C = 1
    if policy == "rater_soft":  # all k candidates, in order, weighted by the group softmax
        assert x_t.shape[0] == B * k
        noise = cand.reshape(B * k, 1, 8, 8)
        want_xt = abar.repeat_interleave(k, 0).sqrt() * x0.repeat_interleave(k, 0) + (
            1 - abar.repeat_interleave(k, 0)).sqrt() * noise
        torch.testing.assert_close(x_t.double(), want_xt, rtol=1e-5, atol=1e-5)
        assert torch.equal(t_in, t.repeat_interleave(k)) and torch.equal(y_in, y.repeat_interleave(k))
        per = ((out[:, :C].double() - noise) ** 2).flatten(1).mean(1).reshape(B, k)
        w = torch.softmax(scores / 0.5, dim=1)
        assert logged == pytest.approx((w * per).sum(1).mean().item(), rel=1e-4)
    else:
        if policy in ("vanilla", "max_norm"):
            pick = _np_norms(cand.numpy()).argmax(1) if policy == "max_norm" else np.zeros(B, dtype=int)
        elif policy == "min_norm":
            pick = _np_norms(cand.numpy()).argmin(1)
        elif policy == "knn":
            pick = _np_norms(cand.numpy() - x0.numpy()[:, None]).argmin(1)
        else:
            pick = scores.numpy().argmax(1)
        chosen = cand[torch.arange(B), torch.from_numpy(np.asarray(pick))]
        assert x_t.shape[0] == B and torch.equal(t_in, t) and torch.equal(y_in, y)
        # x_t was built from the chosen noise ...
        torch.testing.assert_close(x_t.double(), abar.sqrt() * x0 + (1 - abar).sqrt() * chosen, rtol=1e-5, atol=1e-5)
        # ... and the same noise is the regression target of the logged loss.
        want = ((out[:, :C].double() - chosen) ** 2).flatten(1).mean(1).mean().item()
        assert logged == pytest.approx(want, rel=1e-5)
        if k > 1:  # and a different candidate would have given another loss
            other = cand[torch.arange(B), torch.from_numpy((np.asarray(pick) + 1) % k)]
            assert ((out[:, :C].double() - other) ** 2).mean().item() != pytest.approx(want, rel=1e-5)

    # Provenance: policy, k and the rater (with its sha256) are in the run folder.
    conf = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (conf["policy"], conf["candidates"], conf["init_checkpoint"]) == (policy, k, str(init))
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())["selection"]
    assert (info["policy"], info["candidates"]) == (policy, k)
    if uses_rater:
        assert info["rater"]["sha256"] == hashlib.sha256(Path(rater_path).read_bytes()).hexdigest()
        assert info["rater"]["spec"]["name"] == "Rater-N/2"
    else:
        assert info["rater"] is None


def test_resume_refuses_a_changed_rater_file(pretrained, tmp_path):
    init, _ = pretrained
    rater_path = tmp_path / "r.pt"
    save_rater(rater_path, build_rater("FastRater-N/2", input_size=8, in_channels=1, num_classes=10))
    common = dict(model="DiT-N/2", run_dir=str(tmp_path / "run"), batch_size=4, sample_steps=2, tensorboard=False,
                  progress=False, init_checkpoint=str(init), policy="rater", candidates=2, rater=str(rater_path))
    train(TrainConfig(steps=1, **common))
    train(TrainConfig(steps=2, **common), resume=True)  # same file: fine
    save_rater(rater_path, build_rater("FastRater-N/2", input_size=8, in_channels=1, num_classes=10))
    with pytest.raises(RunDirError, match="rater file .* has changed"):
        train(TrainConfig(steps=3, **common), resume=True)


@pytest.mark.parametrize("size,channels,classes,field", [(16, 1, 10, "input_size"), (8, 3, 10, "in_channels"),
                                                         (8, 1, 7, "num_classes")])
def test_cli_refuses_a_mismatched_rater(tmp_path, size, channels, classes, field):
    bad = tmp_path / "bad.pt"
    save_rater(bad, build_rater("Rater-N/2", input_size=size, in_channels=channels, num_classes=classes))
    res = CliRunner().invoke(main, ["train", "--model", "DiT-N/2", "--steps", "1", "--run-dir", str(tmp_path / "r"),
                                    "--policy", "rater", "--candidates", "2", "--rater", str(bad), "--no-progress",
                                    "--no-tensorboard"])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: rater ") and f"{field}=" in lines[0], res.output
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_cli_continuation_with_the_rater_policy(pretrained, tmp_path):
    init, rater_path = pretrained
    res = CliRunner().invoke(main, ["train", "--model", "DiT-N/2", "--steps", "2", "--batch-size", "4",
                                    "--run-dir", str(tmp_path / "run"), "--init-checkpoint", str(init),
                                    "--policy", "rater", "--candidates", "4", "--rater", str(rater_path),
                                    "--sample-steps", "2", "--no-progress", "--no-tensorboard"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["step"] == 2
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())["selection"]
    assert info["policy"] == "rater" and info["candidates"] == 4
    assert info["rater"]["path"] == str(Path(rater_path).resolve())
    res = CliRunner().invoke(main, ["train", "--model", "DiT-N/2", "--steps", "1", "--run-dir", str(tmp_path / "x"),
                                    "--policy", "nearest", "--candidates", "2", "--rater", str(rater_path)])
    assert res.exit_code == 2 and "does not use a rater" in res.output


def test_policies_listed_in_cli_help():
    res = CliRunner().invoke(main, ["train", "--help"])
    for p in policy_names():
        assert p in res.output


def test_from_checkpoint_reads_the_rater_objective_and_scores_flow_time(tmp_path):
    """A rater meta-trained on a flow checkpoint scores t in [0, 1] as the DiT sees it (1000 t)."""
    torch.manual_seed(0)
    rater = build_rater("Rater-N/2", input_size=8, in_channels=1, num_classes=10)
    path = tmp_path / "flow_rater.pt"
    save_rater(path, rater, {"diffusion": {"objective": "flow"}})
    sel = NoiseSelector.from_checkpoint(path, k=4)
    assert sel.policy.objective.name == "flow"
    g = torch.Generator().manual_seed(1)
    x0, y = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
    cand = torch.randn(6, 4, 1, 8, 8, generator=g)
    _, index = sel.select(x0, 0.3, y, cand)
    with torch.no_grad():
        want = rater.eval().score_candidates(cand, torch.full((6,), 300.0), x0, y).argmax(1)
    assert torch.equal(index, want)
    ddpm_path = tmp_path / "ddpm_rater.pt"
    save_rater(ddpm_path, rater)  # no record: a rater from before objectives existed is ddpm
    assert NoiseSelector.from_checkpoint(ddpm_path, k=4).policy.objective.name == "ddpm"
