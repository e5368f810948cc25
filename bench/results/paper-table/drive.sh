#!/usr/bin/env bash
# the table in the order that matters: Table 1 class, Table 2, then Table 1 time, then the sweeps
cd /work/wt/table && . .venv/bin/activate && export DIETCL_CACHE=/root/.cache/dietcl-fast
O=bench/results/paper-table
python bench/paper_table.py --out $O --jobs 2 --parts main,ablation --cells main-class,ablation-no-Lr,ablation-no-Lb,ablation-no-buffer-only-phase,ablation-w_r-1 >> $O/driver.out 2>> $O/driver.err
python bench/paper_table.py --out $O --jobs 2 --parts main,ablation,budget,labels,length >> $O/driver.out 2>> $O/driver.err
