"""The paper's regime: how a time step's phases use each pool of images (draws and passes,
logged and in results.json), and MAE encoders shipped in the package by name."""
import hashlib
import os

import pytest
import torch

from dietcl_fast.methods.base import Phase, describe_passes, pool_passes


def test_pool_passes_counts_every_iteration_of_every_phase():
    G = 64
    joint = Phase("joint", 10, {"unlabeled": 0.4, "labeled": 0.3, "buffer": 0.3})
    buf = Phase("buffer", 3, {"buffer": 1.0})
    # a phase whose mix changes per iteration (DualNet's variable sampling) is summed per iteration
    var = Phase("var", 4, {"labeled": 1.0},
                mix_fn=lambda it: {"labeled": 1.0} if it % 2 else {"labeled": 0.5, "buffer": 0.5})
    counts = lambda ph, it: ph.counts(G, it)     # noqa: E731
    p = pool_passes([joint, buf, var], counts, {"unlabeled": 1000, "labeled": 80, "buffer": 0})
    c = joint.counts(G)
    assert sum(c.values()) == G
    assert p["unlabeled"] == {"pool": 1000, "draws": 10 * c["unlabeled"],
                              "passes": 10 * c["unlabeled"] / 1000}
    assert p["labeled"]["draws"] == 10 * c["labeled"] + 2 * 64 + 2 * 32
    assert p["labeled"]["passes"] == pytest.approx(p["labeled"]["draws"] / 80)
    assert p["buffer"]["draws"] == 10 * c["buffer"] + 3 * 64 + 2 * 32
    assert p["buffer"]["passes"] is None                # an empty pool has no passes
    line = describe_passes(p)
    assert line.startswith(f"unlabeled {10 * c['unlabeled']:,} draws of 1,000 (")
    assert "buffer" in line and "empty pool" in line
