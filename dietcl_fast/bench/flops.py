"""`bench flops`: the achieved FLOP rate of the preset's training passes against the dense
matmul peak measured in the same run (ratio = MFU), with the ledger's exact per-image FLOPs
checked against FlopCounterMode on a meta-device copy of the model first.

Passes (per image, ledger convention: attention as plain matmuls, backward = 2x forward):
`classify` (ViT forward+backward with the head) and `mae` (masked encoder + decoder +
reconstruction loss, forward+backward), each timed at --batch images with the preset's
precision (bf16 autocast on a GPU, fp32 on the CPU)."""
from __future__ import annotations

import statistics
import time

import torch

from dietcl_fast.mfu import matmul_peak, sync

from .common import header, pick_device, table, write_json


def _counted(model, fn, n: int, device) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn(model, n, device).backward()
    return fc.get_total_flops() // n


def bench_flops(preset: str = "cpu-tiny", batch: int | None = None, classes: int = 100,
                device: str = "auto", seconds: float = 3.0, tiny: bool = False,
                out: str | None = None, echo=print) -> dict:
    from dietcl_fast.ledger import flops_per_image
    from dietcl_fast.models import PRESETS, ModelSpec, build_model, set_fused_attention

    dev = pick_device(device)
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    batch = batch or (64 if dev.type == "cpu" else 256)
    if tiny:
        batch, seconds = min(batch, 16), min(seconds, 0.5)
    if batch < 1 or classes < 1:
        raise ValueError("bench flops: --batch and --classes must be >= 1")
    spec = ModelSpec(**PRESETS[preset]["spec"], in_chans=3).validate()
    ledger = flops_per_image(spec, classes)
    S = spec.img_size

    def classify(m, n, d):
        return m.classify(torch.randn(n, 3, S, S, device=d)).float().square().mean()

    def mae(m, n, d):
        return m.forward_mae(torch.randn(n, 3, S, S, device=d))[0]

    torch.manual_seed(0)
    counter = build_model(spec, classes).to(dev)     # 2 images, plain attention: the convention
    set_fused_attention(counter, False)
    counted = {"classify": _counted(counter, classify, 2, dev), "mae": _counted(counter, mae, 2, dev)}
    del counter
    exact = {"classify": counted["classify"] == ledger["classify_fwd_bwd"],
             "mae": counted["mae"] == ledger["mae_fwd_bwd"]}
    peak = matmul_peak(dev, tiny=tiny)
    torch.manual_seed(0)
    model = build_model(spec, classes).to(dev)
    ac = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    rows = []
    for name, fn in (("classify", classify), ("mae", mae)):
        def step():
            with ac:
                loss = fn(model, batch, dev)
            loss.backward()
        step()
        sync(dev)
        ts, t_end = [], time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(ts) < 3:
            t0 = time.perf_counter()
            step()
            sync(dev)
            ts.append(time.perf_counter() - t0)
        s = statistics.median(ts)
        f = ledger[f"{name}_fwd_bwd"] * batch
        rows.append({"pass": name, "batch": batch, "seconds": s, "flops": f,
                     "achieved_flops_per_second": f / s,
                     "mfu": f / s / peak["flops_per_second"],
                     "ledger_equals_flopcounter": exact[name]})
    res = {**header("flops", dev), "preset": preset, "classes": classes, "batch": batch,
           "ledger_flops_per_image": ledger, "flopcounter_flops_per_image": counted,
           "ledger_exact": all(exact.values()), "matmul_peak_flops": peak["flops_per_second"],
           "matmul_peak": peak, "passes": rows,
           "mfu": sum(r["flops"] for r in rows) / sum(r["seconds"] for r in rows)
           / peak["flops_per_second"]}
    echo(f"\n{res['device']['name']} | {preset} | batch {batch} | matmul peak "
         f"({peak['dtype']}) {peak['flops_per_second'] / 1e9:.1f} GFLOP/s\n")
    echo(table([{**r, "gf": r["achieved_flops_per_second"] / 1e9} for r in rows],
               [("pass", "pass"), ("seconds", "s / fwd+bwd"), ("gf", "GFLOP/s"),
                ("mfu", "MFU"), ("ledger_equals_flopcounter", "ledger == FlopCounterMode")]))
    write_json(out, res)
    if out:
        echo(f"wrote {out}")
    if not res["ledger_exact"]:
        raise SystemExit("bench flops: the ledger's FLOPs differ from FlopCounterMode: "
                         f"{ledger} vs {counted}")
    return res
