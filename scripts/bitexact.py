"""Fingerprint short runs of every training path, to show a refactor changed no behaviour.

    OMP_NUM_THREADS=1 python scripts/bitexact.py OUT.json      # at the commit before, then after
    python scripts/bitexact.py --compare BEFORE.json AFTER.json

Runs (DDPM, digits, tiny models, CPU, one thread): a pretrain, a bilevel meta-training with a held-out
check, a distillation, and continuations with vanilla, max_norm, the trained rater (argmax, sampled, soft)
and a noise scale. Records the sha256 of every saved weight tensor and every metrics record without its
wall-clock fields. Two fingerprints are equal only if every weight and logged number is bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TIME_KEYS = {"time", "time_s", "images_per_s", "step_time_s", "wall_s", "seconds", "elapsed_s", "train_seconds"}


def _weights_hash(path: Path) -> str:
    state = torch.load(path, map_location="cpu", weights_only=False)
    h = hashlib.sha256()

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            h.update(prefix.encode())
            h.update(obj.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                if k in ("model", "ema", "rater", "state_dict", "weights", "params") or isinstance(obj[k], (dict, torch.Tensor)):
                    walk(f"{prefix}/{k}", obj[k])
    walk("", {k: v for k, v in state.items() if k in ("model", "ema", "rater", "state_dict", "weights")})
    return h.hexdigest()


def _metrics(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.append(_strip(rec))
    return out


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIME_KEYS}
    return obj


def fingerprint(root: Path) -> dict:
    from noiserater.metatrain import MetaTrainConfig, metatrain
    from noiserater.train import TrainConfig, train

    torch.set_num_threads(1)
    common = dict(data="digits", batch_size=16, log_every=1, progress=False, tensorboard=False, test_fraction=0.2,
                  sample_every=10_000)
    out: dict = {}
    pre = root / "pretrain"
    train(TrainConfig(model="DiT-N/2", run_dir=str(pre), steps=30, lr=1e-3, seed=3, ckpt_every=30, **common))
    ck = pre / "checkpoints" / "latest.pt"
    out["pretrain"] = {"weights": _weights_hash(ck), "metrics": _metrics(pre / "metrics.jsonl")}
    raters = {}
    for kind, extra in (("bilevel", dict(inner_steps=2, candidates=4, inner_lr=1e-3, eval_every=2, eval_batches=2)),
                        ("distill", dict(candidates=4, distill_val_batch_size=32, eval_every=2, eval_batches=2))):
        run = root / f"meta-{kind}"
        summary = metatrain(MetaTrainConfig(checkpoint=str(ck), run_dir=str(run), rater="Rater-N/2", objective=kind,
                                            outer_steps=4, batch_size=4, val_batch_size=16, seed=1, progress=False,
                                            ckpt_every=4, **extra))
        raters[kind] = run / "rater.pt"
        out[f"meta-{kind}"] = {"weights": _weights_hash(run / "rater.pt"), "metrics": _metrics(run / "metrics.jsonl"),
                               "summary": _strip(json.loads(json.dumps({k: v for k, v in summary.items()
                                                                        if k not in ("run_dir", "rater", "checkpoint",
                                                                                     "best_rater", "heldout_curve")},
                                                                       default=str)))}
    arms = {"vanilla": dict(policy="vanilla", candidates=1), "max_norm": dict(policy="max_norm", candidates=4),
            "rater": dict(policy="rater", candidates=4, rater=str(raters["bilevel"])),
            "rater_sample": dict(policy="rater_sample", candidates=4, rater=str(raters["bilevel"]), temperature=0.7),
            "rater_soft": dict(policy="rater_soft", candidates=4, rater=str(raters["distill"])),
            "noise_scale": dict(policy="vanilla", candidates=1, noise_scale=1.1),
            "input_perturbation": dict(policy="vanilla", candidates=1, input_perturbation=0.1)}
    for arm, extra in arms.items():
        run = root / f"cont-{arm}"
        train(TrainConfig(model="DiT-N/2", run_dir=str(run), steps=6, lr=1e-4, seed=5, init_checkpoint=str(ck),
                          ckpt_every=6, ema_decay=0.99, **common, **extra))
        out[f"cont-{arm}"] = {"weights": _weights_hash(run / "checkpoints" / "latest.pt"),
                              "metrics": _metrics(run / "metrics.jsonl")}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"commit": commit, "dirty": bool(subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True,
                                                          text=True).stdout.strip()), "runs": out}


def compare(a: dict, b: dict) -> list[str]:
    diffs = []
    for name in sorted(set(a["runs"]) | set(b["runs"])):
        ra, rb = a["runs"].get(name), b["runs"].get(name)
        if ra is None or rb is None:
            diffs.append(f"{name}: only in one fingerprint")
            continue
        for key in sorted(set(ra) | set(rb)):
            if ra.get(key) != rb.get(key):
                diffs.append(f"{name}: {key} differs")
    return diffs


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        a, b = (json.loads(Path(p).read_text()) for p in sys.argv[2:4])
        d = compare(a, b)
        print("\n".join(d) if d else f"bit-identical: {len(a['runs'])} runs ({a['commit'][:7]} vs {b['commit'][:7]})")
        sys.exit(1 if d else 0)
    with tempfile.TemporaryDirectory() as tmp:
        fp = fingerprint(Path(tmp))
    Path(sys.argv[1]).write_text(json.dumps(fp, indent=1, sort_keys=True))
    print(f"wrote {sys.argv[1]}: {len(fp['runs'])} runs at {fp['commit'][:7]}")
