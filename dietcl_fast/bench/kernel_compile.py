"""`bench kernels --compile-only`: every Triton kernel variant a training run launches, compiled
for a CUDA architecture by Triton's own compiler and ptxas, with no GPU and no driver.

A *variant* is what Triton compiles one binary for: a kernel with its argument types, its
constexprs (block sizes, `num_warps`) and its specialisations (an integer argument equal to 1
becomes a constant, one divisible by 16 and a pointer aligned to 16 bytes are marked so). The
launchers (`kernels.mae_loss`, `kernels.masking`) are called exactly as the model calls them,
on host tensors with the trainer's shapes, dtypes and strides, with `_dispatch.jit` replaced by
a compile-only stand-in and Triton's active driver replaced by one that only names the target
(`GPUTarget("cuda", arch, 32)`); Triton derives each variant from the arguments as it does at a
real launch, so the set is the one a GPU run compiles. The trainer's launches (`trainer_cases`):

* presets `vit-b16` (3 channels) and `cpu-tiny` (1 or 3 channels: its channels follow the data);
* compute dtype bf16 (autocast: every GPU run) and fp32 (no autocast): the decoder's `pred` and
  the patch tokens in that dtype, images fp32, `pos_embed` fp32 (so the masking output is fp32);
* image layout `channels_last` (the torch and DALI loaders hand over uint8 [n, S, S, 3] viewed
  as [n, 3, S, S]; the patch embedding then gives contiguous tokens) and `contiguous` (the
  memory loader; the patch embedding then gives transposed tokens);
* `pred[:, 1:]` (the decoder output without the class token's row: a non-contiguous view),
  `pos_embed[:, 1:]` (a view), the masking's contiguous `mask` and `ids_restore`;
* micro-batch MAE shares `SIZES`: the finalize kernel's block and the positional-gradient
  kernel's batch argument depend on it.

`tiny` (the test suite's set): vit-b16 in both dtypes and both layouts at one micro-batch size
(102, the default run's MAE share): every kernel at the trainer's dtypes and strides.

Per variant: registers, spills (local memory bytes / 4, as Triton's `CompiledKernel.n_spills`
counts them from the driver), stack, static and dynamic shared memory, from `cuobjdump
-res-usage` on the cubin (cuobjdump ships with Triton's NVIDIA backend) and Triton's metadata.
A compile error is recorded with the case that hit it and the run goes on. `pass`: no error,
no spill, no local memory, at most 255 registers, and shared memory within the architecture's
per-block limit. Compiles go to a fresh Triton cache directory: every variant is compiled.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import subprocess
import tempfile
import time

import torch

from .common import header, table, write_json

# per-block shared memory an architecture offers (opt-in maximum), bytes
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255
LAYOUTS = ("channels_last", "contiguous")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# micro-batch MAE shares: each block size of the finalize kernel (next power of two of
# N x L-blocks) and each specialisation of N (1, a multiple of 16, other) for both presets
SIZES = (1, 2, 3, 5, 6, 11, 16, 22, 43, 64, 102, 103, 256)


def trainer_cases(tiny: bool) -> list[dict]:
    """The launch configurations of a training run on a GPU (see the module docstring)."""
    if tiny:
        return [dict(preset="vit-b16", in_chans=3, dtype=dt, layout=layout, n=102)
                for dt in DTYPES for layout in LAYOUTS]
    out = []
    for preset, chans in (("vit-b16", (3,)), ("cpu-tiny", (1, 3))):
        for c in chans:
            for dt in DTYPES:
                for layout in LAYOUTS:
                    for n in SIZES:
                        out.append(dict(preset=preset, in_chans=c, dtype=dt, layout=layout, n=n))
    return out


def case_name(c: dict) -> str:
    return f"{c['preset']}/c{c['in_chans']}/{c['dtype']}/{c['layout']}/n{c['n']}"


def launch_case(case: dict, ML, MK) -> None:
    """Call the five launchers as the model's forward and backward do for `case` (buffers only:
    nothing is read, the compile-only `jit` compiles instead of launching)."""
    from dietcl_fast.kernels.reference import num_keep
    from dietcl_fast.models import PRESETS, ModelSpec
    spec = ModelSpec(**PRESETS[case["preset"]]["spec"], in_chans=case["in_chans"]).validate()
    N, C, S, p, D = case["n"], spec.in_chans, spec.img_size, spec.patch_size, spec.embed_dim
    L, P = spec.num_patches, p * p * C
    K = num_keep(L, spec.mask_ratio)
    dt = DTYPES[case["dtype"]]
    imgs = torch.empty(N, C, S, S)
    if case["layout"] == "channels_last":
        imgs = imgs.contiguous(memory_format=torch.channels_last)
        x = torch.empty(N, L, D, dtype=dt)                      # conv on NHWC: contiguous tokens
    else:
        x = torch.empty(N, D, L, dtype=dt).transpose(1, 2)      # conv(NCHW).flatten(2).transpose(1, 2)
    pos = torch.empty(1, L + 1, D)[:, 1:, :]                    # encoder pos_embed[:, 1:, :]
    ids = torch.empty(N, L, dtype=torch.int64)                  # argsort(noise): contiguous
    vis, mask, restore = MK._masking_triton(x, pos, ids, K)
    MK._launch_bwd_x(vis, ids, L, dt)                           # grad of x_visible: out's dtype
    MK._launch_bwd_pos(vis, restore, L, pos.dtype)
    pred = torch.empty(N, L + 1, P, dtype=dt)[:, 1:]            # decoder output minus the cls row
    _, denom, _ = ML._launch_fwd(imgs, pred, mask, p, spec.norm_pix_loss)
    ML._launch_bwd(imgs, pred, mask, denom, torch.empty(()), p, spec.norm_pix_loss)


class _TargetOnly:
    """Triton's active driver, standing in for the CUDA one: it names the target and nothing
    else (no device, no stream). One Triton kernel cache per architecture (the device id)."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def compile_only(record):
    """Inside: `_dispatch.jit(fn)[grid](*args, **kw)` compiles fn for the stand-in driver's
    target and calls `record(kernel_name, compiled_kernel_or_exception, seconds)`."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from dietcl_fast.kernels import _dispatch

    fns: dict = {}

    def jit(fn):
        if fn not in fns:
            fns[fn] = JITFunction(fn)
        jf = fns[fn]

        class Launch:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    t0 = time.perf_counter()
                    try:
                        k = jf.warmup(*args, grid=grid, **kwargs)
                    except Exception as e:          # recorded; the other variants still compile
                        k = e
                    record(fn.__name__, k, time.perf_counter() - t0)
                return launch
        return Launch()

    # the active driver as it was (None: not yet created; reading `driver.active` would create
    # it, which fails where no GPU is)
    saved_jit, saved_driver = _dispatch.jit, driver._active
    stand_in = _TargetOnly(90)
    driver.set_active(stand_in)
    _dispatch.jit = jit
    try:
        yield stand_in
    finally:
        _dispatch.jit = saved_jit
        driver._active = saved_driver


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict:
    """registers, stack, static shared and local bytes of the one function in `cubin`
    (`cuobjdump -res-usage`, the binary Triton's NVIDIA backend ships)."""
    import triton
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.isfile(exe):
        raise RuntimeError(f"bench kernels --compile-only: {exe} is missing from this triton "
                           f"{triton.__version__} install (it reads registers and spills)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run([exe, "-res-usage", f.name], capture_output=True, text=True, timeout=60)
    m = _RES.search(r.stdout)
    if r.returncode != 0 or m is None:
        raise RuntimeError(f"cuobjdump -res-usage failed ({r.returncode}): {r.stdout[-300:]}"
                           f"{r.stderr[-300:]}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack_bytes": stack, "shared_static_bytes": shared,
            "local_bytes": local, "spills": local // 4}


def _describe(k) -> dict:
    """Argument types, constexprs and specialisations of compiled kernel `k`, by name."""
    src = k.src
    names = list(src.signature)
    consts = {}
    for path, v in getattr(src, "constants", {}).items():
        i = path[0] if isinstance(path, tuple) else path
        consts[names[i] if isinstance(i, int) else str(i)] = v
    attrs = {}
    for path, v in (getattr(src, "attrs", None) or {}).items():
        i = path[0] if isinstance(path, tuple) else path
        if v:
            attrs[names[i] if isinstance(i, int) else str(i)] = \
                ",".join(f"{a}={b}" for a, b in v)
    return {"signature": {n: t for n, t in src.signature.items() if t != "constexpr"},
            "constexprs": {n: (v if isinstance(v, (int, float, bool, str)) else str(v))
                           for n, v in consts.items()},
            "specialization": attrs}


def compile_variants(archs, tiny: bool, echo=print) -> dict:
    """Compile every variant of `trainer_cases(tiny)` for each arch -> the result document
    (without the header)."""
    import triton
    from triton.backends import backends
    if "nvidia" not in backends:
        raise ValueError(f"bench kernels --compile-only: triton {triton.__version__} has no "
                         "NVIDIA backend")
    ML = importlib.import_module("dietcl_fast.kernels.mae_loss")
    MK = importlib.import_module("dietcl_fast.kernels.masking")
    cases = trainer_cases(tiny)
    variants: dict = {}
    failures: list = []
    where = {}
    t_all = time.perf_counter()

    def record(name, k, seconds):
        arch, case = where["arch"], where["case"]
        if isinstance(k, Exception):
            failures.append({"kernel": name, "arch": arch, "case": case,
                             "error": f"{type(k).__name__}: {k}"[:2000]})
            echo(f"FAILED sm_{arch} {name} ({case}): {type(k).__name__}: {str(k)[:300]}")
            return
        key = (arch, k.metadata.hash)
        v = variants.get(key)
        if v is None:
            v = variants[key] = {"kernel": name, "arch": arch, "hash": k.metadata.hash,
                                 **_describe(k), "num_warps": k.metadata.num_warps,
                                 "num_stages": k.metadata.num_stages,
                                 "shared_dynamic_bytes": k.metadata.shared,
                                 **resource_usage(k.asm["cubin"]),
                                 "compile_seconds": seconds, "cases": []}
        if case not in v["cases"]:
            v["cases"].append(case)

    with tempfile.TemporaryDirectory(prefix="dietcl-triton-cache-") as cache:
        old_cache = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = cache          # a fresh cache: every variant compiles
        try:
            with compile_only(record) as stand_in:
                for arch in archs:
                    stand_in.arch = arch
                    t0 = time.perf_counter()
                    n0 = len(variants)
                    for c in cases:
                        where.update(arch=arch, case=case_name(c))
                        launch_case(c, ML, MK)
                    echo(f"sm_{arch}: {len(variants) - n0} variants from {len(cases)} launch "
                         f"configurations in {time.perf_counter() - t0:.1f} s")
        finally:
            if old_cache is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = old_cache
    rows = sorted(variants.values(), key=lambda v: (-v["arch"], v["kernel"], v["hash"]))
    problems = list(failures)
    for v in rows:
        limit = SHARED_LIMIT.get(v["arch"], 48 * 1024)
        shared = v["shared_static_bytes"] + v["shared_dynamic_bytes"]
        why = [w for w, bad in (("spills", v["spills"] > 0 or v["local_bytes"] > 0),
                                (f"registers > {MAX_REGISTERS}", v["registers"] > MAX_REGISTERS),
                                (f"shared {shared} > {limit}", shared > limit)) if bad]
        v["pass"] = not why
        if why:
            problems.append({"kernel": v["kernel"], "arch": v["arch"], "hash": v["hash"],
                             "error": "; ".join(why)})
    per_kernel = {}
    for v in rows:
        s = per_kernel.setdefault((v["arch"], v["kernel"]), {"arch": v["arch"], "kernel": v["kernel"],
                                                             "variants": 0, "max_registers": 0,
                                                             "spills": 0, "max_shared_bytes": 0})
        s["variants"] += 1
        s["max_registers"] = max(s["max_registers"], v["registers"])
        s["spills"] += v["spills"]
        s["max_shared_bytes"] = max(s["max_shared_bytes"],
                                    v["shared_static_bytes"] + v["shared_dynamic_bytes"])
    return {"triton": triton.__version__, "archs": list(archs), "tiny": tiny,
            "cases": [case_name(c) for c in cases], "variants": rows,
            "per_kernel": list(per_kernel.values()), "failures": failures, "problems": problems,
            "summary": {"variants": len(rows), "failures": len(failures),
                        "max_registers": max((v["registers"] for v in rows), default=None),
                        "spills": sum(v["spills"] for v in rows),
                        "max_shared_bytes": max((v["shared_static_bytes"]
                                                 + v["shared_dynamic_bytes"] for v in rows),
                                                default=None),
                        "seconds": time.perf_counter() - t_all},
            "pass": not problems and bool(rows)}


def bench_compile_only(archs=(90,), tiny: bool = False, out: str | None = None,
                       echo=print) -> dict:
    archs = tuple(int(a) for a in archs)
    bad = [a for a in archs if a < 70 or a >= 100]
    if bad or not archs:
        raise ValueError(f"--arch {','.join(map(str, archs)) or '(none)'}: give CUDA compute "
                         "capabilities as numbers such as 90 (H100/H200) or 80 (A100), 70..99")
    res = {**header("kernels-compile", torch.device("cpu")), **compile_variants(archs, tiny, echo)}
    echo(table(res["per_kernel"], [("arch", "sm"), ("kernel", "kernel"), ("variants", "variants"),
                                   ("max_registers", "max registers"), ("spills", "spills"),
                                   ("max_shared_bytes", "max shared B")]))
    s = res["summary"]
    echo(f"triton {res['triton']}: {s['variants']} variants for sm_{', sm_'.join(map(str, archs))}"
         f" in {s['seconds']:.1f} s; max {s['max_registers']} registers, {s['spills']} spills, "
         f"{s['failures']} failures: {'PASS' if res['pass'] else 'FAIL'}")
    for p in res["problems"]:
        echo(f"  problem: sm_{p['arch']} {p['kernel']}: {p['error'][:300]}")
    write_json(out, res)
    if out:
        echo(f"wrote {out}")
    if not res["pass"]:
        raise SystemExit(1)
    return res
