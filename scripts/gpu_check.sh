#!/usr/bin/env bash
# One short GPU check (target: under 8 minutes on one H100/H200).
#
#   scripts/gpu_check.sh                      # results in benchmarks/gpu/
#   GPU_CHECK_RESULTS=/some/dir scripts/gpu_check.sh
#
# 1. checks the machine's torch sees CUDA, installs this package around it (never replaces torch),
# 2. runs the GPU-only tests (pytest -m gpu),
# 3. benchmarks: DiT-S/2 training step on random 4x32x32 latents in bf16 and in fp32 (TF32) -> images/s/GPU
#    (`noiserater bench loader`, which also times the latent-cache loader); the selection overhead at
#    k = 1, 2, 4, 8 with the paper-size rater (`noiserater bench selection`); the meta-gradient benchmark
#    (`noiserater bench metagrad`, when this checkout has it),
# 4. writes summary.json: the figures next to the paper's (323 images/s/GPU for DiT-S/2 on H100 from
#    "400k steps x 256 images in 22 h on 4 GPUs"; selection overhead 1.30x / 1.63x / 2.09x at k = 2 / 4 / 8).
#
# Every part logs to RESULTS/gpu_check.log and has its own timeout; a failing part is recorded and the
# others still run; the exit status is non-zero if any part failed. GPU_CHECK_BUDGET (seconds, default
# 450) caps the whole run: a part gets at most what is left of it.
set -euo pipefail

cd "$(dirname "$0")/.."
RESULTS="${GPU_CHECK_RESULTS:-benchmarks/gpu}"
BUDGET="${GPU_CHECK_BUDGET:-450}"
PY="${PYTHON:-python3}"
# For a plumbing check on a CPU machine only: GPU_CHECK_DEVICE=cpu GPU_CHECK_MODEL=DiT-N/2 GPU_CHECK_BATCH=4
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
MODEL="${GPU_CHECK_MODEL:-DiT-S/2}"
BATCH="${GPU_CHECK_BATCH:-64}"
RATERS="${GPU_CHECK_RATERS:-Rater-S/2,FastRater-M/2}"
REPEATS="${GPU_CHECK_REPEATS:-20}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
: > "$LOG"
FAILED=()

log() { echo "[gpu_check $(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

# run NAME TIMEOUT_S CMD...: run with a timeout bounded by the remaining budget; record failures.
run() {
  local name=$1 limit=$2 left rc
  shift 2
  left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    log "SKIP $name: budget of ${BUDGET}s used up"
    FAILED+=("$name(skipped:budget)")
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "start $name (timeout ${limit}s): $*"
  set +e
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  set -e
  if [ "$rc" -eq 0 ]; then
    log "ok $name"
  else
    log "FAILED $name (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))"
    FAILED+=("$name")
  fi
}

# ---- 1. the machine and the install ----------------------------------------------------------------
log "results in $RESULTS, budget ${BUDGET}s, python $($PY -c 'import sys; print(sys.version.split()[0])')"
(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true) >"$RESULTS/nvidia_smi.txt" 2>&1
cat "$RESULTS/nvidia_smi.txt" >>"$LOG"
if ! $PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() or '$DEVICE' == 'cpu' else 3)" 2>&1 | tee -a "$LOG"; then
  log "no CUDA device visible to torch: nothing to check"
  exit 3
fi

# The package itself without dependencies (works offline, never touches torch) ...
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = "1" ]; then
  log "install skipped (GPU_CHECK_SKIP_INSTALL=1)"
elif ! timeout 120 $PY -m pip install --no-build-isolation --no-deps -e . >>"$LOG" 2>&1; then
  log "editable install failed: using PYTHONPATH=src"
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
# ... then whatever the tests and benchmarks import that is missing ('.[test]' keeps the installed torch).
missing=$($PY - <<'EOF'
import importlib.util
mods = ["numpy", "click", "tqdm", "yaml", "scipy", "PIL", "pandas", "matplotlib", "sklearn",
        "tensorboard", "pytest", "hypothesis", "diffusers", "torchmetrics"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ] && [ "${GPU_CHECK_SKIP_INSTALL:-0}" != "1" ]; then
  log "missing modules: $missing -> pip install -e '.[test]'"
  run install 240 $PY -m pip install -e ".[test]"
fi
$PY -c "import noiserater, torch; print('noiserater', noiserater.__version__, 'from', noiserater.__file__)" >>"$LOG" 2>&1

NR=($PY -m noiserater)
HAVE_BENCH=$("${NR[@]}" bench --help 2>/dev/null || true)

# ---- 2. GPU-only tests -------------------------------------------------------------------------------
run tests_gpu 240 $PY -m pytest -m gpu tests -q -p no:cacheprovider -rs --durations=10 \
  --junitxml="$RESULTS/pytest_gpu.xml"

# ---- 3. benchmarks -------------------------------------------------------------------------------------
# DiT-S/2 training step, per-GPU batch 64 (the paper's global 256 on 4 GPUs), random latents.
run train_bf16 150 "${NR[@]}" bench loader --device "$DEVICE" --model "$MODEL" --batch-size "$BATCH" --amp --tf32 \
  --repeats "$REPEATS" --num 8192 --out "$RESULTS/train_dit_s2_bf16.json"
run train_fp32 150 "${NR[@]}" bench loader --device "$DEVICE" --model "$MODEL" --batch-size "$BATCH" --no-amp --tf32 \
  --repeats "$REPEATS" --num 8192 --out "$RESULTS/train_dit_s2_fp32.json"

if [[ "$HAVE_BENCH" == *selection* ]]; then
  run selection 200 "${NR[@]}" bench selection --json "$RESULTS/selection.json" --device "$DEVICE" --model "$MODEL" \
    --input-size 32 --channels 4 --classes 1000 --batch "$BATCH" --raters "$RATERS" --soft-raters "" \
    --k 1,2,4,8 --repeats 5
else
  log "SKIP selection: this checkout has no 'noiserater bench selection'"
fi

if [[ "$HAVE_BENCH" == *metagrad* ]]; then
  META_HELP=$("${NR[@]}" bench metagrad --help 2>/dev/null || true)
  OUTFLAG=--out
  [[ "$META_HELP" == *--json* ]] && OUTFLAG=--json
  # the paper's scale: DiT-S/2 + Rater-S/2 on 4x32x32 latents, K = 8, S = 1 and 5 (one process each)
  META_ARGS=()
  for pair in "--device=$DEVICE" "--model=${GPU_CHECK_META_MODEL:-DiT-S/2}" "--rater=${GPU_CHECK_META_RATER:-Rater-S/2}" \
              "--image-size=32" "--channels=4" "--batch=8" "--candidates=8" "--steps=1,5" \
              "--methods=reverse,reverse_fwd,unrolled" "--repeats=2" "--timeout=60" "--figure=$RESULTS/metagrad.png" \
              "--plot=$RESULTS/metagrad.png"; do  # --plot: older checkouts (now a hidden alias, not in --help)
    [[ "$META_HELP" == *"${pair%%=*}"* ]] && META_ARGS+=("$pair")
  done
  run metagrad 240 "${NR[@]}" bench metagrad ${META_ARGS[@]+"${META_ARGS[@]}"} "$OUTFLAG" "$RESULTS/metagrad.json"
else
  log "SKIP metagrad: this checkout has no 'noiserater bench metagrad'"
fi

if [ "${GPU_CHECK_COMPILE:-0}" = "1" ]; then  # optional: torch.compile'd bf16 step (compiling takes a while)
  run train_bf16_compile 200 "${NR[@]}" bench loader --device "$DEVICE" --model "$MODEL" --batch-size "$BATCH" --amp \
    --compile --repeats "$REPEATS" --num 8192 --out "$RESULTS/train_dit_s2_bf16_compile.json"
fi

# ---- 4. summary ------------------------------------------------------------------------------------
BUDGET=$((SECONDS + 40))  # the summary always gets its half minute
run summary 30 $PY scripts/gpu_summary.py "$RESULTS"
if [ "${#FAILED[@]}" -gt 0 ]; then
  log "done in ${SECONDS}s; FAILED: ${FAILED[*]}"
  exit 1
fi
log "done in ${SECONDS}s; all parts passed"
