"""`dietcl-fast bench`: the benchmarks, as library code the CLI calls.

Every benchmark prints a markdown table, writes JSON (`--out FILE`) and reports a ratio against
a baseline measured in the same run: `step` compiled over eager (`speedup`), `kernels` fused
over eager, `loader` with over without a training step running (both directions), `buffer`
native over numpy, `flops` achieved over the matmul peak measured in the same run (MFU),
`engines` DeepSpeed ZeRO stages over the torch engine. Each has a tiny CPU mode, run by the
test suite as a real `dietcl-fast bench ...` process.
"""
