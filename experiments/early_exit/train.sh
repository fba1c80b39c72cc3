#!/usr/bin/env bash
# Train the early-exit experiment's models (experiments/early_exit/config.py) at low priority, the seeds in
# parallel (on a shared CPU the wall time is set by contention, not by the runs' own compute).
# Usage: bash experiments/early_exit/train.sh [OUT] [SEEDS] [STEPS] [BASELINE]
# Defaults: OUT=/work/runs/early_exit SEEDS="0 1 2" STEPS=250 BASELINE=0. Workdirs OUT/exit_s<seed> (exit
# losses 0.25,0.25,0.25,1); BASELINE=1 adds OUT/plain_s0 (no exit losses). Logs: OUT/<name>.train.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/work/runs/early_exit}; SEEDS=${2-"0 1 2"}; STEPS=${3:-250}; BASELINE=${4:-0}  # SEEDS="": none
mkdir -p "$OUT"
run() {  # name, config variant
  local wd="$OUT/$1"
  if [ -f "$wd/done" ]; then return; fi
  rm -rf "$wd"
  nice -n 10 python -m recursive_lm.train --config "experiments/early_exit/config.py:$2,steps=$STEPS" \
    --workdir "$wd" > "$wd.train.log" 2>&1
  touch "$wd/done"
}
for seed in $SEEDS; do run "exit_s$seed" "seed=$seed" & done
if [ "$BASELINE" = 1 ]; then run plain_s0 "seed=0,exit_weights=none" & fi
wait
