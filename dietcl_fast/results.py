"""Results: results.json, curve.png, and the terminal table."""
from __future__ import annotations

import json
import os
import sys

from .fsio import atomic_write_bytes


def versions() -> dict:
    import platform

    import numpy
    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    # timm's version from its distribution, without importing it (~2.6 CPU-s where nothing has
    # imported torch._dynamo; the model does not use it: dietcl_fast/models/vit.py); triton's from
    # the module when the run imported it, else from whichever distribution ships it
    from importlib.metadata import PackageNotFoundError, version

    def installed(*dists):
        for dist in dists:
            try:
                return version(dist)
            except PackageNotFoundError:
                pass
        return None
    triton = sys.modules.get("triton")
    found = {"timm": installed("timm"),
             "triton": getattr(triton, "__version__", None) if triton is not None else installed(
                 "triton", "pytorch-triton", "pytorch-triton-rocm", "triton-windows")}
    out.update({k: v for k, v in found.items() if v is not None})
    from . import __version__
    out["dietcl_fast"] = __version__
    out["cuda"] = torch.version.cuda
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return out


def write_json(path: str, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str) -> dict:
    """A JSON file written by dietcl-fast (results.json, ...); an unreadable, truncated or
    non-JSON file is a ValueError naming it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror or e})") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): truncated or damaged") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def plot_curve(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    acc = results["accuracy_matrix"]
    T = len(acc)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    ax.plot(range(1, T + 1), results["A"], "o-", lw=2, label="A(t), own classifier")
    knn = results.get("readouts", {}).get("knn")
    if knn:                         # the common readout; rows before an old resume are None
        ax.plot(range(1, T + 1), [float("nan") if a is None else a for a in knn["A"]], "s--",
                lw=1.3, label=f"A(t), {knn['k']}-NN readout")
    ax.set_xlabel("time step t")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{results['method']} on {results['dataset']} ({results['scenario']}), "
                 f"Ā={results['average_accuracy']:.1f}")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1]
    for k in range(T):
        ys = [acc[t][k] for t in range(k, T)]
        ax.plot(range(k + 1, T + 1), ys, ".-", label=f"step {k}")
    ax.set_xlabel("after time step t")
    ax.set_ylabel("accuracy on step k (%)")
    ax.set_title("per-step accuracy acc[t][k]")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if T <= 10:
        ax.legend(fontsize=7)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # fixed margins for this 10 x 4 in figure: tight_layout measures every text of both axes
    # before the figure is drawn, 40 % of a plot's time, at the end of every run
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.12, top=0.91, wspace=0.2)
    save_figure(fig, path)


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Save a matplotlib figure to `path` atomically (a temporary file in the same directory,
    renamed over the target: a kill mid-write leaves the previous plot) and close it."""
    import matplotlib.pyplot as plt
    d, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(d, f".tmp-{name}")
    try:
        fig.savefig(tmp, dpi=dpi, format=os.path.splitext(name)[1][1:] or "png")
    finally:
        plt.close(fig)
    os.replace(tmp, path)


def table(results: dict) -> str:
    acc = results["accuracy_matrix"]
    T = len(acc)
    head = "after t | " + " ".join(f"k={k:<5d}" for k in range(T)) + " |  A(t)"
    lines = [head, "-" * len(head)]
    for t in range(T):
        cells = " ".join(f"{acc[t][k]:6.1f}" if k <= t else "     ." for k in range(T))
        lines.append(f"{t:7d} | {cells} | {results['A'][t]:5.1f}")
    f = results["forgetting"]
    lines.append(f"A(T) = {results['final_accuracy']:.2f}%   Ā = {results['average_accuracy']:.2f}%   "
                 f"forgetting = {'n/a' if f is None else f'{f:.2f}'}   "
                 f"budget = {results['budget']} steps/step, FLOPs = {results['ledger']['flops_total']:.3e}")
    knn = results.get("readouts", {}).get("knn")
    if knn:
        lines.append(readout_line(knn))
    return "\n".join(lines)


def readout_line(knn: dict) -> str:
    """One line for the common kNN readout of a run (results.json readouts.knn)."""
    def pct(v):
        return "n/a" if v is None else f"{v:.2f}%"
    A = " ".join("    ." if a is None else f"{a:5.1f}" for a in knn["A"])
    return (f"{knn['k']}-NN readout (encoder features, every label seen so far): A(t) = [{A}]   "
            f"A(T) = {pct(knn['final_accuracy'])}   Ā = {pct(knn['average_accuracy'])}   "
            f"({knn['seconds']:.1f} s, not charged)")


def progress_bar(**kw):
    """A tqdm bar for long work. On a terminal it redraws in place; when stderr is a file or
    a pipe (a job's log) it writes at most one line every 30 s, so a log holds a readable
    trace instead of thousands of carriage-return updates. Set descriptions and postfixes with
    `refresh=False`: the next update draws them, within the interval."""
    import sys

    from tqdm import tqdm
    return tqdm(dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0, **kw)
