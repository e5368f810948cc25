#!/usr/bin/env bash
# One command for a lent GPU (no DALI, no internet needed), parts in order of value per second:
#   env     versions, GPU name, driver;
#   build   the package in place, offline (pip --no-index --no-deps --no-build-isolation -e .);
#   kernels the fused kernels vs float64 on exactly what the trainer passes (fp32 images, the
#           pred[:, 1:] view, micro-batches of 103 and 102 images), then their timings vs eager
#           and the memory floor (`dietcl-fast bench kernels`);
#   step    `dietcl-fast bench step --preset vit-b16`: DietCL joint + buffer-only iterations with
#           data (torch loader), eval and checkpoint, eager first, then compiled (step.json is
#           written after each mode; the compiled mode builds three graphs, each recorded with
#           its compile seconds); projected seconds per time step, MFU;
#   loader  the torch loader's images/s alone and while a ViT-B/16 training step runs;
#   flops   MFU of the classify / MAE passes vs the measured bf16 peak;
#   pytest_kernels  tests/test_kernels.py on the device, and the nvjpeg loader's images against
#           the CPU decode path's (tests/test_cuda_forms.py).
# Everything lands under $OUT (default bench/results/gpu-suite), at most 8 files, one folder:
#   env.json kernels.json step.json loader.json flops.json pytest_kernels.txt suite.log summary.json
# summary.json is rewritten after every part, so a suite killed from outside still leaves the
# figures of the parts that finished. A failing part is recorded and the suite goes on; a part
# that would start with less than its minimum time left before --deadline is recorded as
# skipped. Exit status 1 if any part failed or was skipped.
#
# The whole suite stops within --deadline seconds (default 480 on a GPU, i.e. 8 minutes; 2400
# with --cpu); each part's own limit is cut to what is left. With --cpu every part's limit is 4x
# its GPU limit: torch.compile's cold build of the cpu-tiny step graphs takes 3-5 minutes on a
# loaded 2-core machine, more than the step part's 330 s GPU limit. A lent GPU comes with a fixed
# device-time allowance that includes the machine's start: run the suite once with a deadline
# that leaves time for a second run, fix what it shows, then rerun only the parts that failed
# with --only (env and build always run; a fresh machine has neither the build nor a warm
# torch.compile cache).
#
# Usage:  bash bench/gpu_suite.sh [--deadline S] [--only part,part] [--no-build]   # on the GPU
#         bash bench/gpu_suite.sh --cpu [--no-build] # every line but the device: tiny shapes on
#                                                    # the CPU (the test suite runs this)
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
BUILD=1
DEADLINE=""
ONLY=""
PARTS="env build kernels step loader flops pytest_kernels"
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --no-build) BUILD=0 ;;
        --deadline) DEADLINE=${2:-}; shift ;;
        --deadline=*) DEADLINE=${1#*=} ;;
        --only) ONLY=${2:-}; shift ;;
        --only=*) ONLY=${1#*=} ;;
        *) echo "gpu_suite.sh: unknown option $1 (use --cpu, --no-build, --deadline S, --only PARTS)" >&2
           exit 2 ;;
    esac
    shift
done
if [ -z "$DEADLINE" ]; then    # 8 minutes on a GPU; the CPU mode compiles on 2 cores
    if [ "$MODE" = gpu ]; then DEADLINE=480; else DEADLINE=2400; fi
fi
case "$DEADLINE" in
    ''|*[!0-9]*) echo "gpu_suite.sh: --deadline '$DEADLINE': a whole number of seconds" >&2; exit 2 ;;
esac
if [ "$DEADLINE" -lt 60 ]; then
    echo "gpu_suite.sh: --deadline $DEADLINE: at least 60 seconds" >&2; exit 2
fi
for p in ${ONLY//,/ }; do
    case " $PARTS " in
        *" $p "*) ;;
        *) echo "gpu_suite.sh: --only '$ONLY': unknown part '$p' (parts: ${PARTS// /, })" >&2; exit 2 ;;
    esac
done
wanted() { [ -z "$ONLY" ] || [ "$1" = env ] || [ "$1" = build ] || case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
OUTDIR=${OUT:-bench/results/gpu-suite}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
LOG="$OUTDIR/suite.log"
: > "$LOG"
STATUS="$OUTDIR/.status"
: > "$STATUS"
unset DIETCL_KERNELS || true

RESERVE=15          # seconds kept for the summary at the end
if [ "$MODE" = gpu ]; then LIMIT_SCALE=1; else LIMIT_SCALE=4; fi
left() { echo $((DEADLINE - SECONDS - RESERVE)); }

run() {   # run NAME LIMIT_S MIN_S CMD... : logged, timed, status recorded, never aborts the suite
    local name=$1 limit=$(($2 * LIMIT_SCALE)) min=$3; shift 3
    wanted "$name" || return 0
    local budget; budget=$(left)
    if [ "$budget" -lt "$min" ]; then
        echo "== $name: skipped, ${budget} s left before the deadline (needs >= $min)" | tee -a "$LOG"
        echo "$name skipped 0" >> "$STATUS"; summarise; return 0
    fi
    [ "$budget" -lt "$limit" ] && limit=$budget
    echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "$name $rc $((SECONDS - t0))" >> "$STATUS"
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
    summarise
}

summarise() {   # summary.json from the parts so far (rewritten after each part)
    "$PY" - "$OUTDIR" "$MODE" "$DEADLINE" "$SECONDS" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, os, sys
out, mode, deadline, elapsed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
parts = {}
for line in open(os.path.join(out, ".status")):
    name, rc, secs = line.split()
    parts[name] = {"exit": None if rc == "skipped" else int(rc), "seconds": int(secs),
                   "pass": rc == "0", "skipped": rc == "skipped",
                   "timed_out": rc in ("124", "137")}
def load(name):
    p = os.path.join(out, name)
    try:
        return json.load(open(p)) if os.path.isfile(p) else None
    except ValueError:
        return None
summary = {"mode": mode, "deadline_seconds": deadline, "elapsed_seconds": elapsed,
           "parts": parts, "pass": bool(parts) and all(p["pass"] for p in parts.values())}
k, s, l, f = load("kernels.json"), load("step.json"), load("loader.json"), load("flops.json")
if k:
    summary["kernels_correct"] = k.get("check", {}).get("pass")
    summary["mae_loss_fused_speedup"] = k.get("speedup")
if s:
    summary["step"] = {key: s.get(key) for key in ("complete", "speedup", "seconds_per_step",
                                                    "projected_seconds_per_time_step",
                                                    "matmul_peak_flops", "budget")}
    summary["step"]["mfu"] = {m: r.get("mfu") for m, r in s.get("modes", {}).items()}
    summary["step"]["mode_wall_seconds"] = {m: r.get("mode_wall_seconds")
                                            for m, r in s.get("modes", {}).items()}
    summary["step"]["errors"] = {m: e.get("error") for m, e in s.get("errors", {}).items()}
    summary["step"]["compile_seconds"] = s.get("compile_seconds")
    # what torch.compile built, where, in how many seconds (also a mode stopped at its limit)
    summary["step"]["compile_graphs"] = {
        m: [{"function": g.get("function"), "where": g.get("where"), "seconds": g.get("seconds")}
            for g in r["compile_log"].get("graphs", [])]
        for m, r in [*s.get("errors", {}).items(), *s.get("modes", {}).items()]
        if r.get("compile_log")}
if l:
    summary["loader"] = [{k2: r.get(k2) for k2 in ("backend", "images_per_second",
                          "images_per_second_with_step", "step_slowdown")} for r in l["backends"]]
if f:
    summary["flops_mfu"] = f.get("mfu")
tmp = os.path.join(out, ".summary.json.tmp")
json.dump(summary, open(tmp, "w"), indent=2)
os.replace(tmp, os.path.join(out, "summary.json"))
PYEOF
}

if [ "$MODE" = gpu ]; then
    DEV=(--device cuda); unset TRITON_INTERPRET || true
    KERNELS=(); STEP=(--preset vit-b16 --loader torch --steps 4 --warmup 2)
    LOADER=(--preset vit-b16 --backends torch-nvjpeg,torch-pil --n 512 --batch 256 --seconds 5)
    FLOPS=(--preset vit-b16); TESTDEV=cuda; PYTEST_EXTRA=()
else
    DEV=(--device cpu); export TRITON_INTERPRET=1
    KERNELS=(--tiny); STEP=(--preset cpu-tiny --loader torch --steps 1 --warmup 1 --tiny-peak)
    LOADER=(--preset cpu-tiny --backends torch-decode_jpeg-cpu --tiny)
    FLOPS=(--preset cpu-tiny --tiny); TESTDEV=cpu
    PYTEST_EXTRA=(--collect-only)   # the test suite runs these tests itself
fi

run env 60 10 "$PY" - "$OUTDIR/env.json" <<'PYEOF'
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
    run build 120 20 "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
fi

run kernels 150 30 "$PY" -m dietcl_fast.cli.main bench kernels "${DEV[@]}" "${KERNELS[@]}" --out "$OUTDIR/kernels.json"
run step 330 45 "$PY" -m dietcl_fast.cli.main bench step "${DEV[@]}" "${STEP[@]}" --out "$OUTDIR/step.json"
run loader 120 30 "$PY" -m dietcl_fast.cli.main bench loader "${DEV[@]}" "${LOADER[@]}" --out "$OUTDIR/loader.json"
run flops 90 20 "$PY" -m dietcl_fast.cli.main bench flops "${DEV[@]}" "${FLOPS[@]}" --out "$OUTDIR/flops.json"
export DIETCL_TEST_DEVICE=$TESTDEV
# the kernel tests, and the nvjpeg loader's images against the CPU decode path's (GPU only)
run pytest_kernels 120 20 bash -c '"$1" -m pytest tests/test_kernels.py \
    tests/test_cuda_forms.py::test_gpu_nvjpeg_loader_returns_the_cpu_decode_paths_images -q -x -p no:cacheprovider \
    "${@:3}" > "$2" 2>&1; rc=$?; tail -3 "$2"; exit $rc' _ "$PY" "$OUTDIR/pytest_kernels.txt" "${PYTEST_EXTRA[@]}"

summarise
"$PY" -c 'import json, sys; s = json.load(open(sys.argv[1])); print(json.dumps(s, indent=2)); sys.exit(0 if s["pass"] else 1)' \
    "$OUTDIR/summary.json" | tee -a "$LOG"
rc=${PIPESTATUS[0]}
rm -f "$STATUS"
exit $rc
