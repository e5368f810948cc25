"""DietCL itself: the phase plan (ratio / threshold / auto splits, step 0 all joint, the 40/30/30
mix and its rounding), the buffer phase's LR scale and schedule, w_r reaching the loss, Lm's
masking in both scenarios against hand-computed values, the model details taken from the
reference (decoder LayerNorm eps, weight decay of mask_token, bicubic evaluation resize), and a
whole time-incremental run through the CLI."""
import json
import math

import pytest
import torch
from torch import nn

from dietcl_fast.config import Config
from dietcl_fast.methods import MicroBatch, build_method, standalone_context
from dietcl_fast.models import cosine_lr
from dietcl_fast.trainer import Trainer

from conftest import tiny_cfg as shared_tiny_cfg


def dietcl(**method):
    cfg = Config()
    for k, v in method.items():
        setattr(cfg.method, k, v)
    return build_method(cfg), cfg


# ---------------------------------------------------------------- phase plan
def test_ratio_split_step0_all_joint_then_80_20():
    m, _ = dietcl(split="ratio:0.8")
    p0 = m.phases(standalone_context(0, 50))
    assert [(p.name, p.steps) for p in p0] == [("joint", 50)]
    assert p0[0].mix == {"unlabeled": 0.4, "labeled": 0.6}          # no buffer at step 0
    p1 = m.phases(standalone_context(1, 50))
    assert [(p.name, p.steps) for p in p1] == [("joint", 40), ("buffer", 10)]
    assert p1[0].mix == pytest.approx({"unlabeled": 0.4, "labeled": 0.3, "buffer": 0.3})
    assert p1[1].mix == {"buffer": 1.0}
    # round(7 x 0.8) = round(5.6) = 6 joint steps, 1 buffer-only
    assert [p.steps for p in m.phases(standalone_context(3, 7))] == [6, 1]
    m1, _ = dietcl(split="ratio:1.0")
    assert [(p.name, p.steps) for p in m1.phases(standalone_context(2, 50))] == [("joint", 50)]


def test_threshold_split():
    m, _ = dietcl(split="threshold:30")
    assert [(p.name, p.steps) for p in m.phases(standalone_context(0, 50))] == [("joint", 50)]   # step 0: all joint
    assert [(p.name, p.steps) for p in m.phases(standalone_context(1, 50))] == [("joint", 30), ("buffer", 20)]
    assert [(p.name, p.steps) for p in m.phases(standalone_context(1, 20))] == [("joint", 20)]   # B <= threshold
    m0, _ = dietcl(split="threshold:0")
    assert [(p.name, p.steps) for p in m0.phases(standalone_context(1, 5))] == [("buffer", 5)]
    for bad in ("ratio:1.5", "threshold:2.5", "threshold:-1", "half", "ratio:x"):
        with pytest.raises(ValueError, match="--split"):
            dietcl(split=bad)


def test_auto_split_needs_the_chosen_threshold_and_keeps_it_in_its_state():
    m, _ = dietcl(split="auto")
    assert [p.steps for p in m.phases(standalone_context(0, 10))] == [10]        # step 0 needs no threshold
    with pytest.raises(RuntimeError, match="split auto"):
        m.phases(standalone_context(1, 10))
    m.set_threshold(7)
    assert [p.steps for p in m.phases(standalone_context(1, 10))] == [7, 3]
    m2, _ = dietcl(split="auto")
    m2.load_state_dict(m.state_dict())
    assert [p.steps for p in m2.phases(standalone_context(1, 10))] == [7, 3]


@pytest.mark.parametrize("G, counts", [
    (64, {"unlabeled": 26, "labeled": 19, "buffer": 19}),        # 25.6 / 19.2 / 19.2
    (1024, {"unlabeled": 410, "labeled": 307, "buffer": 307}),   # 409.6 / 307.2 / 307.2
    (5, {"unlabeled": 1, "labeled": 2, "buffer": 2}),            # 2 + 2 + 2 = 6: first gives one back
    (16, {"unlabeled": 6, "labeled": 5, "buffer": 5}),
])
def test_joint_mix_40_30_30_and_its_rounding(G, counts):
    m, _ = dietcl()
    joint = m.phases(standalone_context(1, 10))[0]
    assert joint.counts(G) == counts
    assert sum(joint.counts(G).values()) == G
    step0 = m.phases(standalone_context(0, 10))[0]
    c0 = step0.counts(G)
    assert sum(c0.values()) == G and set(c0) == {"unlabeled", "labeled"}


# ---------------------------------------------------------------- LR: scale and schedule
def test_cosine_schedule_and_floor_rule():
    assert cosine_lr(1e-3, 1e-5, 0, 10) == pytest.approx(1e-3)            # peak at the start
    assert cosine_lr(1e-3, 1e-5, 5, 10) == pytest.approx((1e-3 + 1e-5) / 2)
    assert cosine_lr(1e-3, 1e-5, 10, 10) == pytest.approx(1e-5)           # floor at the end
    # a peak below min_lr (vit-b16's buffer phase: 4e-5 < 5e-5) decays to peak / 2
    assert cosine_lr(4e-5, 5e-5, 10, 10) == pytest.approx(2e-5)
    assert cosine_lr(4e-5, 5e-5, 0, 10) == pytest.approx(4e-5)


def tiny_cfg(**kw):
    """conftest's tiny run with 4 steps per time step split half and half (`section__field=v`)."""
    return shared_tiny_cfg(budget=4, method__split="ratio:0.5", **kw)


def test_buffer_phase_runs_at_a_tenth_of_the_lr_with_its_own_cosine(tmp_path):
    cfg = tiny_cfg(optim__min_lr=5e-5)          # buffer peak 2.5e-5 < min_lr: floor = peak / 2
    tr = Trainer(cfg, log=lambda m: None)
    seen = []
    set_lr = tr.engine.set_lr
    tr.engine.set_lr = lambda lr: (seen.append((tr.pos.t, tr.pos.phase, tr.pos.it, lr)), set_lr(lr))[1]
    tr.run(str(tmp_path))
    peak = tr.cfg.optim.blr * 16 / 256                     # cpu-tiny blr 4e-3 -> 2.5e-4
    lrs = {(t, p, i): lr for t, p, i, lr in seen}
    assert sorted(lrs) == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3),
                           (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert lrs[(1, 0, 0)] == pytest.approx(peak)
    assert lrs[(1, 0, 1)] == pytest.approx((peak + 5e-5) / 2)       # joint: floor min_lr
    bpeak = 0.1 * peak
    assert lrs[(1, 1, 0)] == pytest.approx(bpeak)                   # buffer phase: 0.1 x LR
    assert lrs[(1, 1, 1)] == pytest.approx((bpeak + bpeak / 2) / 2)  # floor bpeak / 2
    # and the engine's param groups carry it with the layer decay on top
    g = tr.engine.optimizer.param_groups
    assert max(x["lr"] for x in g) == pytest.approx(lrs[(1, 1, 1)])


# ---------------------------------------------------------------- losses
class FixedLogits(nn.Module):
    """A stand-in model: classify() returns fixed logits [n, K] (one trainable row per image),
    forward_mae() a loss that is a known function of a parameter."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float32))
        self.r = nn.Parameter(torch.tensor(2.0))

    def classify(self, x):
        return self.logits[: x.shape[0]]

    def forward_mae(self, x, generator=None):
        return self.r ** 2 * 0.25, None, None          # Lr = 1.0 at r = 2


def mb_for(y, step_classes, num_seen, **x):
    n = len(y)
    xs = {"labeled": torch.zeros(n, 1, 4, 4), **x}
    ys = {"labeled": torch.tensor(y)}
    return MicroBatch(x=xs, y=ys, n_global={k: v.shape[0] for k, v in xs.items()},
                      step_classes=torch.tensor(step_classes), num_seen=num_seen,
                      generator=torch.Generator().manual_seed(0),
                      mask_generator=torch.Generator().manual_seed(0))


def lse(v):
    return math.log(sum(math.exp(a) for a in v))


@pytest.mark.parametrize("scenario", ["class", "time"])
def test_lm_masking_hand_computed(scenario):
    """Logits [1, 2, 0, 3] over 4 seen classes, label 1, step classes {1, 3}, smoothing 0.1."""
    m, cfg = dietcl(mixup=False, label_smoothing=0.1)
    cfg.stream.scenario = scenario
    model = FixedLogits([[1.0, 2.0, 0.0, 3.0]])
    loss, logs = m.loss(model, mb_for([1], [1, 3], 4))
    z = [1.0, 2.0, 0.0, 3.0]
    if scenario == "class":
        # softmax over the step's classes {1, 3}; smoothing over those 2: [0.95, 0.05]
        ls = lse([2.0, 3.0])
        want = -(0.95 * (2.0 - ls) + 0.05 * (3.0 - ls))
    else:
        # log-softmax over all 4 seen classes; smoothing over 4: [.025, .925, .025, .025];
        # the terms of classes 0 and 2 (absent from the step) are zeroed
        ls = lse(z)
        want = -(0.925 * (2.0 - ls) + 0.025 * (3.0 - ls))
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
    assert float(logs["Lm"]) == pytest.approx(want, rel=1e-6)
    loss.backward()
    g = model.logits.grad[0]
    if scenario == "class":
        assert g[0] == 0 and g[2] == 0                 # absent classes: outside the softmax
    else:
        # absent classes stay in the normaliser: d loss / d z_c = p_c * sum(kept targets) > 0
        kept = 0.925 + 0.025
        for c in (0, 2):
            assert float(g[c]) == pytest.approx(math.exp(z[c] - ls) * kept, rel=1e-5)
            assert float(g[c]) > 0


def test_time_lm_with_mixup_matches_direct_formula():
    m, cfg = dietcl(mixup=True)
    cfg.stream.scenario = "time"
    torch.manual_seed(0)
    z = torch.randn(6, 5)
    model = FixedLogits(z.tolist())
    mb = mb_for([0, 2, 2, 0, 2, 0], [0, 2], 5)
    loss, _ = m.loss(model, mb)
    loss = loss.detach()
    # recompute with the same generator state: mixed targets over the 5 seen classes
    _, tgt = m.mix(mb.x["labeled"], mb.y["labeled"], 5, torch.Generator().manual_seed(0))
    keep = torch.tensor([1.0, 0, 1.0, 0, 0])
    want = -(tgt * torch.log_softmax(z, 1) * keep).sum() / 6
    assert float(loss) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("w_r", [1.0, 50.0])
def test_recon_weight_reaches_the_loss(w_r):
    m, cfg = dietcl(mixup=False, recon_weight=w_r)
    model = FixedLogits([[0.0, 0.0]])
    mb = mb_for([0], [0, 1], 2, unlabeled=torch.zeros(3, 1, 4, 4))
    mb.n_global["unlabeled"] = 6                     # half of the global batch's MAE images
    loss, logs = m.loss(model, mb)
    lm = math.log(2.0)                               # uniform logits over 2 classes
    assert float(logs["Lr"]) == pytest.approx(1.0)
    assert float(loss.detach()) == pytest.approx(w_r * 1.0 * 0.5 + lm, rel=1e-6)
    loss.backward()
    assert float(model.r.grad) == pytest.approx(w_r * 0.5 * 2 * 0.25 * 2.0)   # d(w r^2/4 * .5)/dr


# ---------------------------------------------------------------- model details
def test_decoder_layernorm_eps_and_mask_token_weight_decay(tiny_spec):
    from dietcl_fast.models import build_model
    model = build_model(tiny_spec, num_classes=3)
    lns = {n: mod for n, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)}
    assert any(n.startswith("decoder") for n in lns) and any(n.startswith("encoder") for n in lns)
    assert all(mod.eps == 1e-6 for mod in lns.values()), {n: m.eps for n, m in lns.items()}
    groups = model.param_groups_lrd(0.05, 0.65)
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert "mask_token" in decay
    assert "encoder.cls_token" in no_decay and "decoder_embed.bias" in no_decay


def test_eval_resize_is_bicubic_like_the_file_loaders():
    import numpy as np
    from PIL import Image

    from dietcl_fast.data.transforms import eval_resize_crop
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    ours = eval_resize_crop(torch.from_numpy(img).float()[None, None], 28)[0, 0].numpy()
    big = np.asarray(Image.fromarray(img).resize((32, 32), Image.BICUBIC), dtype=np.float32)
    bil = torch.nn.functional.interpolate(torch.from_numpy(img).float()[None, None], size=(32, 32),
                                          mode="bilinear", align_corners=False)[0, 0].numpy()
    pil = big[2:30, 2:30]
    assert np.abs(ours - pil).mean() < 1.0                 # PIL's bicubic, up to rounding
    assert np.abs(bil[2:30, 2:30] - pil).mean() > 2 * np.abs(ours - pil).mean()
    assert ours.min() >= 0 and ours.max() <= 255          # bicubic overshoot clamped


# ---------------------------------------------------------------- vit-b16 from scratch
def test_vit_b16_without_pretrained_warns_and_records_it(tmp_path, monkeypatch):
    from dietcl_fast.models import PRESETS
    # the vit-b16 preset shrunk to test size: the warning depends on the preset, not the shape
    monkeypatch.setitem(PRESETS["vit-b16"], "spec", dict(
        img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
        decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2))
    cfg = tiny_cfg(model__preset="vit-b16", run__budget=1, stream__time_steps=2)
    lines = []
    res = Trainer(cfg, log=lines.append).run(str(tmp_path))
    text = "\n".join(lines)
    assert "WARNING" in text and "MAE ImageNet-1K checkpoint" in text and "--pretrained" in text
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["initialisation"] == "random"
    assert any("RANDOM initialisation" in w for w in on_disk["warnings"])
    assert res["warnings"] == on_disk["warnings"]
    # cpu-tiny (a from-scratch preset by design) is not warned about
    res2 = Trainer(tiny_cfg(run__budget=1), log=lambda m: None).run(str(tmp_path / "tiny"))
    assert res2["warnings"] == [] and res2["initialisation"] == "random"


# ---------------------------------------------------------------- a whole time-incremental run
def test_whole_time_incremental_run_through_the_cli(tmp_path, monkeypatch):
    out = tmp_path / "run"
    from conftest import cli
    p = cli("train", "--scenario", "time", "--time-steps", "3", "--budget", "3", "--batch-size",
            "16", "--micro-batch", "8", "--label-rate", "0.05", "--split", "ratio:0.5",
            "--out", out, "--no-progress")
    res = json.loads((out / "results.json").read_text())
    assert res["scenario"] == "time" and res["method"] == "dietcl"
    assert len(res["A"]) == 3 and all(len(r) == k + 1 for k, r in enumerate(res["accuracy_matrix"]))
    assert all(math.isfinite(a) and 0 <= a <= 100 for r in res["accuracy_matrix"] for a in r)
    assert res["ledger"]["units_per_step"] == [pytest.approx(3.0)] * 3
    # a time stream: classes recur; the step's classes are those with labels at that step
    st = res["stream"]
    assert st["scenario"] == "time" and len(st["step_classes"]) == 3
    assert "time step 2: A(2)" in p.stderr


def test_time_run_uses_the_time_masking(tmp_path, monkeypatch):
    """In a time-incremental run Lm goes through the all-seen-classes branch (the trainer's
    static form), with classes absent from the step among the seen ones at some step."""
    import dietcl_fast.methods.dietcl as dm
    calls = []
    real = dm._static_lm

    def spy(logits, target, step, time_scenario, n_global):
        seen = (target.sum(0) > 0)
        calls.append((time_scenario, int(step.mask.sum()), int(seen.sum()), tuple(target.shape)))
        return real(logits, target, step, time_scenario, n_global)

    monkeypatch.setattr(dm, "_static_lm", spy)
    cfg = tiny_cfg(stream__scenario="time", stream__time_steps=3, run__budget=2)
    Trainer(cfg, log=lambda m: None).run(str(tmp_path))
    assert calls and all(c[0] for c in calls)
    assert all(c[2] >= c[1] for c in calls)            # targets over all seen classes


@pytest.mark.parametrize("scenario", ["class", "time"])
def test_a_hand_made_micro_batch_takes_the_trainers_loss(tiny_spec, scenario):
    """A micro-batch without plans or class sets (with_draws + the seen head rows) gives the
    loss the trainer's form gives (full-capacity head, unseen rows masked) on the same draws."""
    import dataclasses
    from dietcl_fast.methods.base import ClassSet
    from dietcl_fast.models import build_model
    m, cfg = dietcl(mixup=True)
    cfg.stream.scenario = scenario
    torch.manual_seed(0)
    model = build_model(tiny_spec, num_classes=6, head_capacity=8)
    S, L = tiny_spec.img_size, (tiny_spec.img_size // tiny_spec.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    x = {k: torch.randn(n, tiny_spec.in_chans, S, S, generator=g)
         for k, n in (("unlabeled", 5), ("labeled", 4), ("buffer", 3))}
    mb = MicroBatch(x=x, y={"labeled": torch.tensor([2, 3, 3, 2]), "buffer": torch.tensor([0, 5, 1])},
                    n_global={"unlabeled": 10, "labeled": 8, "buffer": 6},
                    step_classes=torch.tensor([2, 3]), num_seen=6,
                    generator=torch.Generator().manual_seed(1),
                    mask_generator=torch.Generator().manual_seed(2))
    planned = m.with_draws(dataclasses.replace(mb, generator=torch.Generator().manual_seed(1)))
    assert set(planned.mix) == {"labeled", "buffer"} and planned.mix["labeled"] is not None
    s = cfg.method.label_smoothing
    full = dataclasses.replace(planned, seen=ClassSet.of(range(6), 8, s, "cpu"),
                               step=ClassSet.of([2, 3], 8, s, "cpu"),
                               noise={"unlabeled": torch.rand(5, L, generator=torch.Generator().manual_seed(2))})
    want, want_logs = m.loss(model, full)
    got, logs = m.loss(model, mb)
    assert set(logs) == set(want_logs) == {"Lr", "Lm", "Lb"}
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    for k in logs:
        assert float(logs[k]) == pytest.approx(float(want_logs[k]), rel=1e-6)
    with pytest.raises(RuntimeError, match="not among the step's classes"):
        mb.y["labeled"] = torch.tensor([2, 3, 4, 2])
        m.loss(model, mb)
