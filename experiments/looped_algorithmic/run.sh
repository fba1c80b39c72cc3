#!/usr/bin/env bash
# Looped vs unique vs single block on parity. Usage:
#   bash experiments/looped_algorithmic/run.sh [OUTDIR] [SEEDS] [STEPS]
# Trains 3 models per seed, then writes OUTDIR/results.jsonl via analyse.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/looped_algorithmic}; SEEDS=${2:-"0 1"}; STEPS=${3:-600}
TASK="task=parity,train_lengths=1-6,eval_lengths=7-12,steps=$STEPS,d_model=64"
mkdir -p "$OUT"
for seed in $SEEDS; do
  for v in "looped_1x4|plan=looped,depth=4" "unique_4|plan=vanilla,depth=4" "single_1x1|plan=looped,depth=1"; do
    name=${v%%|*}; wd="$OUT/${name}_s$seed"
    [ -d "$wd/checkpoints/$STEPS" ] && continue
    rm -rf "$wd"
    python -m recursive_lm.train --config "configs/algorithmic.py:$TASK,${v#*|}" --workdir "$wd" \
      --config.seed=$seed > "$wd.log" 2>&1
  done
done
python experiments/looped_algorithmic/analyse.py "$OUT"
