#!/usr/bin/env bash
# Depth plans on the stdlib byte corpus, at equal width or at equal parameter count.
# Usage: bash experiments/equal_budget/sweep.sh [OUTDIR] [STEPS] [SEEDS] [SET]
# Defaults: OUTDIR=runs/equal_budget STEPS=500 SEEDS="0 1 2" SET=width.
#   SET=width:  every plan at d_model 32, effective depth 6 (equal FLOPs, fewer params when tied).
#   SET=params: tied plans widened (d_model, mlp_dim) to vanilla's 70k parameters, depth 6.
# Appends one JSON line per run to OUTDIR/results.jsonl; summarise with summarise.py OUTDIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/equal_budget}; STEPS=${2:-500}; SEEDS=${3:-"0 1 2"}; SET=${4:-width}
mkdir -p "$OUT"
# name|config|extra overrides
if [ "$SET" = width ]; then VARIANTS=(
  "vanilla|configs/vanilla.py:size=tiny,num_layers=6"
  "cycle_R2|configs/recursive.py:size=tiny,order=cycle,repeats=2,num_layers=6"
  "sequence_R2|configs/recursive.py:size=tiny,order=sequence,repeats=2,num_layers=6"
  "relaxed_r4|configs/relaxed.py:size=tiny,order=cycle,repeats=2,num_layers=6,lora_rank=4"
  "relaxed_r8|configs/relaxed.py:size=tiny,order=cycle,repeats=2,num_layers=6,lora_rank=8"
  "sandwich|configs/sandwich.py:size=tiny,num_layers=6"
  "middle_cycle_R2|configs/middle.py:size=tiny,order=cycle,repeats=2,num_layers=6"
)
elif [ "$SET" = params ]; then VARIANTS=(  # total params within 1% of vanilla's 70,048 (describe)
  "vanilla|configs/vanilla.py:size=tiny,num_layers=6"
  "vanilla_L3|configs/vanilla.py:size=tiny,num_layers=3"  # the cycle_R2 width-32 params, half the depth
  "cycle_R2_d44|configs/recursive.py:size=tiny,order=cycle,repeats=2,num_layers=6|--config.model.d_model=44 --config.model.mlp_dim=88"
  "sequence_R2_d44|configs/recursive.py:size=tiny,order=sequence,repeats=2,num_layers=6|--config.model.d_model=44 --config.model.mlp_dim=88"
  "relaxed_r4_d40|configs/relaxed.py:size=tiny,order=cycle,repeats=2,num_layers=6,lora_rank=4|--config.model.d_model=40 --config.model.mlp_dim=68"
  "sandwich_d44|configs/sandwich.py:size=tiny,num_layers=6|--config.model.d_model=44 --config.model.mlp_dim=88"
  "middle_cycle_R2_d40|configs/middle.py:size=tiny,order=cycle,repeats=2,num_layers=6|--config.model.d_model=40 --config.model.mlp_dim=70"
)
else echo "unknown SET=$SET (width|params)" >&2; exit 2; fi
COMMON=(--config.train.steps=$STEPS --config.data.batch_size=16 --config.optim.warmup_steps=20
        --config.train.eval_every=$STEPS --config.train.checkpoint_every=$STEPS --config.train.log_every=100
        --config.train.eval_batches=8)
for seed in $SEEDS; do
  for v in "${VARIANTS[@]}"; do
    IFS='|' read -r name cfg extra <<< "$v"; wd="$OUT/${name}_s$seed"
    read -r -a EXTRA <<< "${extra:-}"
    if [ -f "$wd/final.json" ]; then continue; fi
    rm -rf "$wd"
    params=$(python -m recursive_lm.describe --config "$cfg" ${EXTRA[@]+"${EXTRA[@]}"} 2>/dev/null | python -c 'import json,sys; d=json.load(sys.stdin); print(d["total_params"], d["unique_blocks"], d["flops_per_token"])')
    read -r nparams nblocks flops <<< "$params"
    t0=$(date +%s)
    python -m recursive_lm.train --config "$cfg" --workdir "$wd" --config.seed=$seed "${COMMON[@]}" ${EXTRA[@]+"${EXTRA[@]}"} > "$wd.log" 2>&1
    t1=$(date +%s)
    bpb=$(python -m recursive_lm.evaluate --workdir "$wd" 2>/dev/null | python -c 'import json,sys; print(json.load(sys.stdin)["bits_per_byte"])')
    echo "{\"name\": \"$name\", \"seed\": $seed, \"params\": $nparams, \"unique_blocks\": $nblocks, \"flops_per_token\": $flops, \"bpb\": $bpb, \"seconds\": $((t1-t0))}" | tee "$wd/final.json" >> "$OUT/results.jsonl"
  done
done
