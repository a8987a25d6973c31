#!/usr/bin/env python
"""Run the reliability and fuzz tests (slow variants included) and write what they measured to
docs/reliability.json: kills survived (SIGKILL at random moments, then --resume, bit-exact), kills that
landed inside a checkpoint write, checkpoint reads during writes, fuzz cases run per property.

    python scripts/reliability_report.py                 # slow variants, 300 examples per fuzz property
    python scripts/reliability_report.py --fast          # the default test selection, 40 examples
    python scripts/reliability_report.py --examples 1000

The JSON is only written when every selected test passed (the counts are of cases that passed). The test
suite itself never writes it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_reliability.py", "tests/test_fuzz.py"]


def summarize(raw: dict) -> dict:
    kills = {k: v for k, v in raw.items() if k.endswith(("sigkill", "sigkill_slow"))}
    fuzz = {k: v for k, v in raw.items() if k.startswith("fuzz_")}
    flips = {k: v for k, v in raw.items() if k.startswith("flips_")}

    def total(entries, key):
        return sum(int(e.get(key, 0)) for es in entries.values() for e in es)

    return {
        "kills_survived": total(kills, "kills"),
        "kills_during_checkpoint_write": total(kills, "kills_during_checkpoint_write"),
        "kills_during_startup": total(kills, "kills_during_startup"),
        "checkpoint_reads_while_running": total(kills, "watcher_loads"),
        "kills_by_test": {k: [{x: e[x] for x in ("kills", "kills_during_checkpoint_write", "kills_during_startup",
                                                  "steps", "ckpt_every", "seed")} for e in v] for k, v in kills.items()},
        "fuzz_cases_run": total(fuzz, "examples"),
        "fuzz_cases_by_property": {k: sum(int(e["examples"]) for e in v) for k, v in fuzz.items()},
        "cli_option_values_checked": total({k: v for k, v in raw.items() if k == "cli_option_range_checks"},
                                           "values_checked"),
        # single-bit flips of checkpoints, rater files and latent caches: each must load identical or be refused
        "bit_flips_run": total(flips, "examples"),
        "bit_flips_by_outcome": {o: sum(int(n) for es in flips.values() for e in es for k, n in e.items()
                                        if k.endswith("_" + o)) for o in ("identical", "refused", "changed")},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="default test selection only (no slow variants)")
    ap.add_argument("--examples", type=int, default=None, help="hypothesis examples per fuzz property")
    ap.add_argument("--out", default=str(REPO / "docs" / "reliability.json"))
    ap.add_argument("--timeout", type=int, default=3600)
    args = ap.parse_args()
    examples = args.examples or (40 if args.fast else 300)
    with tempfile.TemporaryDirectory() as d:
        raw_path = Path(d) / "raw.json"
        env = dict(os.environ, NOISERATER_RELIABILITY_JSON=str(raw_path), NOISERATER_FUZZ_EXAMPLES=str(examples))
        # addopts cleared (it holds -q and -m 'not slow'): one -q keeps pytest's summary line
        cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", *TESTS,
               "-m", "not slow" if args.fast else ""]
        print("running:", " ".join(cmd), f"(NOISERATER_FUZZ_EXAMPLES={examples})", flush=True)
        start = datetime.datetime.now()
        proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=args.timeout, capture_output=True, text=True)
        seconds = (datetime.datetime.now() - start).total_seconds()
        outcome = [s for s in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed)", s)]
        tail = outcome[-1].strip(" =") if outcome else ""
        print(proc.stdout[-3000:])
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            print(f"tests failed ({tail}); {args.out} not updated", file=sys.stderr)
            return 1
        raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    report = {
        "generated": start.isoformat(timespec="seconds"),
        "git_commit": commit,
        "selection": "default" if args.fast else "default + slow",
        "fuzz_examples_per_property": examples,
        "pytest": tail,
        "wall_seconds": round(seconds, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        **summarize(raw),
        "raw": raw,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}: {report['kills_survived']} kills survived "
          f"({report['kills_during_checkpoint_write']} inside a checkpoint write), "
          f"{report['fuzz_cases_run']} fuzz cases, {report['bit_flips_run']} bit flips {report['bit_flips_by_outcome']}, "
          f"{report['cli_option_values_checked']} option values checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
