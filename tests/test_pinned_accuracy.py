"""Behaviour pin: short runs of every method give the accuracy matrices and FLOP totals
recorded at commit 597d180 (before the one-source-of-truth refactor).

A refactor that moves code around must not move these numbers. Accuracies are compared to
within one evaluation image per entry (100 / images evaluated in that step), so a CPU with
other SIMD paths flipping a single borderline prediction does not fail CI; the ledger's FLOP
totals come from the analytic model and must match exactly. To re-pin after a change that is
*meant* to alter results, run ``python tests/test_pinned_accuracy.py`` and say why in the
commit message.
"""
import json
import sys

import pytest
import torch

from dietcl_fast.config import Config
from dietcl_fast.methods import METHODS
from dietcl_fast.trainer import Trainer


def pin_cfg(method: str, scenario: str = "class") -> Config:
    cfg = Config()
    cfg.method.name = method
    cfg.stream.scenario = scenario
    cfg.stream.time_steps = 2
    cfg.stream.label_rate = 0.05
    cfg.run.budget = 15
    cfg.run.batch_size = 16
    cfg.engine.micro_batch = 8
    cfg.run.progress = False
    cfg.run.seed = 1
    return cfg


CASES = [(m, "class") for m in sorted(METHODS)] + [("dietcl", "time"), ("er", "time")]


def run_case(method, scenario, out):
    # one intra-op thread, as when the pins were recorded: a different thread count changes
    # float summation order and, over a run, can flip predictions (same code, same seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = Trainer(pin_cfg(method, scenario), log=lambda m: None).run(str(out))
    finally:
        torch.set_num_threads(threads)
    evals = [s["eval"] for s in res["stream"]["steps"]]
    return {"accuracy_matrix": res["accuracy_matrix"], "flops_total": res["ledger"]["flops_total"],
            "eval": evals}


# fmt: off
PINNED = {
    "cassle/class": {"accuracy_matrix": [[20.3], [20.2, 0.0]], "flops_total": 16757161984,
        "eval": [1000, 1000]},
    "ccic/class": {"accuracy_matrix": [[40.8], [32.0, 28.7]], "flops_total": 15520243712,
        "eval": [1000, 1000]},
    "dietcl/class": {"accuracy_matrix": [[20.3], [19.5, 0.0]], "flops_total": 13217101824,
        "eval": [1000, 1000]},
    "dualnet/class": {"accuracy_matrix": [[19.6], [18.7, 0.0]], "flops_total": 17575016448,
        "eval": [1000, 1000]},
    "er/class": {"accuracy_matrix": [[20.1], [20.6, 0.3]], "flops_total": 17018757120,
        "eval": [1000, 1000]},
    "ewc/class": {"accuracy_matrix": [[19.8], [17.6, 18.5]], "flops_total": 16451019776,
        "eval": [1000, 1000]},
    "finetune/class": {"accuracy_matrix": [[19.8], [14.9, 19.5]], "flops_total": 17018296320,
        "eval": [1000, 1000]},
    "gdumb/class": {"accuracy_matrix": [[19.8], [22.0, 0.4]], "flops_total": 17018296320,
        "eval": [1000, 1000]},
    "joint/class": {"accuracy_matrix": [[19.9], [18.3, 0.1]], "flops_total": 8007426048,
        "eval": [1000, 1000]},
    "l2p/class": {"accuracy_matrix": [[19.3], [17.5, 0.7]], "flops_total": 19151525888,
        "eval": [1000, 1000]},
    "mas/class": {"accuracy_matrix": [[19.8], [17.6, 18.5]], "flops_total": 16451019776,
        "eval": [1000, 1000]},
    "pretrain_ft/class": {"accuracy_matrix": [[19.9], [13.3, 12.1]], "flops_total": 8007426048,
        "eval": [1000, 1000]},
    "dietcl/time": {"accuracy_matrix": [[23.1], [22.3, 1.5]], "flops_total": 13217101824,
        "eval": [1000, 1000]},
    "er/time": {"accuracy_matrix": [[22.1], [24.9, 1.7]], "flops_total": 17018757120,
        "eval": [1000, 1000]},
}
# fmt: on


@pytest.mark.parametrize("method,scenario", CASES)
def test_accuracy_matrix_is_pinned(tmp_path, method, scenario):
    key = f"{method}/{scenario}"
    assert key in PINNED, f"no pin for {key}: run `python {__file__}` to record it"
    want = PINNED[key]
    got = run_case(method, scenario, tmp_path)
    assert got["eval"] == want["eval"]
    assert got["flops_total"] == want["flops_total"]
    for t, (row_got, row_want) in enumerate(zip(got["accuracy_matrix"], want["accuracy_matrix"])):
        assert len(row_got) == len(row_want)
        for j, (a, b) in enumerate(zip(row_got, row_want)):
            one_image = 100.0 / want["eval"][j]
            assert abs(a - b) <= one_image + 1e-9, (key, t, j, a, b)


if __name__ == "__main__":      # re-pin: prints the PINNED dict to paste above
    import tempfile
    pins = {}
    for m, s in CASES:
        with tempfile.TemporaryDirectory() as d:
            pins[f"{m}/{s}"] = run_case(m, s, d)
            print(m, s, pins[f"{m}/{s}"]["accuracy_matrix"], file=sys.stderr)
    print(json.dumps(pins, indent=1))
