#!/usr/bin/env bash
# One command for a lent GPU (no DALI, no DeepSpeed, no internet needed). The parts, in the
# order a short window must return them:
#   env             versions, GPU name, driver (into summary.json);
#   build           the package in place, offline (pip --no-index --no-deps --no-build-isolation -e .);
#   kernels         the fused kernels vs float64 on exactly what the trainer passes (fp32 images
#                   channels-last and contiguous, with the tokens each gives; the pred[:, 1:]
#                   view in bf16; micro-batches of 103 and 102 images): `bench kernels --no-timings`;
#   pytest_kernels  tests/test_kernels.py on the device, and the nvjpeg loader's images against
#                   the CPU decode path's (tests/test_cuda_forms.py);
#   step            `bench step --preset vit-b16` compiled, then eager, on device-resident batches
#                   (the memory loader: synthetic images decoded once into GPU memory, augmented
#                   there): one warm-up and two timed iterations per phase, each cold compile
#                   recorded with its seconds; the compiled mode is stopped after its share of
#                   the part's time (--mode-seconds) so that the eager mode always runs;
#   mae_loss        the fused MAE loss and masking against eager, with the memory floor
#                   (`bench kernels --no-check --no-compile-ref`);
#   loader          the torch loader's images/s (nvjpeg, PIL) alone and beside a ViT-B/16 step.
# Every part is bounded by its limit (PART_TABLE) and writes its JSON as it goes, so a part
# stopped at its limit keeps what it had measured. The limits add up to the deadline: with no
# arguments the suite ends within 360 s on a GPU, the offline build included.
#
# What lands under $OUT (default bench/results/gpu-suite): at most 8 files whatever is killed:
#   summary.json   rewritten after every part: each part's exit/seconds, env, headline figures
#   suite.log      everything the parts print (PYTHONUNBUFFERED=1: nothing is lost to a kill)
#   logs.tar.gz    the rest of the logs (the full pytest output, env.json), rewritten after
#                  every part
#   kernels.json step.json mae_loss.json loader.json   the parts' results
# plus, for an instant, the one temporary file of an atomic write (cleared after every part).
# Scratch files live outside $OUT. A failing part is recorded and the suite goes on; a part
# that would start with less than its minimum time left is recorded as skipped. Exit status 1
# if any part failed or was skipped.
#
# Usage:  bash bench/gpu_suite.sh [--deadline S] [--only part,part] [--no-build]   # on the GPU
#         bash bench/gpu_suite.sh --cpu [--no-build]   # every line but the device: tiny shapes
#                                                      # on the CPU (the test suite runs this)
#         bash bench/gpu_suite.sh [--cpu] --plan       # the parts and limits as JSON, no run
# --only reruns chosen parts (env and build always run: a fresh machine has neither the build
# nor a warm torch.compile cache). With --cpu every limit is LIMIT_SCALE (8) times the GPU's:
# the cold compile of the cpu-tiny step graphs takes minutes on a loaded 2-core machine.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

# name:limit:minimum (GPU seconds), in run order: the one place the parts and limits are set
PART_TABLE="env:15:5 build:30:10 kernels:35:15 pytest_kernels:60:20 step:150:60 mae_loss:25:10 loader:35:15"
RESERVE=10          # seconds kept for the last summary and log archive
EAGER_SHARE=35      # of the step part's seconds, kept for the eager mode after the compiled one
PARTS=""
declare -A LIMIT MIN
SUM=0
for e in $PART_TABLE; do
    IFS=: read -r name lim min <<< "$e"
    PARTS="$PARTS $name"; LIMIT[$name]=$lim; MIN[$name]=$min; SUM=$((SUM + lim))
done
PARTS=${PARTS# }

MODE=gpu
BUILD=1
DEADLINE=""
ONLY=""
PLAN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --no-build) BUILD=0 ;;
        --plan) PLAN=1 ;;
        --deadline) DEADLINE=${2:-}; shift ;;
        --deadline=*) DEADLINE=${1#*=} ;;
        --only) ONLY=${2:-}; shift ;;
        --only=*) ONLY=${1#*=} ;;
        *) echo "gpu_suite.sh: unknown option $1 (use --cpu, --no-build, --deadline S, --only PARTS, --plan)" >&2
           exit 2 ;;
    esac
    shift
done
if [ "$MODE" = gpu ]; then LIMIT_SCALE=1; else LIMIT_SCALE=8; fi
DEFAULT_DEADLINE=$((LIMIT_SCALE * SUM + RESERVE))       # 360 on a GPU
if [ -z "$DEADLINE" ]; then DEADLINE=$DEFAULT_DEADLINE; fi
case "$DEADLINE" in
    ''|*[!0-9]*) echo "gpu_suite.sh: --deadline '$DEADLINE': a whole number of seconds" >&2; exit 2 ;;
esac
if [ "$DEADLINE" -lt 20 ]; then
    echo "gpu_suite.sh: --deadline $DEADLINE: at least 20 seconds" >&2; exit 2
fi
for p in ${ONLY//,/ }; do
    case " $PARTS " in
        *" $p "*) ;;
        *) echo "gpu_suite.sh: --only '$ONLY': unknown part '$p' (parts: ${PARTS// /, })" >&2; exit 2 ;;
    esac
done
if [ "$PLAN" = 1 ]; then        # the plan the run would follow (the test suite checks it)
    printf '{"mode": "%s", "deadline_seconds": %d, "default_deadline_seconds": %d, "reserve_seconds": %d, "eager_share_seconds": %d, "parts": [' \
        "$MODE" "$DEADLINE" "$DEFAULT_DEADLINE" "$RESERVE" $((EAGER_SHARE * LIMIT_SCALE))
    sep=""
    for p in $PARTS; do
        printf '%s{"name": "%s", "limit_seconds": %d, "min_seconds": %d}' "$sep" "$p" \
            $((LIMIT[$p] * LIMIT_SCALE)) "${MIN[$p]}"
        sep=", "
    done
    printf ']}\n'
    exit 0
fi
wanted() { [ -z "$ONLY" ] || [ "$1" = env ] || [ "$1" = build ] || case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

OUTDIR=${OUT:-bench/results/gpu-suite}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
LOG="$OUTDIR/suite.log"
: > "$LOG"
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite.XXXXXX")     # outside $OUT: counts no file there
trap 'rm -rf "$SCRATCH"' EXIT
STATUS="$SCRATCH/status"
: > "$STATUS"
unset DIETCL_KERNELS || true

left() { echo $((DEADLINE - SECONDS - RESERVE)); }
part_limit() {  # part_limit NAME: its limit, cut to the time left
    local limit=$((LIMIT[$1] * LIMIT_SCALE)) budget; budget=$(left)
    [ "$budget" -lt "$limit" ] && limit=$budget
    echo "$limit"
}

run() {   # run NAME CMD... : logged, timed, status recorded, never aborts the suite
    local name=$1; shift
    wanted "$name" || return 0
    local budget limit; budget=$(left); limit=$(part_limit "$name")
    if [ "$budget" -lt "${MIN[$name]}" ]; then
        echo "== $name: skipped, ${budget} s left before the deadline (needs >= ${MIN[$name]})" | tee -a "$LOG"
        echo "$name skipped 0" >> "$STATUS"; finish_part; return 0
    fi
    echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "$name $rc $((SECONDS - t0))" >> "$STATUS"
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
    finish_part
}

finish_part() {   # after every part: no stray temporary file, the summary and the log archive
    rm -f "$OUTDIR"/.tmp-* 2>/dev/null
    summarise
    tar -czf "$OUTDIR/.tmp-logs.tar.gz" -C "$SCRATCH" . 2>/dev/null \
        && mv -f "$OUTDIR/.tmp-logs.tar.gz" "$OUTDIR/logs.tar.gz"
}

summarise() {   # summary.json from the parts run so far (rewritten after each part)
    "$PY" - "$OUTDIR" "$SCRATCH" "$MODE" "$DEADLINE" "$SECONDS" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, os, sys
out, scratch, mode, deadline, elapsed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
parts = {}
for line in open(os.path.join(scratch, "status")):
    name, rc, secs = line.split()
    parts[name] = {"exit": None if rc == "skipped" else int(rc), "seconds": int(secs),
                   "pass": rc == "0", "skipped": rc == "skipped",
                   "timed_out": rc in ("124", "137")}
def load(d, name, part):
    p = os.path.join(d, name)
    if part not in parts:               # figures only from parts this run ran
        return None
    try:
        return json.load(open(p)) if os.path.isfile(p) else None
    except ValueError:
        return None
summary = {"mode": mode, "deadline_seconds": deadline, "elapsed_seconds": elapsed,
           "parts": parts, "pass": bool(parts) and all(p["pass"] for p in parts.values()),
           "env": load(scratch, "env.json", "env")}
k, s, m, l = (load(out, "kernels.json", "kernels"), load(out, "step.json", "step"),
              load(out, "mae_loss.json", "mae_loss"), load(out, "loader.json", "loader"))
if k:
    summary["kernels_correct"] = k.get("check", {}).get("pass")
    summary["kernels_cases_checked"] = len(k.get("check", {}).get("cases", []))
if m:
    summary["mae_loss_fused_speedup"] = m.get("speedup")
    summary["mae_loss_timings"] = [{k2: r.get(k2) for k2 in ("op", "variant", "median_ms", "speedup",
                                                             "x_floor")}
                                   for r in m.get("timings", {}).get("rows", [])]
if s:
    summary["step"] = {key: s.get(key) for key in ("complete", "speedup", "seconds_per_step",
                                                    "projected_seconds_per_time_step",
                                                    "matmul_peak_flops", "budget")}
    summary["step"]["mfu"] = {md: r.get("mfu") for md, r in s.get("modes", {}).items()}
    summary["step"]["seconds_per_iteration"] = {
        md: {ph: p.get("seconds_per_iteration") for ph, p in r.get("phases", {}).items()}
        for md, r in s.get("modes", {}).items()}
    summary["step"]["mode_wall_seconds"] = {md: r.get("mode_wall_seconds")
                                            for md, r in s.get("modes", {}).items()}
    summary["step"]["errors"] = {md: e.get("error") for md, e in s.get("errors", {}).items()}
    summary["step"]["compile_seconds"] = s.get("compile_seconds")
    # what torch.compile built, where, in how many seconds (also a mode stopped at its limit)
    summary["step"]["compile_graphs"] = {
        md: [{"function": g.get("function"), "where": g.get("where"), "seconds": g.get("seconds")}
             for g in r["compile_log"].get("graphs", [])]
        for md, r in [*s.get("errors", {}).items(), *s.get("modes", {}).items()]
        if r.get("compile_log")}
if l:
    summary["loader"] = [{k2: r.get(k2) for k2 in ("backend", "images_per_second",
                          "images_per_second_with_step", "step_slowdown")} for r in l["backends"]]
tmp = os.path.join(out, ".tmp-summary.json")
json.dump(summary, open(tmp, "w"), indent=2)
os.replace(tmp, os.path.join(out, "summary.json"))
PYEOF
}

if [ "$MODE" = gpu ]; then
    DEV=(--device cuda); unset TRITON_INTERPRET || true
    KERNELS=(); STEP=(--preset vit-b16 --steps 2 --warmup 1)
    LOADER=(--preset vit-b16 --backends torch-nvjpeg,torch-pil --n 256 --batch 256 --seconds 2)
    TESTDEV=cuda; PYTEST_EXTRA=()
else
    DEV=(--device cpu); export TRITON_INTERPRET=1
    KERNELS=(--tiny); STEP=(--preset cpu-tiny --batch-size 16 --steps 1 --warmup 1 --tiny-peak)
    LOADER=(--preset cpu-tiny --backends torch-decode_jpeg-cpu --tiny)
    TESTDEV=cpu
    PYTEST_EXTRA=(--collect-only)   # the test suite runs these tests itself
fi

run env "$PY" - "$SCRATCH/env.json" <<'PYEOF'
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
                                           timeout=10).stdout.strip()
    except Exception as e:
        env["nvidia_smi"] = f"unavailable: {e}"
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
PYEOF

if [ "$BUILD" = 1 ]; then
    run build "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
fi

BENCH=("$PY" -m dietcl_fast.cli.main bench)
run kernels "${BENCH[@]}" kernels "${DEV[@]}" "${KERNELS[@]}" --no-timings --out "$OUTDIR/kernels.json"
export DIETCL_TEST_DEVICE=$TESTDEV
# the kernel tests, and the nvjpeg loader's images against the CPU decode path's (GPU only)
run pytest_kernels bash -c '"$1" -m pytest tests/test_kernels.py \
    tests/test_cuda_forms.py::test_gpu_nvjpeg_loader_returns_the_cpu_decode_paths_images -q -x -p no:cacheprovider \
    "${@:3}" > "$2" 2>&1; rc=$?; tail -5 "$2"; exit $rc' _ "$PY" "$SCRATCH/pytest_kernels.txt" "${PYTEST_EXTRA[@]}"
# the compiled mode gets the step part's time less the eager mode's share
MODE_SECONDS=$(($(part_limit step) - EAGER_SHARE * LIMIT_SCALE))
[ "$MODE_SECONDS" -lt 1 ] && MODE_SECONDS=1
run step "${BENCH[@]}" step "${DEV[@]}" "${STEP[@]}" --loader memory --modes compiled,eager \
    --mode-seconds "$MODE_SECONDS" --out "$OUTDIR/step.json"
run mae_loss "${BENCH[@]}" kernels "${DEV[@]}" "${KERNELS[@]}" --no-check --no-compile-ref \
    --out "$OUTDIR/mae_loss.json"
run loader "${BENCH[@]}" loader "${DEV[@]}" "${LOADER[@]}" --out "$OUTDIR/loader.json"

"$PY" -c 'import json, sys; s = json.load(open(sys.argv[1])); print(json.dumps(s, indent=2)); sys.exit(0 if s["pass"] else 1)' \
    "$OUTDIR/summary.json" | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
