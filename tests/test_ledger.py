"""FLOP model (vs torch FlopCounterMode) and the budget Ledger."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dietcl_fast.ledger import BudgetExceeded, Ledger, flops_per_image, flops_report
from dietcl_fast.models.spec import ModelSpec

timm = pytest.importorskip("timm")
from timm.layers import set_fused_attn  # noqa: E402
from timm.models.vision_transformer import Block, PatchEmbed, VisionTransformer  # noqa: E402


@pytest.fixture(autouse=True)
def _plain_attention():
    set_fused_attn(False)
    yield
    set_fused_attn(True)


def count(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def count_fwd_and_fwd_bwd(model, x):
    fwd = count(lambda: model(x))
    fwd_bwd = count(lambda: model(x).float().sum().backward())
    return fwd, fwd_bwd


CLASSIFIER_CONFIGS = [
    # img, patch, chans, classes, dim, depth, heads, device
    (28, 4, 1, 7, 48, 2, 3, "cpu"),       # grey, odd classes, 3 heads
    (32, 8, 3, 10, 64, 3, 4, "cpu"),
    (64, 16, 3, 101, 96, 2, 6, "meta"),
    (224, 16, 3, 1000, 768, 12, 12, "meta"),  # ViT-B/16
    (96, 12, 2, 0, 120, 1, 5, "meta"),    # no head
]


@pytest.mark.parametrize("img,patch,chans,classes,dim,depth,heads,device", CLASSIFIER_CONFIGS)
def test_classifier_flops_match_flop_counter(img, patch, chans, classes, dim, depth, heads, device):
    with torch.device(device):
        model = VisionTransformer(img_size=img, patch_size=patch, in_chans=chans, num_classes=classes,
                                  embed_dim=dim, depth=depth, num_heads=heads, global_pool="avg",
                                  class_token=True)
        x = torch.randn(2, chans, img, img)
    fwd, fwd_bwd = count_fwd_and_fwd_bwd(model, x)
    f = flops_per_image(ModelSpec(img_size=img, patch_size=patch, in_chans=chans, embed_dim=dim,
                                  depth=depth, num_heads=heads), classes)
    assert f["classify_fwd"] * 2 == fwd
    assert f["classify_fwd_bwd"] * 2 == fwd_bwd


class TinyMAE(torch.nn.Module):
    """facebookresearch/mae structure built from timm blocks (for counting only)."""

    def __init__(self, img, patch, chans, dim, depth, heads, ddim, ddepth, dheads, mask_ratio):
        super().__init__()
        self.patch_embed = PatchEmbed(img, patch, chans, dim)
        L = self.patch_embed.num_patches
        self.mask_ratio = mask_ratio
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, L + 1, dim))
        self.blocks = torch.nn.Sequential(*[Block(dim, heads, 4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(dim)
        self.decoder_embed = torch.nn.Linear(dim, ddim)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, ddim))
        self.decoder_pos_embed = torch.nn.Parameter(torch.zeros(1, L + 1, ddim))
        self.decoder_blocks = torch.nn.Sequential(*[Block(ddim, dheads, 4.0, qkv_bias=True) for _ in range(ddepth)])
        self.decoder_norm = torch.nn.LayerNorm(ddim)
        self.decoder_pred = torch.nn.Linear(ddim, patch * patch * chans)

    def forward(self, imgs):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        N, L, D = x.shape
        keep = int(L * (1 - self.mask_ratio))
        noise = torch.rand(N, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, D))
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(N, -1, -1)
        x = self.norm(self.blocks(torch.cat([cls, x], dim=1)))
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(N, L + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        x = self.decoder_pred(self.decoder_norm(self.decoder_blocks(x)))
        return x[:, 1:, :]


MAE_CONFIGS = [
    (32, 8, 3, 64, 2, 4, 32, 1, 2, 0.75, "cpu"),
    (28, 4, 1, 48, 1, 3, 24, 2, 3, 0.5, "cpu"),
    (224, 16, 3, 768, 12, 12, 512, 8, 16, 0.75, "meta"),  # ViT-B/16 MAE, 8x512 decoder
]


@pytest.mark.parametrize("img,patch,chans,dim,depth,heads,ddim,ddepth,dheads,ratio,device", MAE_CONFIGS)
def test_mae_flops_match_flop_counter(img, patch, chans, dim, depth, heads, ddim, ddepth, dheads, ratio, device):
    with torch.device(device):
        model = TinyMAE(img, patch, chans, dim, depth, heads, ddim, ddepth, dheads, ratio)
        x = torch.randn(2, chans, img, img)
    fwd, fwd_bwd = count_fwd_and_fwd_bwd(model, x)
    f = flops_per_image(ModelSpec(img_size=img, patch_size=patch, in_chans=chans, embed_dim=dim,
                                  depth=depth, num_heads=heads, decoder_embed_dim=ddim,
                                  decoder_depth=ddepth, decoder_num_heads=dheads, mask_ratio=ratio), 0)
    assert f["mae_fwd"] * 2 == fwd
    assert f["mae_fwd_bwd"] * 2 == fwd_bwd


def test_vit_b16_anchors():
    f = flops_report(768, 12, 12, 16, 224, 3, 1000, 0.75, 512, 8, 16)
    assert abs(f["classify_fwd"] - 35.13e9) <= 0.01e9
    assert abs(f["classify_fwd_bwd"] - 105.15e9) <= 0.01e9
    assert abs(f["mae_fwd_bwd"] - 58.46e9) <= 0.01e9
    assert abs(f["classify_fwd_bwd_flash"] - 105.9e9) <= 0.05e9  # docs/algorithm.md, the budget
    assert abs(f["mae_fwd_bwd_flash"] - 58.8e9) <= 0.05e9        # docs/algorithm.md, the budget
    assert f["config"]["embed_dim"] == 768
    assert all(isinstance(f[k], int) for k in ("classify_fwd", "classify_fwd_bwd", "mae_fwd_bwd"))


def test_flash_variant_uses_flop_counter_sdpa_convention():
    # *_flash = plain fwd+bwd + 0.5 x attention forward, i.e. attention backward counted at
    # torch's sdpa_backward_flop_count / sdpa_flop_count ratio (2.5x).  On CPU the fused kernel
    # is not counted by FlopCounterMode at all, so check against its formulas and the bmm count.
    from torch.utils import flop_counter as fcm

    img, patch, dim, depth, heads = 32, 8, 64, 2, 4
    n_tok, hd = (img // patch) ** 2 + 1, dim // heads
    shape = (1, heads, n_tok, hd)
    fwd_attn = fcm.sdpa_flop_count(shape, shape, shape)
    bwd_attn = fcm.sdpa_backward_flop_count(shape, shape, shape, shape)
    assert bwd_attn == 2.5 * fwd_attn
    model = VisionTransformer(img_size=img, patch_size=patch, in_chans=3, num_classes=10, embed_dim=dim,
                              depth=depth, num_heads=heads, global_pool="avg", class_token=True)
    with FlopCounterMode(display=False) as fc:
        model(torch.randn(1, 3, img, img))
    bmm = fc.get_flop_counts()["Global"][torch.ops.aten.bmm]
    assert bmm == depth * fwd_attn
    f = flops_per_image(ModelSpec(img_size=img, patch_size=patch, in_chans=3, embed_dim=dim, depth=depth,
                                  num_heads=heads), 10)
    assert f["classify_fwd_bwd_flash"] - f["classify_fwd_bwd"] == depth * (bwd_attn - 2 * fwd_attn)


@pytest.mark.parametrize("field, value, match", [
    ("img_size", 30, "img_size = 30 is invalid: must be divisible by patch"),
    ("num_heads", 5, "embed_dim = 768 is invalid: must be divisible by heads"),
    ("patch_size", 0, "patch = 0 is invalid: must be > 0"),
    ("mask_ratio", 1.0, "mask_ratio"),
    ("mask_ratio", -0.1, "mask_ratio"),
    ("depth", -1, "depth = -1"),
    ("num_classes", -3, "num_classes = -3"),
    ("decoder_num_heads", 7, "decoder_dim = 512 is invalid: must be divisible by decoder_heads"),
    ("embed_dim", 7.5, "embed_dim = 7.5 is invalid: must be an integer"),
])
def test_spec_validation(field, value, match):
    kw = {field: value}
    num_classes = kw.pop("num_classes", 1000)      # the head size is the FLOP model's, not the spec's
    with pytest.raises(ValueError, match=match):
        flops_per_image(ModelSpec(**kw), num_classes)


# ---------------------------------------------------------------------------- Ledger
def make_ledger(budget=2.0, gb=1024):
    led = Ledger(global_batch=gb)
    led.register_path("classify", 100, 300)
    led.register_path("mae", 40, 110)
    led.begin_step(0, budget)
    return led


def test_budget_exact_stop_and_refusal():
    led = make_ledger(budget=500)
    for _ in range(500):
        led.charge("classify", 600)
        led.charge("mae", 424)
    assert led.spent_units() == 500.0 and led.remaining_units() == 0.0
    assert not led.can_charge("mae", 1)
    with pytest.raises(BudgetExceeded, match="budget exceeded at step 0"):
        led.charge("mae", 1)
    assert issubclass(BudgetExceeded, ValueError)
    assert led.spent_units() == 500.0  # refused charge left no trace
    assert led.num_charges == 1000
    assert led.flops_total == 500 * (600 * 300 + 424 * 110)
    led.charge("mae", 0)  # zero images is always fine


def test_forward_only_fraction_and_units():
    led = make_ledger(budget=1.0)
    u = led.charge("classify", 512, backward=False)
    assert u == pytest.approx(0.5 * 100 / 300)
    assert led.spent_units() == pytest.approx(1 / 6)
    assert led.units_for("mae", 1024) == 1.0
    assert led.can_charge("classify", 853) and not led.can_charge("classify", 854)
    # many tiny forward-only charges do not drift
    led.begin_step(1, 1.0)
    for _ in range(3000):
        led.charge("classify", 1, backward=False)
    assert led.spent_units() == pytest.approx(3000 / 1024 / 3, rel=1e-15)
    recs = [r for r in led.records() if r["t"] == 1]
    assert len(recs) == 1 and recs[0]["charges"] == 3000 and recs[0]["images"] == 3000


def test_reregister_updates_costs_and_to_dict():
    led = make_ledger(budget=3.0)
    led.charge("classify", 1024)
    led.register_path("classify", 110, 330)  # head grew
    led.begin_step(1, 2.0)
    led.charge("classify", 1024)
    led.charge("mae", 512, backward=False)
    d = led.to_dict()
    assert d["global_batch"] == 1024
    assert d["units_per_step"][0] == 1.0
    assert d["units_per_step"][1] == pytest.approx(1.0 + 0.5 * 40 / 110)
    assert d["flops_per_step"] == [1024 * 300, 1024 * 330 + 512 * 40]
    assert d["flops_total"] == sum(d["flops_per_step"])
    assert d["per_path"]["classify"]["images_fwd_bwd"] == 2048
    assert d["per_path"]["mae"]["images_fwd"] == 512
    assert d["per_path"]["classify"]["fwd_bwd_flops_per_image"] == 330


def test_huge_flops_do_not_overflow():
    led = Ledger(1024)
    f = flops_per_image(ModelSpec(), 1000)
    led.register_path("classify", f["classify_fwd"], f["classify_fwd_bwd"])
    led.begin_step(0, 1e13)
    for _ in range(3):
        led.charge("classify", 2**40)
    assert led.flops_total == 3 * 2**40 * f["classify_fwd_bwd"]  # > 2^64


def test_ledger_state_round_trip_and_corruption():
    led = make_ledger(budget=2.0)
    led.charge("classify", 700)
    led.charge("mae", 100, backward=False)
    blob = led.state_bytes()
    r = Ledger.from_state_bytes(blob)
    assert r.to_dict() == led.to_dict()
    assert r.current_step == 0 and r.spent_units() == led.spent_units()
    r.charge("classify", 300)
    with pytest.raises(BudgetExceeded):
        r.charge("classify", 1100)
    bad = bytearray(blob)
    bad[-12] ^= 0xFF
    with pytest.raises(ValueError, match="checksum mismatch"):
        Ledger.from_state_bytes(bytes(bad))
    with pytest.raises(ValueError, match="truncated"):
        Ledger.from_state_bytes(blob[:-1])
    with pytest.raises(ValueError, match="bad magic"):
        Ledger.from_state_bytes(b"XXXXXXXX" + blob[8:])
    fresh = Ledger()
    fresh.load_state_dict(led.state_dict())
    assert fresh.to_dict() == led.to_dict()


@pytest.mark.parametrize("call, match", [
    (lambda l: l.charge("nope", 1), "unknown path 'nope'"),
    (lambda l: l.charge("classify", -1), "images must be >= 0"),
    (lambda l: l.begin_step(1, -1.0), "budget_units must be finite and >= 0"),
    (lambda l: l.begin_step(1, math.inf), "budget_units must be finite"),
    (lambda l: l.begin_step(-1, 1.0), "step t must be >= 0"),
    (lambda l: l.register_path("x", 0, 1), "must be > 0"),
    (lambda l: l.register_path("x", 10, 5), "must be >= its fwd"),
])
def test_ledger_bad_input(call, match):
    led = make_ledger()
    with pytest.raises(ValueError, match=match):
        call(led)


def test_ledger_requires_begin_step_and_valid_batch():
    led = Ledger()
    led.register_path("classify", 1, 3)
    with pytest.raises(ValueError, match="no step begun"):
        led.charge("classify", 1)
    with pytest.raises(ValueError, match="global_batch must be >= 1"):
        Ledger(0)


def test_begin_step_on_an_opened_step_is_refused():
    # re-opening a step would replace its budget and keep what was spent (2 of 2 spent, then
    # 98 more allowed): a step's budget is set once (a resumed run restores the ledger instead)
    led = make_ledger(budget=2.0)
    led.charge("classify", 2048)
    with pytest.raises(ValueError, match="step 0 was already begun"):
        led.begin_step(0, 100.0)
    assert led.budget_units() == 2.0 and led.remaining_units() == 0.0
    assert not led.can_charge("classify", 1)


def test_ledger_refuses_image_counts_that_would_wrap():
    led = make_ledger(budget=1e300)
    led.charge("classify", 2 ** 62)
    with pytest.raises(ValueError, match="overflow"):
        led.charge("classify", 2 ** 62)


# --------------------------------------------------------------------------- the product's model
@pytest.mark.parametrize("cfg", [
    dict(img_size=28, patch_size=4, in_chans=1, embed_dim=64, depth=3, num_heads=2, mlp_ratio=2.0,
         decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, k=7),
    dict(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0,
         decoder_embed_dim=24, decoder_depth=2, decoder_num_heads=4, k=13, mask_ratio=0.6),
    dict(img_size=20, patch_size=5, in_chans=3, embed_dim=30, depth=1, num_heads=5, mlp_ratio=3.0,
         decoder_embed_dim=20, decoder_depth=3, decoder_num_heads=2, k=3, mask_ratio=0.9),
    dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
         mlp_ratio=4.0, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, k=1000),
])
def test_ledger_equals_flopcounter_on_dietmodel(cfg):
    """The ledger's per-image FLOPs equal FlopCounterMode on the DietModel the trainer runs
    (attention as plain matmuls): classify fwd, fwd+bwd and the MAE path fwd+bwd."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dietcl_fast.ledger import flops_per_image
    from dietcl_fast.models import ModelSpec, build_model, set_fused_attention

    cfg = dict(cfg)
    k = cfg.pop("k")
    spec = ModelSpec(**cfg).validate()
    big = spec.img_size >= 224
    dev = "meta" if big else "cpu"
    with torch.device(dev):
        model = build_model(spec, num_classes=k)
    set_fused_attention(model, False)
    n = 2
    x = torch.randn(n, spec.in_chans, spec.img_size, spec.img_size, device=dev)
    f = flops_per_image(spec, k)
    with FlopCounterMode(display=False) as fc:
        model.classify(x)
    assert fc.get_total_flops() == pytest.approx(n * f["classify_fwd"], rel=5e-3)
    with FlopCounterMode(display=False) as fc:
        model.classify(x).sum().backward()
    assert fc.get_total_flops() == pytest.approx(n * f["classify_fwd_bwd"], rel=5e-3)
    if big:   # the MAE path's masking kernel needs real tensors; the classifier is the anchor
        assert f["classify_fwd"] == pytest.approx(35.13e9, rel=1e-3)
        assert f["classify_fwd_bwd"] == pytest.approx(105.15e9, rel=1e-3)
        return
    with FlopCounterMode(display=False) as fc:
        loss, _, _ = model.forward_mae(x, generator=torch.Generator().manual_seed(0))
        loss.backward()
    assert fc.get_total_flops() == pytest.approx(n * f["mae_fwd_bwd"], rel=5e-3)
