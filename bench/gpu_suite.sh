#!/usr/bin/env bash
# One command for a lent GPU (about 6-8 minutes on one H100; no DALI, no internet needed):
#   1. build the package in place, offline (pip --no-index --no-deps --no-build-isolation -e .);
#   2. kernel correctness: tests/test_kernels.py on the device, then the fused kernels vs float64
#      on exactly what the trainer passes (fp32 images, the pred[:, 1:] view, micro-batches of
#      103 and 102 images) and their timings vs eager (`dietcl-fast bench kernels`);
#   3. `dietcl-fast bench step --preset vit-b16`: DietCL joint + buffer-only iterations, eager vs
#      compiled, with data (torch loader), eval and checkpoint; projected seconds per time step;
#   4. `dietcl-fast bench loader`: the torch loader's images/s alone and while a ViT-B/16
#      training step runs (and the step's slowdown);
#   5. `dietcl-fast bench flops`: MFU of the classify / MAE passes vs the measured bf16 peak.
# Everything lands under $OUT (default bench/results/gpu-suite), at most 8 files, one folder:
#   env.json kernels.json step.json loader.json flops.json pytest_kernels.txt suite.log summary.json
# A failing part is recorded in summary.json and the suite goes on; exit status 1 if any failed.
#
# Usage:  bash bench/gpu_suite.sh                 # on the GPU machine
#         bash bench/gpu_suite.sh --cpu [--no-build]
#                                                 # every line but the device: tiny shapes on the
#                                                 # CPU (the test suite runs this)
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
BUILD=1
for a in "$@"; do
    case "$a" in
        --cpu) MODE=cpu ;;
        --no-build) BUILD=0 ;;
        *) echo "gpu_suite.sh: unknown option $a (use --cpu, --no-build)" >&2; exit 2 ;;
    esac
done
OUTDIR=${OUT:-bench/results/gpu-suite}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
LOG="$OUTDIR/suite.log"
: > "$LOG"
STATUS="$OUTDIR/.status"
: > "$STATUS"
unset DIETCL_KERNELS || true

run() {   # run NAME TIMEOUT_S CMD... : logged, timed, status recorded, never aborts the suite
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "$name $rc $((SECONDS - t0))" >> "$STATUS"
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

if [ "$MODE" = gpu ]; then
    DEV=(--device cuda); unset TRITON_INTERPRET || true
    KERNELS=(); STEP=(--preset vit-b16 --loader torch --steps 4 --warmup 2)
    LOADER=(--preset vit-b16 --backends torch-nvjpeg,torch-pil --n 512 --batch 256 --seconds 5)
    FLOPS=(--preset vit-b16); TESTDEV=cuda; PYTEST_EXTRA=()
else
    DEV=(--device cpu); export TRITON_INTERPRET=1
    KERNELS=(--tiny); STEP=(--preset cpu-tiny --loader torch --steps 1 --warmup 0 --tiny-peak)
    LOADER=(--preset cpu-tiny --backends torch-decode_jpeg-cpu --tiny)
    FLOPS=(--preset cpu-tiny --tiny); TESTDEV=cpu
    PYTEST_EXTRA=(--collect-only)   # the test suite runs these tests itself
fi

run env 120 "$PY" - "$OUTDIR/env.json" <<'PYEOF'
import json, platform, subprocess, sys
import torch
env = {"python": platform.python_version(), "torch": torch.__version__,
       "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda}
try:
    import triton; env["triton"] = triton.__version__
except Exception as e:
    env["triton"] = f"not importable: {e}"
if torch.cuda.is_available():
    env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=30).stdout.strip()
    except Exception as e:
        env["nvidia_smi"] = f"unavailable: {e}"
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
PYEOF

if [ "$BUILD" = 1 ]; then
    run build 300 "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
fi

echo "== pytest_kernels" | tee -a "$LOG"
t0=$SECONDS
DIETCL_TEST_DEVICE=$TESTDEV timeout 300 "$PY" -m pytest tests/test_kernels.py -q -x "${PYTEST_EXTRA[@]}" \
    -p no:cacheprovider > "$OUTDIR/pytest_kernels.txt" 2>&1
echo "pytest_kernels $? $((SECONDS - t0))" >> "$STATUS"
tail -3 "$OUTDIR/pytest_kernels.txt" | tee -a "$LOG"

run kernels 240 "$PY" -m dietcl_fast.cli.main bench kernels "${DEV[@]}" "${KERNELS[@]}" --out "$OUTDIR/kernels.json"
run step 420 "$PY" -m dietcl_fast.cli.main bench step "${DEV[@]}" "${STEP[@]}" --out "$OUTDIR/step.json"
run loader 180 "$PY" -m dietcl_fast.cli.main bench loader "${DEV[@]}" "${LOADER[@]}" --out "$OUTDIR/loader.json"
run flops 180 "$PY" -m dietcl_fast.cli.main bench flops "${DEV[@]}" "${FLOPS[@]}" --out "$OUTDIR/flops.json"

"$PY" - "$OUTDIR" "$MODE" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, os, sys
out, mode = sys.argv[1], sys.argv[2]
parts = {}
for line in open(os.path.join(out, ".status")):
    name, rc, secs = line.split()
    parts[name] = {"exit": int(rc), "seconds": int(secs), "pass": rc == "0"}
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.isfile(p) else None
summary = {"mode": mode, "parts": parts, "pass": all(p["pass"] for p in parts.values())}
k, s, l, f = load("kernels.json"), load("step.json"), load("loader.json"), load("flops.json")
if k:
    summary["kernels_correct"] = k.get("check", {}).get("pass")
    summary["mae_loss_fused_speedup"] = k.get("speedup")
if s:
    summary["step"] = {key: s.get(key) for key in ("speedup", "seconds_per_step",
                                                    "projected_seconds_per_time_step",
                                                    "matmul_peak_flops", "budget")}
    summary["step"]["mfu"] = {m: r.get("mfu") for m, r in s.get("modes", {}).items()}
if l:
    summary["loader"] = [{k2: r.get(k2) for k2 in ("backend", "images_per_second",
                          "images_per_second_with_step", "step_slowdown")} for r in l["backends"]]
if f:
    summary["flops_mfu"] = f.get("mfu")
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(json.dumps(summary, indent=2))
sys.exit(0 if summary["pass"] else 1)
PYEOF
rc=${PIPESTATUS[0]}
rm -f "$STATUS"
exit $rc
