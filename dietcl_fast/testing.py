"""Hooks for the test suite only; nothing a user configures.

DIETCL_FAST_TEST_EXIT_AFTER_STEPS=N makes a training or pretraining run die abruptly (exit
status 17, as a killed process would) once N optimiser steps are done and the checkpoint write
in flight is on disk, so kill-and-resume tests resume from a known position (a real kill
during a write resumes from the previous checkpoint). Read once, when a run starts."""
from __future__ import annotations

import os
from typing import Optional

EXIT_AFTER_STEPS = "DIETCL_FAST_TEST_EXIT_AFTER_STEPS"
EXIT_STATUS = 17


def exit_after_steps() -> Optional[int]:
    """N from the environment, or None (unset: the run is never cut short)."""
    v = os.environ.get(EXIT_AFTER_STEPS)
    if v is None or v == "":
        return None
    if not v.isdigit() or int(v) < 1:
        raise ValueError(f"{EXIT_AFTER_STEPS}={v!r}: a whole number >= 1 (a test hook)")
    return int(v)


def exit_now() -> None:
    os._exit(EXIT_STATUS)


def exit_after(n: int) -> dict:
    """The environment entry that makes a run started with it exit after n optimiser steps."""
    return {EXIT_AFTER_STEPS: str(int(n))}
