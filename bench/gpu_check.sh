#!/usr/bin/env bash
# One-command GPU check for the fused MAE kernels (dietcl_fast.kernels):
#   1. builds the package in place (pip, no index, no deps, no build isolation);
#   2. correctness on CUDA vs float64 references: tests/test_kernels.py with
#      DIETCL_TEST_DEVICE=cuda (tiny shapes, poisoned buffers, NaN, masks), then ViT-B/16-sized
#      shapes (the GPU block-size heuristics) against a float64 CPU reference;
#   3. the benchmark (bench/bench_mae_kernels.py), markdown table + JSON.
# Output: $OUT if set, else ./bench/results. Usage:  bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUTDIR=${OUT:-$REPO/bench/results}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
unset TRITON_INTERPRET DIETCL_KERNELS || true

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUTDIR/env.txt"

echo "== build in place"
if ! "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . > "$OUTDIR/pip_install.log" 2>&1; then
    # The kernels do not need the C++ extension: fall back to a kernels-only shim, loudly.
    echo "!! pip install failed (see pip_install.log); testing the kernels through a shim package"
    tail -5 "$OUTDIR/pip_install.log" || true
    SHIM=$(mktemp -d)
    mkdir -p "$SHIM/dietcl_fast"
    : > "$SHIM/dietcl_fast/__init__.py"
    ln -s "$REPO/kernels" "$SHIM/dietcl_fast/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== correctness: tests/test_kernels.py on CUDA"
DIETCL_TEST_DEVICE=cuda "$PY" -m pytest tests/test_kernels.py -q -p no:cacheprovider -o addopts=-ra \
    2>&1 | tee "$OUTDIR/pytest_cuda.txt"

echo "== correctness: ViT-B/16 shapes vs float64"
OUTDIR="$OUTDIR" "$PY" - <<'EOF' 2>&1 | tee "$OUTDIR/gpu_check.txt"
import json, os, torch
from dietcl_fast.kernels import backend_for, mae_loss, random_masking
from dietcl_fast.kernels.reference import mae_loss_reference, random_masking_reference
import importlib
ML = importlib.import_module("dietcl_fast.kernels.mae_loss")
dev = torch.device("cuda")
res, ok = {}, True
for i, (dt, tol) in enumerate(((torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2))):
    g = torch.Generator(device=dev); g.manual_seed(1234 + i)
    B, p = 16, 16
    imgs = (torch.randn(B, 3, 224, 224, device=dev, generator=g) * 2 + 0.3).to(dt)
    pred = torch.randn(B, 196, 768, device=dev, generator=g).to(dt).requires_grad_()
    mask = (torch.rand(B, 196, device=dev, generator=g) < 0.75).float()
    assert backend_for(pred) == "triton"
    loss = mae_loss(imgs, pred, mask, p); loss.backward()
    pd = pred.detach().cpu().double().requires_grad_()
    ref = mae_loss_reference(imgs.cpu().double(), pd, mask.cpu().double(), p); ref.backward()
    le = abs(loss.item() - ref.item()) / abs(ref.item())
    ge = ((pred.grad.cpu().double() - pd.grad).abs().max() / pd.grad.abs().max()).item()
    # poisoned grad buffer: every element must be written
    _, denom, _ = ML._launch_fwd(imgs, pred.detach(), mask, p)
    out = torch.full_like(pred, float("nan"))
    ML._launch_bwd(imgs, pred.detach(), mask, denom, torch.tensor(1.0, device=dev), p, out=out)
    poison_ok = bool(torch.isfinite(out).all())
    nan_imgs = imgs.clone(); nan_imgs[0, 0, 0, 0] = float("nan")
    nan_ok = bool(torch.isnan(mae_loss(nan_imgs, pred.detach(), mask, p)))
    # masking, vs float64 reference (same seed, same device)
    x = torch.randn(64, 196, 768, device=dev, generator=g).to(dt).requires_grad_()
    pos = torch.randn(1, 196, 768, device=dev, generator=g).requires_grad_()
    xv, m, ir = random_masking(x, pos, 0.75, seed=7)
    xd = x.detach().double().requires_grad_(); pdd = pos.detach().double().requires_grad_()
    xr, mr, irr = random_masking_reference(xd, pdd, 0.75, seed=7)
    gv = torch.randn_like(xv)
    (xv * gv).sum().backward(); (xr * gv.double()).sum().backward()
    me = ((xv.double() - xr).abs().max() / xr.abs().max()).item()
    mge = ((x.grad.double() - xd.grad).abs().max() / xd.grad.abs().max()).item()
    mpe = ((pos.grad.double() - pdd.grad).abs().max() / pdd.grad.abs().max()).item()
    idx_ok = bool(torch.equal(m, mr) and torch.equal(ir, irr))
    r = dict(loss_rel=le, grad_rel=ge, poison_ok=poison_ok, nan_ok=nan_ok, mask_out_rel=me,
             mask_gx_rel=mge, mask_gpos_rel=mpe, mask_idx_equal=idx_ok)
    passed = (le < tol and ge < tol and poison_ok and nan_ok and me < tol and mge < tol
              and mpe < 1e-5 and idx_ok)
    r["pass"] = passed
    ok &= passed
    res[str(dt)] = r
    print(dt, "PASS" if passed else "FAIL", r)
with open(os.path.join(os.environ["OUTDIR"], "gpu_check.json"), "w") as f:
    json.dump({"pass": ok, "results": res}, f, indent=2)
raise SystemExit(0 if ok else 1)
EOF

echo "== benchmark"
"$PY" bench/bench_mae_kernels.py --out "$OUTDIR/bench_mae_kernels.json" 2>&1 | tee "$OUTDIR/bench_mae_kernels.md"
echo "== done: results in $OUTDIR"
