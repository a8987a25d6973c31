#!/usr/bin/env bash
# The dimension ladder's check at d = 4096 on a lent GPU (target: under 10 minutes on one H100/H200).
#
#   scripts/gpu_ladder_check.sh               # results in benchmarks/gpu/ladder-4096/
#
# Runs the evidence preset `digits-4096` (digits upsampled to 1x64x64 = 4096, the dimension of DiT-S/2's
# 4x32x32 latents; vanilla, max_norm and its k=1 noise-scale control, 6 paired seeds), publishes its small
# artefacts, and sets its measured changes beside what docs/results/evidence-ladder predicted for d = 4096
# from the CPU rungs (summary.md). Everything needed is in the checkout: digits ship with scikit-learn.
# GPU_LADDER_BUDGET (seconds, default 560) caps the study; an interrupted study resumes on the next call.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS="${GPU_LADDER_RESULTS:-benchmarks/gpu/ladder-4096}"
STUDY="${GPU_LADDER_STUDY:-runs/evidence-digits-4096}"
PY="${PYTHON:-python3}"
mkdir -p "$RESULTS"
if ! $PY -c "import noiserater" 2>/dev/null; then
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # not installed: run from the checkout
fi
# GPU_LADDER_SET: preset overrides separated by ';' (a plumbing check on a CPU: see docs/scale.md)
SETS=()
IFS=';' read -ra PARTS <<< "${GPU_LADDER_SET:-}"
for part in ${PARTS[@]+"${PARTS[@]}"}; do SETS+=(--set "$part"); done
set +e
timeout --kill-after=10 "${GPU_LADDER_BUDGET:-560}" $PY -m noiserater evidence --preset digits-4096 --out "$STUDY" \
  --publish "$RESULTS/study" ${SETS[@]+"${SETS[@]}"} 2>&1 | tee "$RESULTS/study.log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" -ne 0 ] && { $PY -m noiserater evidence --out "$STUDY" --report-only --publish "$RESULTS/study" || true; }
$PY - "$RESULTS" "$STUDY" <<'PY'
import json, sys
from pathlib import Path
from noiserater.study.ladder import rung
results, study = Path(sys.argv[1]), Path(sys.argv[2])
measured = rung(study)
published = Path("docs/results/evidence-ladder/ladder.json")
fits = json.loads(published.read_text())["fits"] if published.exists() else {}  # no ladder yet: measured only
lines = [f"# d = {measured['d']}: the ladder's prediction vs this run ({measured['data']}, {measured['model']})", "",
         "| arm | metric | predicted from the CPU rungs | measured here |", "|---|---|---|---|"]
for arm in ("max_norm", "noise_scale"):
    for metric in ("fid", "test_loss"):
        f = fits.get(arm, {}).get(metric)
        m = measured["arms"].get(arm, {}).get(metric)
        pred = f"{f['pred']:+.2f}% ± {f['half']:.2f}" if f else "no fit"
        got = f"{m['mean']:+.2f}% ± {m['half']:.2f} ({m['n']} seeds)" if m else "not run"
        lines.append(f"| {arm} | {metric} | {pred} | {got} |")
(results / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
exit "$rc"
