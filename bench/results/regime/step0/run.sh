#!/usr/bin/env bash
# step-0 study: one time step of 20 classes, 1% labels (9/class), budget 100, from $PT
cd /work/wt/table && . .venv/bin/activate && export DIETCL_CACHE=/root/.cache/dietcl-fast OMP_NUM_THREADS=1
PT=${PT:-/tmp/inv/pt500.pth}
common="--data glyphs:classes=20,per_class=1000 --time-steps 1 --label-rate 0.01 --eval-fraction 0.1 --budget 100 --pretrained $PT --seeds ${SEEDS:-0,1,2} --no-progress"
name=$1; shift
dietcl-fast compare $common --out /tmp/s0/$TAG-$name "$@" > /tmp/s0/$TAG-$name.log 2>&1
echo "$name done: $(grep -E '^\| ' /tmp/s0/$TAG-$name/compare.md | head -6 | tr '\n' ' ')"
