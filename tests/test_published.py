"""Every published evidence report regenerates, table for table, from its committed per-run records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from noiserater.study.evidence import publish_study
from noiserater.study.evidence_report import write_evidence_report

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted(p.parent for p in (ROOT / "docs" / "results").glob("**/study.json"))


def test_there_are_published_studies():
    assert len(STUDIES) >= 2


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: str(p.relative_to(ROOT / "docs" / "results")))
def test_published_report_regenerates_from_its_records(study, tmp_path):
    copy = tmp_path / "study"
    # only what a published study keeps: the report must not need anything else
    written = publish_study(study, copy)
    assert written
    (copy / "report.md").unlink()
    (copy / "summary.json").unlink()
    write_evidence_report(copy)
    assert (copy / "report.md").read_text() == (study / "report.md").read_text()
    assert json.loads((copy / "summary.json").read_text()) == json.loads((study / "summary.json").read_text())


def test_a_changed_record_changes_the_report(tmp_path):
    study = next(s for s in STUDIES if list(s.glob("stage-*/runs/vanilla/seed0/stage.json")))
    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    marker = next(copy.glob("stage-*/runs/vanilla/seed0/stage.json"))
    rec = json.loads(marker.read_text())
    rec["result"]["fid"] *= 1.5
    marker.write_text(json.dumps(rec))
    write_evidence_report(copy)
    assert (copy / "report.md").read_text() != (study / "report.md").read_text()


LADDER = ROOT / "docs" / "results" / "evidence-ladder"


@pytest.mark.skipif(not (LADDER / "ladder.json").exists(), reason="no published dimension ladder")
def test_published_ladder_regenerates_from_its_rungs(tmp_path):
    """The ladder's report and fits come again from the published studies its ladder.json lists."""
    from noiserater.study.ladder import studies_of, write_ladder

    studies = studies_of(LADDER)
    assert len(studies) >= 3 and all((s / "study.json").exists() for s in studies)
    out = tmp_path / "evidence-ladder"
    write_ladder(studies, out)
    assert (out / "report.md").read_text() == (LADDER / "report.md").read_text()
    fresh, published = json.loads((out / "ladder.json").read_text()), json.loads((LADDER / "ladder.json").read_text())
    assert fresh["fits"] == published["fits"] and fresh["rungs"] == published["rungs"]
