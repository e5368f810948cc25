"""`bench index`: the file index at scale: parse rows/s cold and warm, memory per process, the
files check and the scan in files/s, and what that means at 39M (CLOC) and 9.8M (ImageNet10K)
rows.

* parse: a synthetic index of N rows (fake paths ``cK/I.jpg``, C class names, float
  timestamps) written as CSV and as Parquet; each is read by a fresh process with an empty
  cache (cold: pyarrow parse + checks + the cache written) and again (warm: the cache entry
  checked and memory-mapped). Memory is the process's own (``Anonymous`` in
  /proc/self/smaps_rollup, after minus before: what no other process can share) and its
  file-backed resident pages of the cache (shared by every process that maps the entry).
* files: a folder of M hard links to 16 small JPEGs (``--scan-files``, default
  min(N, 20,000)); a fresh process lists it, checks every file against its record and scans it
  (full decode), twice: the first start scans every file, the second reads them all from the
  record.
* extrapolation: seconds and bytes per row times 39M and 9.8M rows.

Every measurement runs in its own process (memory is per process; the OS page cache stays
warm, as on a second start of a node).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

# no torch at import: the measuring processes import this module, and their memory is the figure

SCALES = {"CLOC (39M)": 39_000_000, "ImageNet10K (9.8M)": 9_800_000}


def _smaps() -> dict:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def _touch(a) -> None:
    """Fault every page of a (memory-mapped) array in, as a run that reads it all would."""
    a = np.asarray(a).reshape(-1).view(np.uint8)
    step = 1 << 24
    for s in range(0, a.size, step):
        int(a[s:s + step].max(initial=0))


def _child(argv: list) -> dict:
    """One measurement in this (fresh) process; -> a JSON-able dict."""
    task = json.loads(argv[0])
    import pyarrow  # noqa: F401  (imported before the baseline: not the index's memory)
    from dietcl_fast.streams import index, load_source
    if task["what"] == "folder":
        from dietcl_fast.data.scan import scan_source       # (imports torch: not timed)
    quiet = lambda m: None     # noqa: E731
    import resource
    before = _smaps()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()

    def cpu():      # user + system seconds of every thread since t0 (load-independent)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime - ru0.ru_utime + ru.ru_stime - ru0.ru_stime
    if task["what"] in ("csv", "parquet"):
        fn = index.index_csv if task["what"] == "csv" else index.index_parquet
        cols = fn(task["path"], log=quiet)
        sec, cpu_s = time.perf_counter() - t0, cpu()
        rows = len(cols.labels)
        for a in (cols.labels, cols.timestamps, cols.paths.off, cols.paths.buf):
            _touch(a)
        after = _smaps()
        return {"seconds": sec, "cpu_seconds": cpu_s, "rows": rows,
                "private_bytes": after.get("Anonymous", 0) - before.get("Anonymous", 0),
                "shared_bytes": (after["Rss"] - after.get("Anonymous", 0))
                - (before["Rss"] - before.get("Anonymous", 0))}
    src = load_source(f"folder:{task['path']}")
    t_check = time.perf_counter() - t0
    res = scan_source(src, "full", on_bad="error", workers=task["workers"], log=quiet)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": cpu(), "check_seconds": t_check,
            "files": len(src),
            "scanned": res.scanned, "cached": res.cached}


def _run_child(task: dict, cache: str) -> dict:
    env = dict(os.environ, DIETCL_CACHE=cache, OMP_NUM_THREADS="1")
    code = ("import atexit, gc, json, sys; atexit.register(gc.freeze); "   # a quick exit (cli/main.py: entry)
            "from dietcl_fast.bench.index import _child; "
            "print('@@' + json.dumps(_child(sys.argv[1:])))")
    p = subprocess.run([sys.executable, "-c", code, json.dumps(task)], env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"bench index: the {task['what']} measurement failed:\n{p.stderr[-3000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("@@")][-1]
    return json.loads(line[2:])


def write_synthetic(work: str, rows: int, classes: int, seed: int = 0) -> dict:
    """index.csv and index.parquet of `rows` fake rows -> their paths."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, classes, rows)
    ls = pa.large_string()
    cname = pc.binary_join_element_wise(pa.scalar("c", ls), pc.utf8_lpad(
        pc.cast(pa.array(cls), ls), width=5, padding="0"), pa.scalar("", ls))
    num = pc.utf8_lpad(pc.cast(pa.array(np.arange(rows)), ls), width=9, padding="0")
    path = pc.binary_join_element_wise(cname, pc.binary_join_element_wise(
        num, pa.scalar(".jpg", ls), pa.scalar("", ls)), pa.scalar("/", ls))
    t = pa.table({"path": path, "label": cname,
                  "timestamp": pa.array(np.sort(rng.uniform(1.5e9, 1.7e9, rows)))})
    out = {"csv": os.path.join(work, "index.csv"), "parquet": os.path.join(work, "index.parquet")}
    pcsv.write_csv(t, out["csv"], pcsv.WriteOptions(quoting_style="none"))
    pq.write_table(t, out["parquet"])
    return out


def make_link_folder(root: str, files: int, classes: int) -> str:
    """root/cK/I.jpg: `files` hard links to 16 small JPEGs (one inode each: cheap to make)."""
    from PIL import Image

    from .common import textured
    src = os.path.join(root, "_src")
    os.makedirs(src, exist_ok=True)
    originals = []
    for k in range(16):
        p = os.path.join(src, f"{k}.jpg")
        Image.fromarray(textured(32, 32, k)).save(p, quality=90)
        originals.append(p)
    data = os.path.join(root, "imgs")
    classes = max(2, min(classes, files // 10))
    for c in range(classes):
        os.makedirs(os.path.join(data, f"c{c:05d}"), exist_ok=True)
    for i in range(files):
        os.link(originals[i % 16], os.path.join(data, f"c{i % classes:05d}", f"{i:09d}.jpg"))
    return data


def bench_index(rows: int = 1_000_000, classes: int = 2000, scan_files: int | None = None,
                workers: int = 2, workdir: str | None = None, keep: bool = False,
                tiny: bool = False, out: str | None = None, echo=print) -> dict:
    import torch

    from .common import header, table, write_json
    if tiny:
        rows, classes, scan_files = 2000, 20, 200
    if rows < 2 or classes < 2 or classes > rows:
        raise ValueError(f"--rows {rows} / --classes {classes}: need 2 <= classes <= rows")
    scan_files = min(rows, 20_000) if scan_files is None else scan_files
    if scan_files < 2:
        raise ValueError(f"--scan-files {scan_files}: need >= 2")
    if workdir:
        os.makedirs(workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench-index-", dir=workdir)
    res = {**header("index", torch.device("cpu")), "rows": rows, "classes": classes,
           "scan_files": scan_files, "workers": workers, "workdir": work}
    try:
        echo(f"bench index: writing {rows:,} synthetic rows ({classes:,} classes) into {work}")
        t0 = time.perf_counter()
        files = write_synthetic(work, rows, classes)
        res["write_seconds"] = time.perf_counter() - t0
        res["loadavg_before"] = os.getloadavg()
        res["csv_bytes"] = os.path.getsize(files["csv"])
        parse = []
        for kind in ("csv", "parquet"):
            cache = os.path.join(work, f"cache-{kind}")
            for phase in ("cold", "warm"):
                r = _run_child({"what": kind, "path": files[kind]}, cache)
                r.update(kind=kind, phase=phase, rows_per_s=rows / max(r["seconds"], 1e-9),
                         private_b_per_row=r["private_bytes"] / rows,
                         shared_b_per_row=r["shared_bytes"] / rows)
                parse.append(r)
                echo(f"  {kind} {phase}: {r['seconds']:.2f} s ({r['rows_per_s']:,.0f} rows/s; "
                     f"{r['cpu_seconds']:.2f} s of CPU), "
                     f"private {r['private_b_per_row']:.1f} B/row, shared {r['shared_b_per_row']:.1f} B/row")
            res[f"{kind}_cache_bytes"] = sum(
                os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(cache) for f in fs)
        res["parse"] = parse
        echo(f"bench index: {scan_files:,} hard links to 16 JPEGs for the files check and scan")
        data = make_link_folder(os.path.join(work, "files"), scan_files, classes)
        cache = os.path.join(work, "cache-files")
        scans = []
        for phase in ("first start", "second start"):
            r = _run_child({"what": "folder", "path": data, "workers": workers}, cache)
            r.update(phase=phase, files_per_s=scan_files / max(r["seconds"], 1e-9),
                     check_files_per_s=scan_files / max(r["check_seconds"], 1e-9))
            scans.append(r)
            echo(f"  {phase}: {r['seconds']:.2f} s for {scan_files:,} files ({r['scanned']:,} "
                 f"scanned, {r['cached']:,} from the record; listing + check {r['check_seconds']:.2f} s)")
        res["files"] = scans
        res["second_start_speedup"] = scans[0]["seconds"] / max(scans[1]["seconds"], 1e-9)
        scan_rate = scan_files / max(scans[0]["seconds"] - scans[0]["check_seconds"], 1e-9)
        res["scan_files_per_s"] = scan_rate
        res["check_files_per_s"] = scans[1]["check_files_per_s"]
        by = {(r["kind"], r["phase"]): r for r in parse}
        ext = []
        for name, n in SCALES.items():
            ext.append({
                "scale": name, "rows": n,
                "csv_cold_s": n / by[("csv", "cold")]["rows_per_s"],
                "csv_warm_s": n / by[("csv", "warm")]["rows_per_s"],
                "parquet_cold_s": n / by[("parquet", "cold")]["rows_per_s"],
                "parquet_warm_s": n / by[("parquet", "warm")]["rows_per_s"],
                "private_mib": n * by[("csv", "warm")]["private_b_per_row"] / 2 ** 20,
                "cache_mib": n * res["csv_cache_bytes"] / rows / 2 ** 20,
                "check_s": n / res["check_files_per_s"],
                "first_scan_h": n / scan_rate / 3600})
        res["extrapolation"] = ext
        res["loadavg_after"] = os.getloadavg()
        echo(table(parse, [("kind", "index"), ("phase", "start"), ("seconds", "s"),
                           ("cpu_seconds", "CPU s"),
                           ("rows_per_s", "rows/s"), ("private_b_per_row", "private B/row"),
                           ("shared_b_per_row", "shared B/row")]))
        echo(f"files: scan {scan_rate:,.0f} files/s (full, {workers} workers), check "
             f"{res['check_files_per_s']:,.0f} files/s; second start {res['second_start_speedup']:.1f}x "
             "sooner")
        echo(table(ext, [("scale", "at"), ("csv_cold_s", "csv cold s"), ("csv_warm_s", "csv warm s"),
                         ("parquet_cold_s", "parquet cold s"), ("private_mib", "private MiB/process"),
                         ("cache_mib", "cache MiB (shared)"), ("check_s", "files check s"),
                         ("first_scan_h", "first scan h")]))
        write_json(out, res)
        return res
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
