import numpy as np
import pytest
import torch

from dietcl_fast.data.mixup import mixup_cutmix, smooth_one_hot
from dietcl_fast.data.sampling import EpochSampler
from dietcl_fast.seeding import derive_seed
from dietcl_fast.data.transforms import (Augment, eval_resize_crop, random_resized_crop_boxes,
                                         to_channels)


def test_rrc_boxes_inside_image_and_scaled():
    g = torch.Generator().manual_seed(1)
    x0, y0, w, h = random_resized_crop_boxes(2000, 28, 40, scale=(0.2, 1.0), generator=g)
    assert torch.all(x0 >= 0) and torch.all(y0 >= 0)
    assert torch.all(x0 + w <= 40) and torch.all(y0 + h <= 28)
    area = (w * h) / (28 * 40)
    assert area.min() >= 0.15 and area.max() <= 1.0
    assert area.std() > 0.1                                   # really random


def test_augment_shapes_determinism_and_flip():
    aug = Augment(size=16, channels=3)
    x = torch.randint(0, 256, (5, 1, 20, 20), dtype=torch.uint8)
    a = aug(x, "labeled", generator=torch.Generator().manual_seed(3))
    b = aug(x, "labeled", generator=torch.Generator().manual_seed(3))
    c = aug(x, "labeled", generator=torch.Generator().manual_seed(4))
    assert a.shape == (5, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    e = aug(x, "eval")
    assert e.shape == (5, 3, 16, 16)
    with pytest.raises(ValueError, match="unknown transform kind"):
        aug(x, "test")


def test_eval_resize_crop_is_centre():
    x = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32)
    y = eval_resize_crop(x, 28, crop_pct=0.875)     # 28 / 0.875 = 32: no resize, centre 28
    assert torch.equal(y, x[:, :, 2:30, 2:30])


def test_channel_conversion():
    g = torch.rand(2, 1, 4, 4)
    assert torch.equal(to_channels(g, 3)[:, 2], g[:, 0])
    rgb = torch.rand(2, 3, 4, 4)
    assert torch.allclose(to_channels(rgb, 1)[:, 0],
                          0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])


def test_mixup_targets_are_distributions():
    x = torch.rand(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for seed in range(10):
        xm, t = mixup_cutmix(x, y, 3, torch.Generator().manual_seed(seed))
        assert xm.shape == x.shape
        assert torch.allclose(t.sum(1), torch.ones(6))
        assert (t > 0).all()                                   # label smoothing
    t0 = smooth_one_hot(y, 3, 0.1)
    assert torch.allclose(t0[0], torch.tensor([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]))


def test_epoch_sampler_pure_function_and_epochs():
    ids = np.arange(100, 110)
    s = EpochSampler(ids, seed=0, key=(1, 2))
    first = s.draw(0, 10)
    assert sorted(first) == list(ids)                          # one epoch: each id once
    assert np.array_equal(s.draw(3, 4), first[3:7])
    assert np.array_equal(EpochSampler(ids, 0, (1, 2)).draw(12, 5), s.draw(12, 5))
    second = s.draw(10, 10)
    assert sorted(second) == list(ids) and not np.array_equal(first, second)
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 2, 4)


def test_rrc_falls_back_to_the_clamped_centre_crop():
    from dietcl_fast.data.transforms import centre_fallback
    assert centre_fallback(100, 10, (3 / 4, 4 / 3)) == (13, 10)      # too wide: clamp to 4:3
    assert centre_fallback(10, 100, (3 / 4, 4 / 3)) == (10, 13)      # too tall: clamp to 3:4
    assert centre_fallback(30, 28, (3 / 4, 4 / 3)) == (30, 28)
    # a scale no random box can satisfy forces the fallback for every image
    x0, y0, w, h = random_resized_crop_boxes(5, 10, 100, scale=(2.0, 3.0),
                                             generator=torch.Generator().manual_seed(0))
    assert torch.all(w == 13) and torch.all(h == 10)
    assert torch.all(x0 == (100 - 13) // 2) and torch.all(y0 == 0)


def test_eager_and_host_drawn_mix_share_one_draw(monkeypatch):
    """`mixup_cutmix` (eager methods) and `mix_draw_flat` (the compiled step) take their
    Mixup/CutMix from the one `draw_mix`: a box it returns is the box both cut, a lam both use."""
    from dietcl_fast.data import mixup as M
    x = torch.rand(4, 2, 6, 5)
    y = torch.tensor([0, 1, 2, 1])
    monkeypatch.setattr(M, "draw_mix", lambda rng, h, w, *a: (0.7, (1, 3, 2, 5)))
    xm, t = M.mixup_cutmix(x, y, 3, torch.Generator().manual_seed(0))
    box = torch.zeros(6, 5, dtype=torch.bool)
    box[1:3, 2:5] = True
    assert torch.equal(xm[:, :, box], x.flip(0)[:, :, box])
    assert torch.equal(xm[:, :, ~box], x[:, :, ~box])
    t0 = smooth_one_hot(y, 3, 0.1)
    assert torch.allclose(t, t0 * 0.7 + t0.flip(0) * 0.3)
    draw = M.unpack_mix_draw(torch.from_numpy(M.mix_draw_flat(0, 4, 6, 5)), 6, 5)
    assert torch.equal(draw.b[0, 0] == 1, box) and torch.equal(draw.a[0, 0] == 0, box)
    assert draw.lam.tolist() == pytest.approx([0.7, 0.3])
    monkeypatch.setattr(M, "draw_mix", lambda rng, h, w, *a: (0.25, None))
    xm, _ = M.mixup_cutmix(x, y, 3, torch.Generator().manual_seed(0))
    assert torch.allclose(xm, x * 0.25 + x.flip(0) * 0.75)
    draw = M.unpack_mix_draw(torch.from_numpy(M.mix_draw_flat(0, 4, 6, 5)), 6, 5)
    assert torch.all(draw.a == 0.25) and torch.all(draw.b == 0.75)


@pytest.mark.parametrize("alphas", [(0.8, 1.0), (0.0, 1.0), (0.8, 0.0)])
def test_eager_mix_equals_the_host_drawn_mix(alphas):
    """The same generator gives the same mixed images and targets both ways."""
    from dietcl_fast.data.mixup import apply_mix, mix_draw_from
    y = torch.tensor([0, 1, 2, 0, 1])
    for seed in range(40):
        x = torch.rand(5, 1, 9, 7, generator=torch.Generator().manual_seed(seed))
        xm, t = mixup_cutmix(x, y, 3, torch.Generator().manual_seed(seed), *alphas)
        draw = mix_draw_from(torch.Generator().manual_seed(seed), 5, 9, 7, *alphas)
        xp, tp = apply_mix(x, smooth_one_hot(y, 3, 0.1), draw)
        assert torch.allclose(xm, xp, atol=1e-6) and torch.allclose(t, tp, atol=1e-6)
