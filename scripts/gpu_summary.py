"""Gather the JSON that scripts/gpu_check.sh wrote into RESULTS/summary.json, next to the paper's figures.

    python scripts/gpu_summary.py benchmarks/gpu

Paper references (NoiseRater, appendix B.3, 4 x H100): DiT-S/2 pretraining, 400k steps at global batch 256
in 22 h = 323 images/s/GPU; 80k-step continuations take 4.3 / 5.6 / 7.0 / 9.0 h at k = 1 / 2 / 4 / 8, i.e.
selection overhead 1.30x / 1.63x / 2.09x at k = 2 / 4 / 8.
"""

from __future__ import annotations

import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

PAPER_IMAGES_PER_S_PER_GPU = round(400_000 * 256 / (22 * 3600) / 4, 1)
PAPER_OVERHEAD = {2: round(5.6 / 4.3, 2), 4: round(7.0 / 4.3, 2), 8: round(9.0 / 4.3, 2)}


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def summarize(results: Path) -> dict:
    out: dict = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": str(results),
                 "paper": {"dit_s2_images_per_s_per_gpu_h100": PAPER_IMAGES_PER_S_PER_GPU,
                           "selection_overhead": {f"k{k}": v for k, v in PAPER_OVERHEAD.items()}}}
    smi = results / "nvidia_smi.txt"
    if smi.exists():
        out["nvidia_smi"] = smi.read_text().strip().splitlines()
    junit = results / "pytest_gpu.xml"
    if junit.exists():
        try:
            root = ET.parse(junit).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            out["tests_gpu"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        except (ET.ParseError, AttributeError):
            out["tests_gpu"] = "unreadable junit xml"
    train = {}
    for name in ("bf16", "fp32", "bf16_compile"):
        recs = _load(results / f"train_dit_s2_{name}.json")
        if not recs:
            continue
        r = recs[0]
        train[name] = {
            "images_per_s_per_gpu": round(r["train_images_per_s"], 1), "step_s": r["train_step_s"],
            "batch_per_gpu": r["batch_size"], "gpu": r["machine"].get("gpu"), "torch": r["machine"].get("torch"),
            "tf32": r.get("tf32"), "peak_memory_mb": r.get("peak_memory_mb"),
            "vs_paper": round(r["train_images_per_s"] / PAPER_IMAGES_PER_S_PER_GPU, 2),
            "loader_memmap_images_per_s": round(r["loader_memmap_images_per_s"]),
            "loader_share_of_step": r["loader_share_of_step"],
        }
    if train:
        out["train_dit_s2"] = train
        if "bf16" in train and "fp32" in train:
            out["train_dit_s2"]["bf16_speedup_over_fp32"] = round(
                train["bf16"]["images_per_s_per_gpu"] / train["fp32"]["images_per_s_per_gpu"], 2)
    sel = _load(results / "selection.json")
    if sel:
        table = {}
        for r in sel:
            if r.get("policy") not in ("vanilla", "rater"):
                continue
            key = "vanilla" if r["policy"] == "vanilla" else f"{r['rater']}|k{r['k']}"
            table[key] = {"ratio_vs_vanilla": round(r["ratio_vs_vanilla"], 3), "step_time_s": r["step_time_s"],
                          "peak_mem_bytes": r.get("peak_mem_bytes"),
                          "paper": PAPER_OVERHEAD.get(r["k"]) if r["policy"] == "rater" else None}
        out["selection"] = table
    meta = _load(results / "metagrad.json")
    if meta is not None:
        out["metagrad"] = meta
    return out


def main(argv: list[str]) -> int:
    results = Path(argv[1] if len(argv) > 1 else "benchmarks/gpu")
    summary = summarize(results)
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k in ("train_dit_s2", "selection", "tests_gpu")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
