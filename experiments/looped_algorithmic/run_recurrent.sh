#!/usr/bin/env bash
# The recurrent plan (input injection) on parity, loop counts sampled in training. Usage:
#   bash experiments/looped_algorithmic/run_recurrent.sh [OUTDIR] [SEEDS] [STEPS]
# prelude 1, core 1 block, coda 1 (the looped 1x4's widths); train loops uniform in [1, 8], last 4
# differentiated; concat injection. Then analyse_recurrent.py: accuracy per length at fixed test-time
# loop counts and at loops = n (the input length).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/looped_algorithmic_recurrent}; SEEDS=${2:-"0 1"}; STEPS=${3:-600}
TASK="task=parity,train_lengths=1-6,eval_lengths=7-12,steps=$STEPS,d_model=64,plan=recurrent,depth=6,repeats=4"
mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR="$OUT/jax_cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
for seed in $SEEDS; do
  wd="$OUT/recurrent_1x4_s$seed"
  [ -d "$wd/checkpoints/$STEPS" ] && continue
  rm -rf "$wd"
  python -m recursive_lm.train --config "configs/algorithmic.py:$TASK" --workdir "$wd" --config.seed=$seed \
    --config.model.plan.prelude=1 --config.model.plan.coda=1 --config.model.recurrent.injection=concat \
    --config.model.recurrent.sample=uniform --config.model.recurrent.min_loops=1 \
    --config.model.recurrent.max_loops=8 --config.model.recurrent.backprop_depth=4 > "$wd.log" 2>&1
done
python experiments/looped_algorithmic/analyse_recurrent.py "$OUT"
