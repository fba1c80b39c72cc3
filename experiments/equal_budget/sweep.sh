#!/usr/bin/env bash
# Equal-width, equal-effective-depth comparison of depth plans on the stdlib byte corpus.
# Usage: bash experiments/equal_budget/sweep.sh [OUTDIR] [STEPS] [SEEDS]
# Defaults: OUTDIR=runs/equal_budget STEPS=500 SEEDS="0 1 2". Prints one TSV line per run
# and writes OUTDIR/results.tsv; summarise with experiments/equal_budget/summarise.py OUTDIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/equal_budget}; STEPS=${2:-500}; SEEDS=${3:-"0 1 2"}
mkdir -p "$OUT"
# name|config  (all: size=tiny width d_model=32, effective depth 6)
VARIANTS=(
  "vanilla|configs/vanilla.py:size=tiny,num_layers=6"
  "cycle_R2|configs/recursive.py:size=tiny,order=cycle,repeats=2,num_layers=6"
  "sequence_R2|configs/recursive.py:size=tiny,order=sequence,repeats=2,num_layers=6"
  "relaxed_r4|configs/relaxed.py:size=tiny,order=cycle,repeats=2,num_layers=6,lora_rank=4"
  "relaxed_r8|configs/relaxed.py:size=tiny,order=cycle,repeats=2,num_layers=6,lora_rank=8"
  "sandwich|configs/sandwich.py:size=tiny,num_layers=6"
  "middle_cycle_R2|configs/middle.py:size=tiny,order=cycle,repeats=2,num_layers=6"
)
COMMON=(--config.train.steps=$STEPS --config.data.batch_size=16 --config.optim.warmup_steps=20
        --config.train.eval_every=$STEPS --config.train.checkpoint_every=$STEPS --config.train.log_every=100
        --config.train.eval_batches=8)
for seed in $SEEDS; do
  for v in "${VARIANTS[@]}"; do
    name=${v%%|*}; cfg=${v#*|}; wd="$OUT/${name}_s$seed"
    if [ -f "$wd/final.json" ]; then continue; fi
    rm -rf "$wd"
    params=$(python -m recursive_lm.describe --config "$cfg" 2>/dev/null | python -c 'import json,sys; d=json.load(sys.stdin); print(d["total_params"], d["unique_blocks"])')
    t0=$(date +%s)
    python -m recursive_lm.train --config "$cfg" --workdir "$wd" --config.seed=$seed "${COMMON[@]}" > "$wd.log" 2>&1
    t1=$(date +%s)
    bpb=$(python -m recursive_lm.evaluate --workdir "$wd" 2>/dev/null | python -c 'import json,sys; print(json.load(sys.stdin)["bits_per_byte"])')
    echo "{\"name\": \"$name\", \"seed\": $seed, \"params\": ${params% *}, \"unique_blocks\": ${params#* }, \"bpb\": $bpb, \"seconds\": $((t1-t0))}" | tee "$wd/final.json" >> "$OUT/results.jsonl"
  done
done
