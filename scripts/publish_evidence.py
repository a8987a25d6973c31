"""Copy the small artefacts of an evidence study into docs/results/<name>/ (run folders do not survive a
session): report.md, summary.json, results.jsonl, study.json, the forest plots, every run's stage.json, and
per rater its file, metrics.jsonl, held-out curve and analysis.

    python scripts/publish_evidence.py STUDY_DIR docs/results/evidence-digits
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from noiserater.evidence_report import write_evidence_report


def publish(study: Path, dest: Path) -> None:
    write_evidence_report(study)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "summary.json", "results.jsonl", "study.json"):
        shutil.copy2(study / name, dest / name)
    for png in study.glob("forest-*.png"):
        shutil.copy2(png, dest / png.name)
    for marker in study.glob("stage-*/runs/*/seed*/stage.json"):
        rel = marker.relative_to(study).parent
        (dest / rel).mkdir(parents=True, exist_ok=True)
        shutil.copy2(marker, dest / rel / "stage.json")
    for rater in study.glob("stage-*/rater-*"):
        out = dest / rater.relative_to(study)
        out.mkdir(parents=True, exist_ok=True)
        for src in (rater / "rater.pt", rater / "stage.json", rater / "run" / "metrics.jsonl",
                    rater / "run" / "heldout_curve.png", rater / "run" / "config.yaml", rater / "analysis" / "analysis.json"):
            if src.exists():
                shutil.copy2(src, out / src.name)
    shutil.copy2(study / "pretrain" / "stage.json", dest / "pretrain-stage.json")


if __name__ == "__main__":
    publish(Path(sys.argv[1]), Path(sys.argv[2]))
