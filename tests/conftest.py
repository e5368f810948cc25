import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

# two cores: keep torch from oversubscribing when pytest-xdist is not used
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_spec():
    from dietcl_fast.models import ModelSpec
    return ModelSpec(img_size=16, patch_size=4, in_chans=1, embed_dim=24, depth=2, num_heads=2,
                     mlp_ratio=2.0, decoder_embed_dim=16, decoder_depth=1,
                     decoder_num_heads=2).validate()


class FlopRegions:
    """A Trainer `train_region` factory: every training pass runs inside its own
    FlopCounterMode (which clears its counts on entry), and the totals are kept here."""

    def __init__(self):
        self.counts: list[int] = []

    @property
    def total(self) -> int:
        return sum(self.counts)

    def __call__(self):
        from torch.utils.flop_counter import FlopCounterMode
        counts = self.counts

        class Region:
            def __enter__(self):
                self.m = FlopCounterMode(display=False)
                self.m.__enter__()

            def __exit__(self, *exc):
                self.m.__exit__(*exc)
                counts.append(self.m.get_total_flops())
        return Region()


@pytest.fixture
def flop_regions():
    return FlopRegions()
