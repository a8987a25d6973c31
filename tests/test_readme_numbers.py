"""Every interval the README's evidence section quotes is a figure of a published report (and those regenerate
from their committed records: tests/test_published.py), so the headline cannot drift from the results."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INTERVAL = re.compile(r"[+\-−]\d+\.\d+% ± \d+\.\d+")


def _evidence_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Does the rater help?")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _reports() -> str:
    # the current studies (evidence, flow, from-scratch) and the archived ones the README compares with
    return "\n".join(p.read_text() for p in (ROOT / "docs" / "results").rglob("report.md")
                     if any(word in str(p) for word in ("evidence", "scratch", "flow")))


def test_readme_quotes_intervals():
    assert len(INTERVAL.findall(_evidence_section())) >= 10


def test_every_readme_interval_is_in_a_published_report():
    reports = _reports()
    missing = [c for c in INTERVAL.findall(_evidence_section()) if c.replace("−", "-") not in reports]
    assert not missing, f"README intervals not found in any published evidence report: {missing}"
