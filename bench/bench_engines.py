#!/usr/bin/env python
"""Thin wrapper kept for old command lines: runs `dietcl-fast bench engines ARGS...`
(the code lives in dietcl_fast/bench/engines.py; see `dietcl-fast bench engines --help`)."""
import sys

from dietcl_fast.cli.main import main

if __name__ == "__main__":
    main(["bench", "engines", *sys.argv[1:]])
