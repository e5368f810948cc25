"""The `dietcl-fast` command line (installed as dietcl_fast.cli)."""
# the method registry first: each method's own options join the config tree, from which the
# command line's options are made
from dietcl_fast import methods as _methods  # noqa: F401
