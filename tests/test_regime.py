"""The paper's regime: how a time step's phases use each pool of images (draws and passes,
logged and in results.json), and MAE encoders shipped in the package by name."""
import hashlib
import os

import pytest
import torch

from conftest import cli
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


def test_a_shipped_encoder_is_checked_before_it_is_read(tmp_path, monkeypatch):
    """A shipped encoder is found by name; its file must have the SHA-256 the package lists
    (a damaged or replaced file is refused naming it); a name that is not shipped and not a
    file is refused by the config check, which names the shipped ones."""
    from dietcl_fast import pretrained as shipped
    from dietcl_fast.config import Config, ConfigError, validate
    from dietcl_fast.models import PretrainedMismatch, load_mae_checkpoint
    from dietcl_fast.models.pretrained import resolve_pretrained

    f = tmp_path / "enc.pth"
    torch.save({"model": {"w": torch.zeros(2)}}, f)
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    monkeypatch.setattr(shipped, "HERE", tmp_path)
    monkeypatch.setitem(shipped.SHIPPED, "test-enc",
                        shipped.Shipped("enc.pth", digest, "cpu-tiny", 3, "a test"))
    assert resolve_pretrained("test-enc") == str(f)
    assert resolve_pretrained(str(f)) == str(f)            # a path is a path
    cfg = Config()
    cfg.model.pretrained = "test-enc"
    validate(cfg)
    cfg.model.pretrained = "no-such-encoder"
    with pytest.raises(ConfigError, match="no-such-encoder.*test-enc"):
        validate(cfg)
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 1                                 # one bit flipped
    f.write_bytes(bytes(b))
    with pytest.raises(PretrainedMismatch, match=f"{f}.*SHA-256"):
        load_mae_checkpoint(None, "test-enc")
    f.unlink()
    with pytest.raises(PretrainedMismatch, match="missing"):
        resolve_pretrained("test-enc")


def test_a_checkpoint_with_non_finite_weights_is_refused_at_load(tmp_path, tiny_spec):
    from dietcl_fast.models import PretrainedMismatch, build_model, load_mae_checkpoint
    from dietcl_fast.pretrain import mae_state_dict
    m = build_model(tiny_spec)
    sd = mae_state_dict(m)
    name = next(k for k in sd if k.startswith("blocks."))
    sd[name] = sd[name].clone()
    sd[name].view(-1)[0] = float("nan")
    torch.save({"model": sd}, tmp_path / "c.pth")
    with pytest.raises(PretrainedMismatch, match=f"non-finite.*{name}"):
        load_mae_checkpoint(build_model(tiny_spec), str(tmp_path / "c.pth"))


def test_dietcl_ablations_change_the_joint_batch_as_the_paper_ablates():
    """--unlabeled-fraction 0: no Lr (current labels and buffer, half each); --no-joint-buffer:
    no Lb in the joint phase (the buffer-only phase stays); 1 is refused before compute."""
    from dietcl_fast.config import Config, ConfigError, validate
    from dietcl_fast.methods import StepContext, build_method

    def phases(**opts):
        cfg = Config()
        for k, v in opts.items():
            setattr(cfg.method, k, v)
        validate(cfg)
        m = build_method(cfg)
        ctx = StepContext(t=1, budget=10, seed=0, time_steps=2, global_batch=64, granule=1,
                          accum=1, units_for=None, stream=None, model=None, spec=None,
                          num_classes=4, eval_map=None)
        return [(p.name, p.steps, p.counts(64)) for p in m.phases(ctx)]

    assert phases() == [("joint", 8, {"unlabeled": 26, "labeled": 19, "buffer": 19}),
                        ("buffer", 2, {"buffer": 64})]
    assert phases(unlabeled_fraction=0.0) == [("joint", 8, {"labeled": 32, "buffer": 32}),
                                              ("buffer", 2, {"buffer": 64})]
    assert phases(joint_buffer=False) == [("joint", 8, {"unlabeled": 26, "labeled": 38}),
                                          ("buffer", 2, {"buffer": 64})]
    with pytest.raises(ConfigError, match="unlabeled-fraction"):
        phases(unlabeled_fraction=1.0)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(name):
    import importlib
    return importlib.import_module(f"dietcl_fast.bench.{name}")


def _csv(path, rows):
    import csv
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cols = ["method", "seed", "A_T", "A_bar", "knn_A_T", "knn_A_bar", "status"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(dict(zip(cols, r)))


def test_paper_table_summary_ranks_and_margins_by_standard_error(tmp_path):
    pt = _bench("paper_table")
    rows = [("dietcl", s, a, 30, 40, 41, "ok") for s, a in enumerate((20.0, 22.0, 24.0))]
    rows += [("er", s, a, 25, 45, 46, "ok") for s, a in enumerate((17.0, 18.0, 19.0))]
    rows += [("joint", 0, 60.0, "", 50, "", "ok"), ("ewc", 0, "", "", "", "", "failed: x")]
    (tmp_path / "main-class" / "s0").mkdir(parents=True)     # a seed's compare per directory
    _csv(tmp_path / "main-class" / "s0" / "compare.csv", rows[:2] + rows[3:])
    (tmp_path / "main-class" / "s2").mkdir()
    _csv(tmp_path / "main-class" / "s2" / "compare.csv", rows[2:3])
    text = pt.summary(str(tmp_path), ["main"], tiny=False)
    # DietCL 22 ± 2 (SE 1.155), ER 18 ± 1 (SE 0.577): +4.00 = 3.1 combined SE (1.291)
    assert "| **dietcl** | 22.00 ± 2.00 | 30.00 ± 0.00 | 40.00 ± 0.00 | 41.00 ± 0.00 | 3 |" in text
    assert "DietCL by A(T) own: rank 1/2; vs best other (er) +4.00 (+3.1 SE)" in text
    assert "DietCL by A(T) 3-NN: rank 2/2; vs best other (er) -5.00 (no spread over seeds)" in text
    assert "joint (upper bound)" in text and "ewc" not in text     # failed runs are not means
    assert "## Table 1: time-incremental" in text                 # absent part: an empty table


def test_paper_table_runs_a_part_through_the_real_compare(tmp_path):
    """One real part at the tiny size: `dietcl-fast compare` processes, table.md (~30 s idle:
    two tiny runs of a 6-class glyphs stream, each a process of its own)."""
    out = tmp_path / "pt"
    cli("bench", "paper-table", "--tiny", "--out", out, "--parts", "length,ablation", "--cells",
        "length-3", "--seeds", "0", cwd=ROOT)
    table = (out / "table.md").read_text()
    assert "## Stream length at equal total compute (class)" in table
    assert "| dietcl |" in table and "| er |" in table
    assert (out / "length-3" / "s0" / "compare.csv").exists()
    assert not (out / "ablation-no-Lr").exists()            # a cell --cells left out
    assert "## Table 2: DietCL ablation (class)" in table    # the summary covers every part
    for bad, says in ((["--parts", "nonsense"], "unknown part 'nonsense'"),
                      (["--seeds", "0,x"], "--seeds '0,x'"), (["--seeds", "-1"], "none negative"),
                      (["--parts", "length", "--cells", "main-class"], "the cells of --parts")):
        p = cli("bench", "paper-table", "--out", out, *bad, check=False, cwd=ROOT)
        assert p.returncode != 0 and says in p.stderr, (bad, p.stderr)


def test_the_shipped_glyphs_encoder_loads_strictly_into_cpu_tiny():
    """glyphs-mae-tiny: its file has the listed SHA-256, and every tensor of the cpu-tiny RGB
    model but the head comes from it (weights only, strict names and shapes, finite)."""
    from dietcl_fast.models import PRESETS, ModelSpec, build_model, load_mae_checkpoint
    from dietcl_fast.pretrained import SHIPPED, shipped_file
    s = SHIPPED["glyphs-mae-tiny"]
    assert hashlib.sha256(open(shipped_file("glyphs-mae-tiny"), "rb").read()).hexdigest() == s.sha256
    spec = ModelSpec(**PRESETS[s.preset]["spec"], in_chans=s.in_chans).validate()
    m = build_model(spec, num_classes=5)
    rep = load_mae_checkpoint(m, "glyphs-mae-tiny")
    assert rep.ok and rep.path == "glyphs-mae-tiny"
    assert set(rep.fresh) == {k for k in m.state_dict() if k.startswith("head.")}
    assert len(rep.loaded) == len(m.state_dict()) - len(rep.fresh)
    with torch.no_grad():
        assert torch.isfinite(m.classify(torch.zeros(2, 3, spec.img_size, spec.img_size))).all()


def test_pretrain_glyphs_script_pretrains_probes_and_plots_at_the_tiny_size(tmp_path):
    """dietcl-fast bench pretrain-glyphs as it is run to rebuild the shipped encoder, at its
    tiny size (3 MAE steps on 8 pretraining classes, then the 3-NN and linear probes of the
    random and the pretrained encoder on 4 held-out classes)."""
    import json
    out = tmp_path / "pt"
    cli("bench", "pretrain-glyphs", "--tiny", "--out", out, cwd=ROOT)
    probe = json.loads((out / "probe.json").read_text())
    assert probe["pretraining"]["budget"] == 3 and probe["probe_data"].startswith("glyphs:classes=4,")
    for enc in ("random", "pretrained"):
        assert 0.0 <= probe[enc]["knn3"] <= 100.0 and 0.0 <= probe[enc]["linear"] <= 100.0
    assert (out / "checkpoint.pth").is_file()
    p = cli("bench", "pretrain-glyphs", "--out", out, "--budget", "0", check=False, cwd=ROOT)
    assert p.returncode != 0 and "--budget 0: must be >= 1" in p.stderr


def test_grad_ratio_script_measures_both_gradients_at_the_tiny_size(tmp_path):
    """dietcl-fast bench grad-ratio at its tiny size (one tiny batch an encoder)."""
    import json
    p = cli("bench", "grad-ratio", "--tiny", "random", "glyphs-mae-tiny", "--out",
            tmp_path / "g.json", cwd=ROOT)
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert [r["encoder"] for r in rows] == ["random", "glyphs-mae-tiny"]
    assert all(r["ratio_mean"] > 0 and r["Lr"] > 0 and r["Lm"] > 0 for r in rows)
    assert "||grad 50*Lr|| / ||grad Lm||" in p.stdout
    p = cli("bench", "grad-ratio", "random", "--recon-weight", "0", check=False, cwd=ROOT)
    assert p.returncode == 2 and "--recon-weight > 0" in p.stderr
