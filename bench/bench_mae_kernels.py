#!/usr/bin/env python
"""Thin wrapper kept for old command lines: runs `dietcl-fast bench kernels ARGS...`
(the code lives in dietcl_fast/bench/kernels.py; see `dietcl-fast bench kernels --help`)."""
import sys

from dietcl_fast.cli.main import main

if __name__ == "__main__":
    main(["bench", "kernels", *sys.argv[1:]])
