#!/usr/bin/env python
"""Thin wrapper kept for old command lines: runs `dietcl-fast bench buffer ARGS...`
(the code lives in dietcl_fast/bench/buffer.py; see `dietcl-fast bench buffer --help`)."""
import sys

from dietcl_fast.cli.main import main

if __name__ == "__main__":
    main(["bench", "buffer", *sys.argv[1:]])
