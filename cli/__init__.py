"""The `dietcl-fast` command line (installed as dietcl_fast.cli)."""
