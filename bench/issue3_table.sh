#!/usr/bin/env bash
# DietCL vs ER vs fine-tune on Animal-MNIST (class-incremental, 5 time steps), label rates 1% and
# 5%, seeds 0-2, one budget; then a mean ± std table. Usage: bash bench/issue3_table.sh [BUDGET]
set -euo pipefail
B=${1:-100}
OUT=${OUT_DIR:-runs/issue3-b$B}
for lr in 0.01 0.05; do for m in dietcl er finetune; do for s in 0 1 2; do
  d=$OUT/$m-lr$lr-s$s
  if [ -f $d/results.json ]; then continue; fi
  if [ -f $d/latest.pt ]; then dietcl-fast train --resume $d --no-progress
  else dietcl-fast train --method $m --label-rate $lr --seed $s --budget $B --out $d --no-progress; fi
done; done; done 2>&1 | grep -E "^A\(T\)|optimiser steps" || true
python bench/summarise_runs.py $OUT
