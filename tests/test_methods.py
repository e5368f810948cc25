"""Every baseline: runs a tiny stream on the CPU inside FlopCounterMode (attention as
plain matmuls) with the ledger equal to what was counted and never over budget; and each
method's defining behaviour."""
import numpy as np
import pytest
import torch

from dietcl_fast.methods import METHODS
from dietcl_fast.trainer import Trainer

from conftest import tiny_cfg as shared_tiny_cfg

ALL = sorted(METHODS)


def tiny_cfg(method, budget=3, **opts):
    """conftest's tiny run; keyword arguments are the method's options (its own section's,
    else the shared method section's: `memory`)."""
    cfg = shared_tiny_cfg(method, budget)
    own = getattr(cfg.method, method, None)
    for k, v in opts.items():
        target = own if own is not None and hasattr(own, k) else cfg.method
        if not hasattr(target, k):
            raise AttributeError(f"tiny_cfg: {method} has no option {k}")
        setattr(target, k, v)
    return cfg


def run_counted(tmp_path, counter, method, budget=3, before_run=None, **opts):
    from dietcl_fast.models import set_fused_attention
    tr = counter.watch(Trainer(tiny_cfg(method, budget, **opts), log=lambda m: None))
    set_fused_attention(tr.model, False)
    if before_run is not None:
        before_run(tr)
    res = tr.run(str(tmp_path))
    return tr, res, counter


class UnlabeledLabelGuard:
    """Installed on a trainer before its run: every micro-batch the method's loss receives is
    checked to hold no label of the unlabeled source, and every lookup of the stream's labels
    is recorded; `check()` after the run fails if a micro-batch ran with none, or if a lookup
    asked for an unlabeled image's label."""

    def __init__(self, monkeypatch, method):
        self.monkeypatch, self.method = monkeypatch, method
        self.seen_sources, self.looked_up = set(), []

    def __call__(self, tr):
        self.unlabeled = np.concatenate([s.unlabeled_ids for s in tr.stream.steps])
        orig_labels_of, looked_up = type(tr.stream).labels_of, self.looked_up
        self.monkeypatch.setattr(type(tr.stream), "labels_of", lambda stream, ids: (
            looked_up.append(np.asarray(ids)), orig_labels_of(stream, ids))[1])
        orig_loss, method, seen = tr.loss_fn, self.method, self.seen_sources

        def loss(model, mb):
            assert "unlabeled" not in mb.y, f"{method} got the unlabeled source's labels"
            assert set(mb.y) <= {"labeled", "buffer"} and set(mb.y) <= set(mb.x)
            seen.update(mb.x)
            return orig_loss(model, mb)
        tr.loss_fn = loss

    def check(self):
        assert self.seen_sources, "no micro-batch ran"
        for ids in self.looked_up:
            assert not np.isin(ids, self.unlabeled).any(), \
                f"{self.method}: labels of unlabeled images looked up"


@pytest.mark.parametrize("method", ALL)
def test_method_runs_within_budget_and_ledger_equals_flopcounter(tmp_path, flop_regions,
                                                                  monkeypatch, method):
    """A tiny run of each method: never over budget, the budget used, the ledger's FLOPs what
    FlopCounterMode counted; and in the same run the unlabeled source's labels are never
    looked up and never reach a micro-batch (UnlabeledLabelGuard)."""
    guard = UnlabeledLabelGuard(monkeypatch, method)
    tr, res, counter = run_counted(tmp_path, flop_regions, method, before_run=guard)
    guard.check()
    led = res["ledger"]
    T, B = 2, 3
    spent = led["units_per_step"]
    assert all(s <= b + 1e-9 for s, b in zip(spent, led["budget_per_step"]))
    assert sum(spent) <= T * B + 1e-9
    assert sum(spent) > 0.5 * T * B                      # the budget is actually used
    assert counter.total == pytest.approx(led["flops_total"], rel=5e-3)
    assert len(res["A"]) == T


def test_registry_lists_every_paper_baseline():
    assert set(ALL) >= {"dietcl", "er", "finetune", "ewc", "mas", "gdumb", "l2p", "cassle",
                        "dualnet", "ccic", "pretrain_ft", "joint"}


# ---------------------------------------------------------------- EWC / MAS
@pytest.mark.parametrize("method", ["ewc", "mas"])
def test_penalty_zero_before_first_step_and_grows_with_importance(tmp_path, flop_regions, method,
                                                                  tiny_spec):
    from dietcl_fast.methods import build_method
    from dietcl_fast.models import build_model
    m = build_method(tiny_cfg(method))
    model = build_model(tiny_spec, num_classes=4)
    assert float(m.penalty(model)) == 0.0                # no importance before step 0 ends
    tr, res, _ = run_counted(tmp_path, flop_regions, method, budget=3, importance_budget=0.3)
    meth = tr.method
    assert meth.importance and all(torch.isfinite(v).all() for v in meth.importance.values())
    # importance passes were charged in the step's budget (classify fwd+bwd images)
    assert res["ledger"]["per_path"]["classify"]["images_fwd_bwd"] > 0
    with torch.no_grad():
        for p in tr.model.parameters():
            p.add_(0.01)
    pen1 = float(meth.penalty(tr.model).detach())
    assert pen1 > 0
    for k in meth.importance:
        meth.importance[k] = meth.importance[k] * 2
    assert float(meth.penalty(tr.model).detach()) == pytest.approx(2 * pen1, rel=1e-5)


# ---------------------------------------------------------------- GDumb
def test_gdumb_memory_is_class_balanced_greedy():
    from dietcl_fast.methods import build_method
    m = build_method(tiny_cfg("gdumb", memory=6))
    rng = np.random.default_rng(0)
    m.add(np.arange(10), np.zeros(10, dtype=int), rng)          # class 0 fills the memory
    assert {c: len(v) for c, v in m.memory.items()} == {0: 6}
    m.add(np.arange(10, 20), np.ones(10, dtype=int), rng)       # class 1 takes half
    assert {c: len(v) for c, v in m.memory.items()} == {0: 3, 1: 3}
    m.add(np.arange(20, 30), np.full(10, 2), rng)
    assert {c: len(v) for c, v in m.memory.items()} == {0: 2, 1: 2, 2: 2}


def test_gdumb_retrains_from_scratch(tmp_path, flop_regions):
    tr, res, _ = run_counted(tmp_path, flop_regions, "gdumb", budget=2)
    assert tr.method.reinits == 2
    # at the start of step 1 the encoder equals the run's initial weights again
    from dietcl_fast.models import build_model
    torch.manual_seed(tr.cfg.run.seed)
    init = build_model(tr.spec).state_dict()
    seen = {}
    tr2 = Trainer(tiny_cfg("gdumb", budget=2), log=lambda m: None)
    orig = tr2.parts.reinitialise     # the trainer re-initialises GDumb's model at step start

    def spy(t):
        orig(t)
        seen[t] = {k: v.clone() for k, v in tr2.model.state_dict().items()}
    tr2.parts.reinitialise = spy
    tr2.run(str(tmp_path / "b"))
    for k, v in init.items():
        if not k.startswith("head."):
            assert torch.equal(seen[1][k], v), k
    # memory holds every labeled sample seen (memory_size 0 = unbounded)
    assert len(tr.method.memory_ids()) == sum(s.num_labeled for s in tr.stream.steps)


# ---------------------------------------------------------------- L2P
def test_l2p_selects_prompts_by_key_similarity_and_freezes_encoder(tmp_path):
    from dietcl_fast.methods.l2p import PromptPool
    pool = PromptPool(pool=4, length=2, dim=8, top_k=2)
    with torch.no_grad():
        pool.keys.copy_(torch.eye(4, 8))
    q = torch.zeros(3, 8)
    q[0, 2], q[1, 0], q[2, 3] = 1.0, 1.0, 1.0
    q[:, 1] = 0.5
    idx, sim = pool.select(q)
    assert idx[:, 0].tolist() == [2, 0, 3] and idx[:, 1].tolist() == [1, 1, 1]
    assert torch.allclose(sim[:, 0], torch.full((3,), 1 / np.sqrt(1.25)))

    cfg = tiny_cfg("l2p")
    tr = Trainer(cfg, log=lambda m: None)
    before = {k: v.clone() for k, v in tr.model.encoder.state_dict().items()}
    keys0 = tr.model.l2p.keys.detach().clone()
    res = tr.run(str(tmp_path))
    for k, v in tr.model.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k                    # encoder frozen
    assert not torch.equal(tr.model.l2p.keys, keys0)           # keys and prompts trained
    per = res["ledger"]["per_path"]
    assert per["l2p_query"]["images_fwd"] == per["l2p"]["images_fwd_bwd"]   # query charged


# ---------------------------------------------------------------- CaSSLe
def test_cassle_charges_two_views_and_the_teacher(tmp_path, flop_regions):
    tr, res, _ = run_counted(tmp_path, flop_regions, "cassle", budget=4)
    per = res["ledger"]["per_path"]
    ssl_steps = [p for p in tr.method.phases(tr.step_context(1)) if p.name == "ssl"][0].steps
    # step 0: ssl steps at G images x 2 views; step 1 the same, plus the teacher on both views
    s0 = [p for p in tr.method.phases(tr.step_context(0)) if p.name == "ssl"][0].steps
    assert per["cassle_ssl"]["images_fwd_bwd"] == 2 * 16 * (s0 + ssl_steps)
    assert per["teacher"]["images_fwd"] == 2 * 16 * ssl_steps
    assert s0 == 1 and ssl_steps == 1          # 0.8 x 4 units at 2 (+2/3) units per step
    # the probe runs the encoder forward-only: charged forward-only, at what runs
    assert per["probe"]["images_fwd_bwd"] == 0 and per["probe"]["images_fwd"] > 0


# ---------------------------------------------------------------- DualNet
def test_dualnet_variable_sampling_threshold(tmp_path):
    from dietcl_fast.methods import build_method
    m = build_method(tiny_cfg("dualnet"))
    draws = [m.slow_iteration(0, it) for it in range(400)]
    assert 0.4 < np.mean(draws) < 0.6
    m1 = build_method(tiny_cfg("dualnet", threshold=1.0))
    assert all(m1.slow_iteration(0, it) for it in range(50))


# ---------------------------------------------------------------- joint
def test_joint_sees_all_data_once(tmp_path):
    cfg = tiny_cfg("joint", budget=4)
    tr = Trainer(cfg, log=lambda m: None)
    seen = []
    orig = tr.loader.batch

    def spy(ids, kind, generator=None, **kw):
        if kind == "unlabeled":
            seen.extend(int(i) for i in ids)
        return orig(ids, kind, generator=generator, **kw)
    tr.loader.batch = spy
    res = tr.run(str(tmp_path))
    led = res["ledger"]
    assert led["budget_per_step"] == [0.0, 8.0] and led["units_per_step"][0] == 0
    assert led["units_per_step"][1] == pytest.approx(8.0)
    all_u = np.concatenate([s.unlabeled_ids for s in tr.stream.steps])
    # 0.8 x 8 -> 6 MAE steps of 16 = 96 images, drawn from the union without repetition
    assert len(seen) == 96 and len(set(seen)) == 96
    assert set(seen) <= set(all_u.tolist())
    steps_hit = {t for t, s in enumerate(tr.stream.steps) if set(seen) & set(s.unlabeled_ids.tolist())}
    assert steps_hit == {0, 1}


def test_joint_epoch_covers_every_unlabeled_image(tmp_path):
    """When the budget allows more than one pass, every image is seen before any twice."""
    from dietcl_fast.data.sampling import EpochSampler
    from dietcl_fast.methods import build_method
    cfg = tiny_cfg("joint")
    m = build_method(cfg)
    tr = Trainer(cfg, log=lambda m: None)
    ids = m.source_ids(tr.step_context(1))["unlabeled"]
    s = EpochSampler(ids, 0, (1, 0, 0))
    drawn = s.draw(0, len(ids))
    assert sorted(drawn.tolist()) == sorted(ids.tolist())


# ---------------------------------------------------------------- the method <-> trainer contract
def test_methods_see_a_step_context_not_the_trainer():
    """No method module reads the trainer: every hook takes a StepContext."""
    import inspect

    import dietcl_fast.methods as pkg
    for cls in set(METHODS.values()):
        src = inspect.getsource(inspect.getmodule(cls))
        assert "trainer." not in src.replace("`base` trainer.", ""), cls.name
        for hook in ("phases", "step_budget", "reserve_units", "source_ids", "extra_paths",
                     "on_step_start", "eval_model", "importance_pass", "on_step_end"):
            params = list(inspect.signature(getattr(cls, hook)).parameters)
            assert params == ["self", "ctx"], (cls.name, hook, params)
    assert "Trainer" not in inspect.getsource(pkg)


def test_a_new_method_declares_its_importance_pass_and_reinit_the_trainer_runs_and_charges(
        tmp_path, flop_regions):
    """A method defined here (one class + the registry) declares a pass over step t's labeled
    images and a re-initialisation; the trainer charges the pass before it runs (the counted
    FLOPs equal the ledger's) within the step's budget, and re-initialises the model."""
    from dietcl_fast.methods import ImportancePass, Phase, register
    from dietcl_fast.methods.finetune import Finetune

    calls = {"chunks": [], "finish": 0, "ctx": []}

    class Probe(Finetune):
        name = "test_probe_method"
        reinitialise = True

        def reserve_units(self, ctx):
            return ctx.units("classify", 6, True)

        def phases(self, ctx):
            ph = self.fit(Phase("finetune", 0, {"labeled": 1.0}),
                          ctx.budget - self.reserve_units(ctx), ctx)
            return [ph]

        def importance_pass(self, ctx):
            calls["ctx"].append(ctx.t)
            ids = ctx.stream.steps[ctx.t].labeled_ids[:6]
            model = ctx.model

            def accumulate(x, y):
                calls["chunks"].append((x.shape[0], y.tolist()))
                model.classify(x.float()).logsumexp(-1).sum().backward()

            def finish():
                calls["finish"] += 1
                model.zero_grad(set_to_none=True)
            return ImportancePass(ids=ids, chunk=4, accumulate=accumulate, finish=finish)

    register(Probe)
    try:
        tr = flop_regions.watch(Trainer(tiny_cfg("test_probe_method", budget=2),
                                        log=lambda m: None))
        from dietcl_fast.models import set_fused_attention
        set_fused_attention(tr.model, False)
        reinit = []
        orig = tr.parts.reinitialise
        tr.parts.reinitialise = lambda t: (reinit.append(t), orig(t))
        res = tr.run(str(tmp_path))
    finally:
        METHODS.pop("test_probe_method")
    assert calls["ctx"] == [0, 1] and calls["finish"] == 2 and reinit == [0, 1]
    assert [n for n, _ in calls["chunks"]] == [4, 2, 4, 2]
    step0 = tr.stream.steps[0]
    assert calls["chunks"][0][1] == list(tr.stream.labels_of(step0.labeled_ids[:4]))
    led = res["ledger"]
    assert flop_regions.total == pytest.approx(led["flops_total"], rel=5e-3)   # every pass charged
    assert all(s <= b + 1e-9 for s, b in zip(led["units_per_step"], led["budget_per_step"]))
