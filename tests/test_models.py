import pytest
import torch

from dietcl_fast.models import (ModelSpec, PretrainedMismatch, build_model, load_mae_checkpoint,
                                param_groups_lrd, resolve_preset)


@pytest.mark.parametrize("chans", [1, 3])
def test_shapes(tiny_spec, chans):
    spec = ModelSpec(**{**tiny_spec.to_dict(), "in_chans": chans})
    m = build_model(spec, num_classes=5)
    x = torch.randn(3, chans, 16, 16)
    assert m.classify(x).shape == (3, 5)
    loss, pred, mask = m.forward_mae(x, generator=torch.Generator().manual_seed(0))
    assert pred.shape == (3, 16, 16 * chans)
    assert mask.shape == (3, 16)
    assert torch.all(mask.sum(1) == 16 - spec.num_visible)
    assert torch.isfinite(loss)
    loss.backward()
    assert m.decoder_pred.weight.grad is not None and m.encoder.blocks[0].attn.qkv.weight.grad is not None


def test_head_growth_copies_old_rows(tiny_spec):
    torch.manual_seed(0)
    m = build_model(tiny_spec, num_classes=2, head_capacity=8)
    w, b = m.head.fc.weight.detach().clone(), m.head.fc.bias.detach().clone()
    param = m.head.fc.weight
    torch.manual_seed(1)
    assert m.grow_head(5) is False                    # within capacity: same parameter object
    assert m.head.fc.weight is param and m.head.fc.weight.shape == (8, tiny_spec.embed_dim)
    assert m.num_classes == 5
    assert torch.equal(m.head.fc.weight[:2], w[:2]) and torch.equal(m.head.fc.bias[:2], b[:2])
    # the new rows are those a fresh nn.Linear(D, 5) draws from the same seed (today's semantics)
    torch.manual_seed(1)
    fresh = torch.nn.Linear(tiny_spec.embed_dim, 5)
    assert torch.equal(m.head.fc.weight[2:5], fresh.weight[2:5].detach())
    assert torch.equal(m.head.fc.bias[2:5], fresh.bias[2:5].detach())
    assert torch.equal(m.head.fc.weight[5:], torch.zeros(3, tiny_spec.embed_dim))   # unseen
    assert m.grow_head(5) is False
    with pytest.raises(ValueError, match="shrink"):
        m.grow_head(3)
    assert m.grow_head(9) is True                      # past capacity: blocks of 128 rows
    assert m.head.capacity == 128 and torch.equal(m.head.fc.weight[:2], w[:2])


def test_head_masks_unseen_classes(tiny_spec):
    m = build_model(tiny_spec, num_classes=3, head_capacity=6)
    x = torch.randn(4, 1, 16, 16)
    full = m.classify_all(x)
    assert full.shape == (4, 6)
    # the same rows (a GEMM over 6 instead of 3 rows may round the last bit differently)
    torch.testing.assert_close(full[:, :3], m.classify(x), rtol=1e-5, atol=1e-6)
    assert (full[:, 3:] == torch.finfo(full.dtype).min).all()
    probs = full.softmax(-1)
    assert (probs[:, 3:] == 0).all() and (full.argmax(-1) < 3).all()
    full.logsumexp(-1).sum().backward()
    assert m.head.fc.weight.grad[3:].abs().max() == 0 and m.head.fc.weight.grad[:3].abs().max() > 0


def test_state_dict_restores_grown_head(tiny_spec):
    m = build_model(tiny_spec, num_classes=2)
    m.grow_head(7)
    fresh = build_model(tiny_spec, num_classes=0)
    fresh.load_state_dict(m.state_dict())
    assert fresh.num_classes == 7
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(fresh.classify(x), m.classify(x))


def _official_checkpoint(model, path, drop=None, extra=None, reshape=None):
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("head."):
            continue
        name = k[len("encoder."):] if k.startswith("encoder.") else k
        sd[name] = v.clone() + 0.5 if v.is_floating_point() else v.clone()
    if drop:
        sd.pop(drop)
    if extra:
        sd[extra] = torch.zeros(1)
    if reshape:
        sd[reshape] = torch.zeros(3, 3)
    torch.save({"model": sd, "epoch": 1}, path)


def test_pretrained_strict_loading(tiny_spec, tmp_path):
    src = build_model(tiny_spec)
    path = tmp_path / "mae.pth"
    _official_checkpoint(src, path)
    m = build_model(tiny_spec, num_classes=3)
    rep = load_mae_checkpoint(m, str(path))
    assert rep.ok and rep.fresh and all(k.startswith("head.") for k in rep.fresh)
    assert torch.allclose(m.encoder.blocks[0].attn.qkv.weight, src.encoder.blocks[0].attn.qkv.weight + 0.5)
    assert torch.allclose(m.decoder_pred.weight, src.decoder_pred.weight + 0.5)


@pytest.mark.parametrize("kind,kw,msg", [
    ("missing", {"drop": "decoder_pred.weight"}, "missing from the checkpoint"),
    ("unexpected", {"extra": "fc_norm.weight"}, "in the checkpoint but not in the model"),
    ("shape", {"reshape": "patch_embed.proj.weight"}, "shape mismatch"),
])
def test_pretrained_mismatch_is_reported(tiny_spec, tmp_path, kind, kw, msg):
    src = build_model(tiny_spec)
    path = tmp_path / f"{kind}.pth"
    _official_checkpoint(src, path, **kw)
    m = build_model(tiny_spec)
    before = m.encoder.blocks[0].attn.qkv.weight.detach().clone()
    with pytest.raises(PretrainedMismatch, match=msg):
        load_mae_checkpoint(m, str(path))
    assert torch.equal(before, m.encoder.blocks[0].attn.qkv.weight)   # nothing half-loaded


def test_pretrained_bad_files(tiny_spec, tmp_path):
    m = build_model(tiny_spec)
    with pytest.raises(PretrainedMismatch, match="no such file"):
        load_mae_checkpoint(m, str(tmp_path / "nope.pth"))
    torch.save({"state_dict": {}}, tmp_path / "wrong.pth")
    with pytest.raises(PretrainedMismatch, match="under 'model'"):
        load_mae_checkpoint(m, str(tmp_path / "wrong.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedMismatch, match="cannot be read"):
        load_mae_checkpoint(m, str(tmp_path / "junk.pth"))


def test_layer_decay_groups(tiny_spec):
    m = build_model(tiny_spec, num_classes=3)
    groups = param_groups_lrd(m, weight_decay=0.05, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["encoder.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.5 ** 3)
    assert by_name["encoder.blocks.1.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.5)
    assert by_name["head.fc.weight"]["lr_scale"] == 1.0
    assert by_name["encoder.cls_token"]["weight_decay"] == 0.0
    assert by_name["encoder.blocks.0.norm1.weight"]["weight_decay"] == 0.0
    assert by_name["head.fc.weight"]["weight_decay"] == 0.05
    assert "encoder.pos_embed" not in by_name        # fixed sin-cos, not trained
    n_trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == n_trainable


def test_spec_validation_and_presets():
    with pytest.raises(ValueError, match="img_size=30"):
        ModelSpec(img_size=30, patch_size=4).validate()
    with pytest.raises(ValueError, match="mask_ratio"):
        ModelSpec(mask_ratio=1.0).validate()
    assert resolve_preset("auto", False) == "cpu-tiny"
    assert resolve_preset("auto", True) == "vit-b16"
    with pytest.raises(ValueError, match="--preset 'huge'"):
        resolve_preset("huge", False)


# ---------------------------------------------------------------- the encoder is timm's network
def _timm_vit(spec):
    """timm's VisionTransformer as DietModel's encoder is described (dietcl_fast/models/vit.py)."""
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(
        img_size=spec.img_size, patch_size=spec.patch_size, in_chans=spec.in_chans, num_classes=0,
        global_pool="avg", fc_norm=False, embed_dim=spec.embed_dim, depth=spec.depth,
        num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio, qkv_bias=True, class_token=True)


def _same_modules(ours, theirs, x, fused):
    """Same parameters and buffers (names and bits), and the same outputs and gradients for x."""
    from dietcl_fast.models import set_fused_attention
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    set_fused_attention(ours, fused)
    set_fused_attention(theirs, fused)
    outs = []
    for m in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        outs.append((y.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (ya, ga, pa), (yb, gb, pb) = outs
    assert torch.equal(ya, yb) and torch.equal(ga, gb)
    assert all((pa[n] is None and pb[n] is None) or torch.equal(pa[n], pb[n]) for n in pa)


@pytest.mark.parametrize("fused", [True, False])
def test_the_encoder_is_timms_vision_transformer(tiny_spec, fused):
    """ViTEncoder against timm's VisionTransformer(global_pool="avg", fc_norm=False): from the
    same seed the same parameters bit for bit (so a run's weights do not depend on whether timm
    is imported), the generator left in the same state (what DietModel draws next is the same),
    and the same pooled features and gradients, with SDPA and with plain-matmul attention. At
    three channels and at the spec's one."""
    from dietcl_fast.models.vit import ViTEncoder
    for chans in sorted({tiny_spec.in_chans, 3}):
        spec = ModelSpec(**{**tiny_spec.to_dict(), "in_chans": chans})
        torch.manual_seed(7)
        ours = ViTEncoder(spec.img_size, spec.patch_size, chans, spec.embed_dim, spec.depth,
                          spec.num_heads, spec.mlp_ratio)
        after_ours = torch.get_rng_state()
        torch.manual_seed(7)
        theirs = _timm_vit(spec)
        assert torch.equal(after_ours, torch.get_rng_state())
        x = torch.randn(3, chans, spec.img_size, spec.img_size)
        _same_modules(ours, theirs, x, fused)


def test_the_decoder_block_is_timms_block(tiny_spec):
    """The MAE decoder's Block against timm's Block(qkv_bias=True, LayerNorm eps 1e-6), the one
    DietModel's decoder was built from: same draws, names, outputs and gradients."""
    from functools import partial

    from timm.models.vision_transformer import Block as TimmBlock

    from dietcl_fast.models.vit import Block
    d, h = tiny_spec.decoder_embed_dim, tiny_spec.decoder_num_heads
    torch.manual_seed(3)
    ours = Block(d, h, mlp_ratio=tiny_spec.mlp_ratio)
    torch.manual_seed(3)
    theirs = TimmBlock(d, h, mlp_ratio=tiny_spec.mlp_ratio, qkv_bias=True,
                       norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    for fused in (True, False):
        _same_modules(ours, theirs, torch.randn(2, 5, d), fused)
        ours.zero_grad(), theirs.zero_grad()


def test_a_wrong_image_size_is_named(tiny_spec):
    """Eagerly and inside a fullgraph torch.compile (the trainer's step is one): the message
    survives dynamo (a plain raise inside a traced graph would not)."""
    m = build_model(tiny_spec, num_classes=2)
    x = torch.randn(1, tiny_spec.in_chans, 8, 8)
    msg = r"images are \(8, 8\), the model takes \(16, 16\)"
    with pytest.raises(AssertionError, match=msg):
        m.classify(x)
    torch._dynamo.reset()
    try:
        with pytest.raises(Exception, match=msg):
            torch.compile(m.classify, backend="eager", fullgraph=True)(x)
    finally:
        torch._dynamo.reset()


def test_versions_name_timm_and_triton_without_importing_them(monkeypatch):
    """results.json's versions: timm from its distribution (importing it costs seconds), triton
    from the module a run imported, else from whichever distribution ships it."""
    import sys
    from importlib.metadata import version

    from dietcl_fast import results
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    v = results.versions()
    assert "timm" not in sys.modules and "triton" not in sys.modules
    assert v["timm"] == version("timm") and v["triton"] == version("triton")
    monkeypatch.setitem(sys.modules, "triton", type(sys)("triton"))
    sys.modules["triton"].__version__ = "3.0.0+rocm"          # a pytorch-triton-rocm build
    assert results.versions()["triton"] == "3.0.0+rocm"
