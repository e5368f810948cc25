"""The baselines as their papers and reference code define them: ER's replay from past steps
only, CaSSLe's probe charged as what runs, DualNet's fast learner, CCIC's pseudo-label
contrastive term and kNN classifier, pretrain_ft's fine-tune LR, per-sample EWC/MAS importance,
GDumb's --memory."""
import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from kill import EXIT_STATUS, exit_after
from dietcl_fast.methods import build_method
from dietcl_fast.trainer import Trainer
from test_methods import tiny_cfg


def opened(method, t=0, **opts):
    """A trainer whose step t is opened (head grown, paths registered), no training."""
    tr = Trainer(tiny_cfg(method, **opts), log=lambda m: None)
    for k in range(t + 1):
        tr._open_step(k)
    return tr


# ---------------------------------------------------------------- buffer insertion time
def test_er_step_t_draws_hold_past_steps_only(tmp_path):
    tr = Trainer(tiny_cfg("er", budget=2), log=lambda m: None)
    assert tr.method.buffer_insertion == "after"
    drawn = {}
    orig = tr.buffer.sample

    def spy(n, step, rank=0, world_size=1):
        out = orig(n, step, rank, world_size)
        drawn.setdefault(tr.ledger.current_step, []).extend(int(i) for i in out[0])
        return out
    tr.buffer.sample = spy
    tr.run(str(tmp_path))
    s0, s1 = (set(s.labeled_ids.tolist()) for s in tr.stream.steps)
    assert set(drawn) == {1} and drawn[1]                 # step 0 has no buffer share
    assert set(drawn[1]) <= s0 and not set(drawn[1]) & s1  # step 1 replays step 0 only
    # after the run the buffer holds both steps (step 1 joined after its training)
    assert len(tr.buffer) == len(s0) + len(s1)


def test_insertion_time_is_a_method_property():
    assert build_method(tiny_cfg("dietcl")).buffer_insertion == "before"   # DietCL: default
    for name in ("pretrain_ft", "ccic", "dualnet", "cassle"):
        assert build_method(tiny_cfg(name)).buffer_insertion == "after", name
    tr = opened("dietcl", t=1)
    assert len(tr.buffer) == sum(s.num_labeled for s in tr.stream.steps)   # step 1 in already
    tr = opened("er", t=1)
    assert len(tr.buffer) == 0        # nothing trained yet: no step has joined


# ---------------------------------------------------------------- ER's replay loss
def replay_mb(spec, sizes, seed, **kw):
    """A hand-made micro-batch of labeled/buffer images (6 seen classes, step classes 3..5)."""
    from dietcl_fast.methods import MicroBatch
    g = torch.Generator().manual_seed(100 + seed)
    x = {k: torch.randn(n, spec.in_chans, spec.img_size, spec.img_size, generator=g)
         for k, n in sizes.items()}
    y = {k: torch.randint(0, 6, (n,), generator=g) for k, n in sizes.items()}
    return MicroBatch(x=x, y=y, n_global={k: 2 * n + 1 for k, n in sizes.items()},
                      step_classes=torch.tensor([3, 4, 5]), num_seen=6,
                      generator=torch.Generator().manual_seed(seed),
                      mask_generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("mixup", [True, False])
@pytest.mark.parametrize("sizes", [{"labeled": 4}, {"labeled": 4, "buffer": 3},
                                   {"labeled": 1, "buffer": 3}])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replay_loss_has_one_form(tiny_spec, mixup, sizes, seed):
    """ER's loss on a hand-made micro-batch (with_draws: Mixup plans drawn from its generator,
    seen head rows) equals, bit for bit, Method.mix's Mixup/CutMix with cross-entropy over the
    seen classes, and the trainer's full-capacity form (unseen rows masked) on the same plans;
    a method's own `classify` (DualNet) goes through the same form."""
    from dietcl_fast.data.mixup import soft_cross_entropy
    from dietcl_fast.methods.base import ClassSet
    from dietcl_fast.models import build_model
    cfg = tiny_cfg("er")
    cfg.method.mixup = mixup
    m = build_method(cfg)
    torch.manual_seed(0)
    model = build_model(tiny_spec, num_classes=6, head_capacity=8)
    mb = replay_mb(tiny_spec, sizes, seed)
    got, logs = m.loss(model, mb)
    assert set(logs) == {"L" + k[0] for k in sizes}
    # the reference: Method.mix (mixup_cutmix draws from the generator) per source, in order
    ref_mb = replay_mb(tiny_spec, sizes, seed)
    xs, tgts = zip(*(m.mix(ref_mb.x[k], ref_mb.y[k], 6, ref_mb.generator) for k in sizes))
    logits = model.classify(torch.cat(xs))
    want, start = 0.0, 0
    for k, tgt in zip(sizes, tgts):
        term = soft_cross_entropy(logits[start:start + len(tgt)], tgt) / mb.n_global[k]
        start += len(tgt)
        want = want + term
        assert torch.equal(logs["L" + k[0]], term.detach() * mb.n_global[k] / len(tgt))
    assert torch.equal(got.detach(), want.detach())
    assert torch.equal(mb.generator.get_state(), ref_mb.generator.get_state())  # same draws
    # the trainer's form: plans and class sets given, logits over all 8 head rows
    planned = m.with_draws(replay_mb(tiny_spec, sizes, seed))
    s = cfg.method.label_smoothing
    full = dataclasses.replace(planned, seen=ClassSet.of(range(6), 8, s, "cpu"),
                               step=ClassSet.of([3, 4, 5], 8, s, "cpu"))
    trainer_form, trainer_logs = m.loss(model, full)
    assert float(trainer_form.detach()) == pytest.approx(float(got.detach()), rel=1e-6)
    for k in logs:
        assert float(trainer_logs[k]) == pytest.approx(float(logs[k]), rel=1e-6)
    # a classify function of the method's own: the seen-row form, with the trainer's class sets
    # (capacity 8) cut to the seen rows
    calls = []
    own, own_logs = m.replay_loss(model, replay_mb(tiny_spec, sizes, seed, seen=full.seen,
                                                   step=full.step),
                                  classify=lambda x: calls.append(x.shape[0]) or model.classify(x))
    assert calls == [sum(sizes.values())]
    assert torch.equal(own.detach(), got.detach())


# ---------------------------------------------------------------- CaSSLe's probe
def test_cassle_probe_is_charged_what_runs():
    from torch.utils.flop_counter import FlopCounterMode

    from dietcl_fast.models import set_fused_attention
    tr = opened("cassle", t=0)
    m = tr.method
    fwd, full = tr.ledger.paths()["probe"]
    # what runs: no-grad encoder forward + head forward and backward, counted for real
    set_fused_attention(tr.model, False)
    x = torch.rand(4, tr.spec.in_chans, tr.spec.img_size, tr.spec.img_size)
    with FlopCounterMode(display=False) as fc:
        m.probe_logits(tr.model, x).sum().backward()
    assert fc.get_total_flops() == 4 * fwd
    with FlopCounterMode(display=False) as fc:
        tr.model.classify(x).sum().backward()
    assert fc.get_total_flops() == 4 * full
    # units of one probe iteration (G images): what runs / a full pass, about a third
    ctx = dataclasses.replace(tr.step_context(0), budget=10)
    probe = [p for p in m.phases(ctx) if p.name == "probe"][0]
    per_it = probe.iteration_units(ctx.global_batch, ctx.units_for, m.paths)
    assert per_it == pytest.approx(fwd / full)
    assert 0.3 < per_it < 0.4                                  # a full charge would be 1.0
    ssl = [p for p in m.phases(ctx) if p.name == "ssl"][0]
    left = 10 - ssl.planned_units(ctx.global_batch, ctx.units_for, m.paths)
    assert probe.steps == int(left / per_it + 1e-9) > int(left)


# ---------------------------------------------------------------- pretrain_ft
def test_pretrain_ft_finetunes_at_five_times_the_lr():
    tr = opened("pretrain_ft", t=0)
    mae, er = tr.method.phases(dataclasses.replace(tr.step_context(1), budget=10))
    assert (mae.name, mae.lr_scale, er.name, er.lr_scale) == ("mae", 1.0, "er", 5.0)
    peak = tr.cfg.optim.blr * tr.G / 256
    assert tr._lr(er, 0) == pytest.approx(5 * peak) and tr._lr(mae, 0) == pytest.approx(peak)


# ---------------------------------------------------------------- EWC / MAS
@pytest.mark.parametrize("method", ["ewc", "mas"])
def test_importance_is_the_mean_of_per_sample_gradients(method, tiny_spec):
    from dietcl_fast.models import build_model
    m = build_method(tiny_cfg(method))
    torch.manual_seed(0)
    model = build_model(tiny_spec, num_classes=3)
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    x = torch.rand(5, 1, 16, 16)
    y = torch.tensor([0, 1, 2, 1, 0])
    got = m.importance_sum(model, named, x, y)
    want = {k: torch.zeros_like(p) for k, p in named}
    mean_grad = {k: torch.zeros_like(p) for k, p in named}
    for i in range(5):                          # one image at a time, plain autograd
        obj = m.sample_objective(model.classify(x[i:i + 1])[0], y[i])
        gs = torch.autograd.grad(obj, [p for _, p in named], allow_unused=True)
        for (k, _), g in zip(named, gs):
            if g is not None:
                want[k] += m.transform_grad(g)
                mean_grad[k] += g / 5
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-9)
    # the batch estimate (transform of the mean gradient, x n) is a different, smaller number
    # (Jensen for the square, the triangle inequality for |.|)
    k = "encoder.blocks.0.attn.qkv.weight"
    batch = 5 * m.transform_grad(mean_grad[k])
    assert not torch.allclose(batch, want[k], rtol=1e-2)
    assert batch.sum() < want[k].sum()


# ---------------------------------------------------------------- DualNet
def test_dualnet_fast_learner_is_the_feature_wise_transformation_of_slow_features():
    from dietcl_fast.methods.dualnet import slow_features
    tr = opened("dualnet", t=0)
    m, model = tr.method, tr.model
    fast = model.fast
    x = torch.rand(3, tr.spec.in_chans, tr.spec.img_size, tr.spec.img_size)
    hs = slow_features(model, x)
    assert len(hs) == tr.spec.depth and hs[0].shape == (3, (tr.spec.img_size // tr.spec.patch_size) ** 2, tr.spec.embed_dim)
    # m_1 = relu(LN(embed(x))) * h_1 ; m_l = relu(LN(W_l m_{l-1})) * h_l ; logits = head(mean m_L)
    z = F.relu(fast.norms[0](fast.embed(x).flatten(2).transpose(1, 2))) * hs[0]
    for lin, norm, h in zip(fast.layers, fast.norms[1:], hs[1:]):
        z = F.relu(norm(lin(z))) * h
    want = model.head(z.mean(1))
    torch.testing.assert_close(m.fast_classify(model, x), want)
    torch.testing.assert_close(m.eval_model(tr.step_context(0)).classify(x), want)     # evaluation: fast path
    # the last slow map is the encoder's final-norm output: the slow representation
    torch.testing.assert_close(hs[-1].mean(1), model.forward_features(x))


@pytest.mark.parametrize("slow_supervised", [True, False])
def test_dualnet_gradients_reach_the_learners_they_should(slow_supervised):
    tr = opened("dualnet", t=0, slow_supervised=slow_supervised)
    m, model = tr.method, tr.model
    x = torch.rand(4, tr.spec.in_chans, tr.spec.img_size, tr.spec.img_size)

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {k for k, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    ssl = grads(m.ssl_loss(model, x, x.flip(-1)))
    assert any(k.startswith("encoder.blocks") for k in ssl)
    assert not any(k.startswith(("fast.", "head.")) for k in ssl)       # SSL: slow only
    sup = grads(F.cross_entropy(m.fast_classify(model, x), torch.tensor([0, 1, 0, 1])))
    assert any(k.startswith("fast.") for k in sup) and any(k.startswith("head.") for k in sup)
    assert any(k.startswith("encoder.blocks") for k in sup) == slow_supervised
    if not slow_supervised:             # the encoder ran forward-only: charged as such
        fwd, full = tr.ledger.paths()["dualnet_fast"]
        assert fwd < 0.5 * full


# ---------------------------------------------------------------- CCIC
def test_ccic_knn_classifier_votes_over_memory():
    from dietcl_fast.methods.ccic import KNNClassifier

    class Identity(torch.nn.Module):
        def forward_features(self, x):
            return x

    mem = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    y = torch.tensor([0, 0, 1, 1, 2])
    knn = KNNClassifier(Identity(), mem, y, num_classes=4, k=3)
    q = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.3, 0.7]])
    s = knn.classify(q)
    assert s.argmax(1).tolist() == [0, 1, 1]
    assert s[0, 0] == pytest.approx(2, abs=1e-3) and s[1, 1] == pytest.approx(2, abs=1e-3)
    # class 3 has no memory sample: never predicted; ties broken by the nearest sample
    knn1 = KNNClassifier(Identity(), mem, y, num_classes=4, k=1)
    assert knn1.classify(torch.tensor([[0.19, 0.81]])).argmax(1).tolist() == [2]
    assert (s[:, 3] < 0).all()


def test_ccic_negative_only_triplet_hand_computed():
    from dietcl_fast.methods.ccic import negative_only_triplet
    za = torch.tensor([[1.0, 0.0]])
    zb = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # distances from za: sqrt(2), 2 -> hardest sqrt(2); from each zb to za: sqrt(2), 2
    want = (2 * F.relu(torch.tensor(1.5) - 2 ** 0.5) + F.relu(torch.tensor(1.5) - 2.0)) / 3
    assert float(negative_only_triplet(za, zb, 1.5)) == pytest.approx(float(want), rel=1e-5)
    assert float(negative_only_triplet(za, zb, 1.0)) == 0.0


def test_ccic_contrasts_unlabeled_with_past_steps_from_step_one():
    from dietcl_fast.methods import MicroBatch
    tr = opened("ccic", t=0)
    m, model = tr.method, tr.model
    assert m.buffer_insertion == "after"
    ph0, = m.phases(dataclasses.replace(tr.step_context(0), budget=10))
    ph1, = m.phases(dataclasses.replace(tr.step_context(1), budget=10))
    assert ph0.extra == [("unlabeled", "classify", 1, False)]   # step 0: forward-only labels
    assert ph1.extra == [("unlabeled", "classify", 1, True)]    # then fwd+bwd (contrastive)
    s = tr.spec
    img = lambda n: torch.rand(n, s.in_chans, s.img_size, s.img_size)   # noqa: E731
    g = torch.Generator().manual_seed(0)
    mb = MicroBatch(x={"labeled": img(2), "buffer": img(2), "unlabeled": img(4)},
                    y={"labeled": torch.tensor([0, 1]), "buffer": torch.tensor([0, 1])},
                    n_global={"labeled": 2, "buffer": 2, "unlabeled": 4},
                    step_classes=torch.tensor([0, 1]), num_seen=2, generator=g,
                    mask_generator=g, t=1, views={"labeled": [img(2)], "buffer": [img(2)]})
    loss, logs = m.loss(model, mb)
    assert {"Lce", "Lcon", "Lcons", "Lneg"} <= set(logs)
    mb.t = 0
    _, logs0 = m.loss(model, mb)
    assert "Lneg" not in logs0


# ---------------------------------------------------------------- GDumb --memory
def test_gdumb_memory_option_bounds_the_memory(tmp_path):
    from cli.main import main as cli
    out = tmp_path / "g"
    args = ["train", "--method", "gdumb", "--memory", "5", "--budget", "1", "--time-steps", "2",
            "--label-rate", "0.05", "--batch-size", "16", "--no-progress", "--out", str(out)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    from dietcl_fast.checkpoint import load_checkpoint
    st = load_checkpoint(str(out))
    mem = st["method"]["memory"]
    assert sum(len(v) for v in mem.values()) == 5
    res = json.load(open(out / "results.json"))
    assert res["config"]["method"]["memory"] == 5
    r = CliRunner().invoke(cli, args[:4] + ["0"] + args[5:])
    assert r.exit_code != 0 and "--memory 0" in r.output
    assert build_method(tiny_cfg("gdumb")).memory_size == 0        # default: every label


@pytest.mark.parametrize("kill_at,ckpt_every", [(4, 4), (7, 3)])
def test_er_kill_and_resume_keeps_past_only_replay(tmp_path, kill_at, ckpt_every):
    """Killed right after step 0's last iteration (its labels not yet in the buffer) or in the
    middle of step 1: the resumed run equals the uninterrupted one."""
    from dietcl_fast.checkpoint import load_checkpoint
    from test_trainer import TINY, cli
    args = [*TINY, "--method", "er"]
    full = tmp_path / "full"
    cli(*args, "--out", str(full))
    part = tmp_path / "part"
    p = cli(*args, "--out", str(part), "--ckpt-every", str(ckpt_every), check=False,
            extra_env=exit_after(kill_at))
    assert p.returncode == EXIT_STATUS, p.stderr
    from dietcl_fast.buffer import BalancedBuffer
    ck = load_checkpoint(str(part))
    buf = BalancedBuffer.from_state_bytes(ck["buffer"])
    assert buf.num_tasks == (0 if kill_at == 4 else 1)      # step t joins only after step t
    cli("train", "--resume", str(part), "--no-progress")
    a = json.loads((full / "results.json").read_text())
    b = json.loads((part / "results.json").read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
