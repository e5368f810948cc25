"""Kill-and-resume tests: a real `dietcl-fast` process killed (SIGKILL) at a known point.

`exit_after(n)` is the environment for a process to start with: it puts `killsite/` on
PYTHONPATH, whose `sitecustomize` (Python imports it at start-up) patches the package, in that
process only, as it is imported:

* training (`Trainer.run`): once an iteration ends with n optimiser steps done (after its
  progress record and any checkpoint at the --ckpt-every cadence), the checkpoint write in
  flight is waited for, then the process kills itself; a kill during a write would resume from
  the checkpoint before, which the tests could not predict;
* pretraining (`Pretrainer.run`): right after its n-th optimiser step, before any state is
  written for it.

Nothing in the package knows about it. A killed process's exit status is `EXIT_STATUS`."""
import os
import signal

SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "killsite")
KILL_AFTER = "DIETCL_FAST_TEST_KILL_AFTER"
EXIT_STATUS = -signal.SIGKILL           # subprocess's returncode of a process killed by SIGKILL


def exit_after(n: int) -> dict:
    """The environment entries that make a run started with them die after n optimiser steps."""
    path = os.environ.get("PYTHONPATH", "")
    return {KILL_AFTER: str(int(n)), "PYTHONPATH": SITE + (os.pathsep + path if path else "")}
