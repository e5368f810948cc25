#!/usr/bin/env python
"""Thin wrapper kept for old command lines: runs `dietcl-fast bench loader ARGS...`
(the code lives in dietcl_fast/bench/loader.py; see `dietcl-fast bench loader --help`)."""
import sys

from dietcl_fast.cli.main import main

if __name__ == "__main__":
    main(["bench", "loader", *sys.argv[1:]])
