"""Sample quality of a diffusion checkpoint: FID, precision/recall and class accuracy, one record per extractor.

This module owns the checkpoint evaluation pipeline: :class:`EvalConfig`, :func:`evaluate_checkpoint` and
:func:`summary_table`. :func:`evaluate_checkpoint` samples from a diffusion checkpoint (the project's one
sampler, :func:`noiserater.sampling.sample_from_checkpoint`; latent checkpoints are decoded with their
VAE), then gives one record per extractor with FID, precision, recall and class accuracy, and everything
that makes the number comparable (number of samples, sampler, steps, CFG scale, EMA, seed, extractor,
reference). Records are appended to ``RUN_DIR/eval.jsonl``.

The pieces it is built from live in :mod:`noiserater.eval`:

- :mod:`noiserater.eval.frechet`: :func:`feature_stats`, :func:`frechet_distance`,
  :func:`fid_from_features`, :func:`knn_radii`, :func:`precision_recall`;
- :mod:`noiserater.eval.inception`: :class:`InceptionV3` and :func:`load_inception` (local weights only);
- :mod:`noiserater.eval.classifier`: :class:`DatasetClassifier`, :func:`train_classifier`,
  :func:`get_classifier` ("classifier FID");
- :mod:`noiserater.eval.extractors`: :class:`Extractor`, :func:`build_extractor`, :func:`quantize`;
- :mod:`noiserater.eval.reference`: :func:`reference_features`, :func:`folder_reference_features`,
  :func:`default_reference`, :func:`latent_reference`, :class:`RunningStats`;
- :mod:`noiserater.eval.cache`: :func:`cache_dir`.

Images are quantised to 8 bits (as if saved to PNG) before any extractor sees them, real and generated
alike. The cache folder is ``$NOISERATER_CACHE`` or ``~/.cache/noiserater`` unless given.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError, require
from .eval.classifier import (
    get_classifier,
)
from .eval.extractors import EXTRACTORS, build_extractor, quantize
from .eval.frechet import feature_stats, frechet_distance, precision_recall
from .eval.reference import (
    default_reference,
    folder_reference_features,
    latent_reference,
    reference_features,
)
from .objectives import objective_from_config
from .run.distributed import resolve_device
from .sampling import sample_from_checkpoint

# Samples generated (and, for latent checkpoints, decoded) and held at once: 50,000 decoded 256x256 images
# would be 39 GB of float32. Chunks are shards of the same N samples, so the chunking changes no sample.
SAMPLE_CHUNK = 5000


@dataclass
class EvalConfig:
    checkpoint: str | None = None
    num_samples: int = 2000
    steps: int = 50
    sampler: str | None = None  # None: the checkpoint objective's default (ddim for DDPM, euler for flow)
    cfg_scale: float = 1.0
    ema: bool = True
    seed: int = 0
    labels: str = "cycle"
    extractors: str = "classifier"
    inception_weights: str | None = None
    reference: str | None = None
    reference_split: str | None = None
    reference_max_images: int = 50_000
    reference_workers: int = 0
    vae: str | None = None
    pr_k: int = 3
    cache_dir: str | None = None
    run_dir: str | None = None
    record: bool = True
    batch_size: int = 250
    progress: bool = True
    device: str = "auto"  # auto (CUDA when available), cpu, cuda, cuda:N

    def validate(self) -> None:
        require(bool(self.checkpoint), "checkpoint", "pass --checkpoint RUN_DIR/checkpoints/latest.pt")
        require(self.num_samples >= 2, "num_samples", "FID needs at least 2 samples")
        require(self.steps >= 1, "steps", "sampling needs at least 1 step")
        require(self.cfg_scale >= 0, "cfg_scale", "must be >= 0 (1 = no guidance)")
        require(self.pr_k >= 1, "pr_k", "k must be >= 1")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)")
        require(self.reference_max_images >= 2, "reference_max_images", "FID needs at least 2 reference images")
        require(self.reference_workers >= 0, "reference_workers", "must be >= 0 (0 = decode in this process)")
        names = self.extractor_list()
        require(bool(names) and all(n in EXTRACTORS for n in names), "extractors",
                f"comma-separated names from {', '.join(EXTRACTORS)}, got {self.extractors!r}")
        require(self.reference_split in (None, "all", "train", "val", "test"), "reference_split",
                "use all, or train / val / test (the checkpoint's own split of its data)")

    def extractor_list(self) -> list[str]:
        return [s.strip() for s in self.extractors.split(",") if s.strip()]

    def record_dir(self) -> Path:
        """The folder whose ``eval.jsonl`` receives the records: ``run_dir``, else the checkpoint's run folder
        (the parent of its ``checkpoints/`` folder, else the folder it is in)."""
        return Path(self.run_dir) if self.run_dir else _run_dir_of(self.checkpoint)


def _run_dir_of(checkpoint: str) -> Path:
    p = Path(checkpoint).resolve()
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def evaluate_checkpoint(cfg: EvalConfig, device: str | torch.device | None = None) -> list[dict]:
    """Sample from ``cfg.checkpoint`` and measure FID / precision / recall (one record per extractor) and
    class accuracy of the class-conditional samples; append the records to ``RUN_DIR/eval.jsonl``.

    A checkpoint trained on a latent cache is sampled, decoded with the cache's VAE (``cfg.vae``: another
    copy of it) and compared, in pixels, with the image folder the cache was made from (see
    :func:`latent_reference`, :func:`folder_reference_features`); only the ``inception`` extractor applies
    and class accuracy is None (there is no dataset classifier)."""
    cfg.validate()
    if device is None:
        device = resolve_device(cfg.device)
    device = torch.device(device)
    state = load_checkpoint(cfg.checkpoint, kind="diffusion")
    config = state.get("config", {})
    objective = objective_from_config(config)
    sampler = cfg.sampler or objective.default_sampler
    objective.check_sampler(sampler)  # before any classifier or reference work
    objective.check_steps(cfg.steps)
    data_source = config.get("data")
    if not data_source:
        raise CheckpointError(f"{cfg.checkpoint} does not record its training data; pass --reference SOURCE")
    spec = state["spec"]
    latent = (state.get("data") or {}).get("latent")
    names = cfg.extractor_list()
    if spec.get("in_channels") in (1, 3):
        ref_source, ref_split = default_reference(data_source)
        ref = {"source": cfg.reference or ref_source, "split": cfg.reference_split or ref_split, "folder": False,
               "resolution": None}
        if ref["split"] in ("train", "val", "test"):  # the checkpoint's own split of its data
            if ref["source"] != data_source:
                raise ConfigError(f"--reference-split {ref['split']} is a split of the checkpoint's own data "
                                  f"({data_source}), not of --reference {ref['source']}; drop one of them")
            seed = config.get("split_seed")
            ref["split_args"] = {"seed": int(config.get("seed", 0) if seed is None else seed),
                                 "val_fraction": float(config.get("val_fraction", 0.1)),
                                 "test_fraction": float(config.get("test_fraction", 0.0))}
            if ref["split"] == "test" and ref["split_args"]["test_fraction"] <= 0:
                raise ConfigError(f"{cfg.checkpoint} was trained without a test split (test_fraction 0): "
                                  "--reference-split test has no images; train with --test-fraction > 0")
    elif not latent:
        raise ConfigError(f"{cfg.checkpoint} generates {spec.get('in_channels')}-channel data and records no latent "
                         "cache (no VAE to decode with); FID needs pixel images")
    else:
        if "classifier" in names:
            raise ConfigError(f"{cfg.checkpoint} was trained on a latent cache ({latent.get('cache')}): the 'classifier' "
                             "extractor (a small per-dataset classifier) does not apply to its decoded images; use "
                             "--extractors inception with --inception-weights PATH")
        ref = latent_reference(cfg.checkpoint, latent, cfg.reference, cfg.reference_split)
    unconditional = bool(config.get("unconditional", False))
    conditional = not unconditional and cfg.labels != "null"
    extractors = {name: build_extractor(name, ref["source"], cfg.cache_dir, cfg.inception_weights, cfg.progress)
                  for name in names}
    class_acc, clf, clf_info = None, None, None
    if conditional and not latent:
        clf = extractors["classifier"].network if "classifier" in extractors else \
            get_classifier(ref["source"], cfg.cache_dir, progress=cfg.progress)[0]
        clf_info = extractors["classifier"].info if "classifier" in extractors else None
        clf = clf.to(device).eval()
    chunks = max(1, math.ceil(cfg.num_samples / SAMPLE_CHUNK))
    feats: dict[str, list[np.ndarray]] = {name: [] for name in extractors}
    all_labels, preds, sample_s, image_size = [], [], 0.0, None
    for c in range(chunks):
        t0 = time.perf_counter()
        samples, labels = sample_from_checkpoint(cfg.checkpoint, cfg.num_samples, cfg.labels, cfg.cfg_scale,
                                                 cfg.steps, cfg.seed, cfg.ema, cfg.batch_size, device=device,
                                                 progress=cfg.progress, vae=cfg.vae, decode=True,
                                                 shard=(c, chunks) if chunks > 1 else None, sampler=sampler)
        sample_s += time.perf_counter() - t0
        image_size = samples.shape[-1]
        all_labels.append(labels)
        if clf is not None:
            with torch.no_grad():
                preds += [clf(quantize(samples[i:i + cfg.batch_size]).to(device)).argmax(1).cpu()
                          for i in range(0, samples.shape[0], cfg.batch_size)]
        for name, ex in extractors.items():
            feats[name].append(ex(samples, cfg.batch_size, device, cfg.progress, desc="samples"))
        del samples
    labels = torch.cat(all_labels)
    if clf is not None:
        class_acc = float((torch.cat(preds) == labels).double().mean())
    if ref["folder"] and ref["resolution"] is None:
        ref["resolution"] = int(image_size)  # a cache that does not record it: the decoded samples' size
    reference = {"source": ref["source"], "split": ref["split"], **({"split_args": ref["split_args"]}
                                                                    if ref.get("split_args") else {})}
    if ref["folder"]:
        reference.update(resolution=ref["resolution"], max_images=cfg.reference_max_images)
    records = []
    common = {
        "checkpoint": str(cfg.checkpoint), "checkpoint_step": int(state.get("step", -1)), "model": spec.get("name"),
        "data": data_source, "reference": reference,
        "num_samples": cfg.num_samples, "objective": objective.name, "sampler": sampler,
        **({"eta": 0.0} if sampler == "ddim" else {}), "steps": cfg.steps,
        "cfg_scale": 1.0 if unconditional else cfg.cfg_scale, "ema": cfg.ema, "seed": cfg.seed,
        "labels": "null" if unconditional else cfg.labels, "class_accuracy": class_acc, "pr_k": cfg.pr_k,
    }
    if latent:
        common["latent"] = {"cache": latent.get("cache"), "decoded": True, "image_size": int(image_size),
                            "vae": str(cfg.vae) if cfg.vae else (latent.get("vae") or {}).get("path"),
                            "vae_sha256": (latent.get("vae") or {}).get("sha256")}
    for name, ex in extractors.items():
        if ref["folder"]:
            rf = folder_reference_features(ref["source"], ref["resolution"], ex, cfg.cache_dir, cfg.batch_size, device,
                                           cfg.progress, max_images=cfg.reference_max_images,
                                           workers=cfg.reference_workers)
        else:
            rf = reference_features(ref["source"], ref["split"], ex, cfg.cache_dir, cfg.batch_size, device,
                                    cfg.progress, split_args=ref.get("split_args"))
        fx = np.concatenate(feats[name])
        fid = frechet_distance(*feature_stats(fx), rf["mu"], rf["sigma"])
        pr = precision_recall(rf["pr_features"], fx, cfg.pr_k)
        rec_ref = {**reference, "num_images": rf["n"], "pr_images": int(rf["pr_features"].shape[0]),
                   "stats_cache": rf["path"]}
        if "available" in rf:
            rec_ref["available_images"] = rf["available"]
        rec = {**common, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "extractor": name, "extractor_key": ex.key,
               "extractor_info": ex.info, "fid": fid, **pr, "reference": rec_ref, "sample_seconds": round(sample_s, 2)}
        if name != "classifier" and clf_info is not None:
            rec["class_accuracy_classifier"] = {"test_accuracy": clf_info["test_accuracy"]}
        records.append(rec)
    if cfg.record:
        run_dir = cfg.record_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "eval.jsonl", "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return records


def summary_table(records: list[dict]) -> str:
    """A plain-text table of evaluation records."""
    head = ["extractor", "FID", "precision", "recall", "class acc", "N", "steps", "cfg", "EMA", "ref"]
    rows = [[r["extractor"], f"{r['fid']:.3f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}",
             "-" if r.get("class_accuracy") is None else f"{r['class_accuracy']:.3f}", str(r["num_samples"]),
             str(r["steps"]), f"{r['cfg_scale']:g}", "yes" if r["ema"] else "no",
             f"{r['reference']['source']}:{r['reference']['split']} ({r['reference']['num_images']})"] for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])
