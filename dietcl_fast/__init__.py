"""dietcl-fast: DietCL (semi-supervised continual learning under a compute budget), fast and
with an honest ledger of every pass."""
__version__ = "0.1.0"
