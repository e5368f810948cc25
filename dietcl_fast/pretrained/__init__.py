"""MAE encoders shipped inside the package, selected by name (`--pretrained glyphs-mae-tiny`).

Each entry names its file in this directory (official MAE layout: weights under `model`, encoder
and decoder), the SHA-256 that file must have (checked before it is read), the model preset it
fits, and how it was made (docs/pretrained.md; the command is in `bench/`). Pure data: no torch.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Shipped:
    file: str
    sha256: str
    preset: str             # the model preset it fits
    in_chans: int
    what: str               # what it was trained on, and the command that made it

    @property
    def path(self) -> str:
        return str(HERE / self.file)


SHIPPED: dict[str, Shipped] = {
    "glyphs-mae-tiny": Shipped(
        file="glyphs-mae-tiny.pth",
        sha256="cc42d243bf99cd75a796170ade1a82633a8c4250a8da5ba494d294164f8b9460",
        preset="cpu-tiny", in_chans=3,
        what="cpu-tiny MAE (encoder + decoder) pretrained on the glyphs pretraining classes, "
             "which no glyphs stream shows (749 classes x 100 images, 32 px RGB): 3,000 steps "
             "x 256 images, blr 4e-3, warm-up 5 %, cosine; `dietcl-fast bench pretrain-glyphs "
             "--install` (bench/results/glyphs-mae-tiny/)"),
}


def is_shipped(name) -> bool:
    return isinstance(name, str) and name in SHIPPED


def shipped_file(name: str) -> str:
    """A shipped encoder's name -> its file, once its SHA-256 is checked; ValueError naming the
    file when it is missing, damaged or replaced."""
    s = SHIPPED[name]
    if not os.path.isfile(s.path):
        raise ValueError(f"--pretrained {name}: the shipped file {s.path} is missing "
                         "(reinstall the package)")
    with open(s.path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != s.sha256:
        raise ValueError(f"--pretrained {name}: {s.path} has SHA-256 {digest}, not the shipped "
                         f"{s.sha256} (damaged or replaced; reinstall the package)")
    return s.path
