#!/usr/bin/env bash
# Fixed vs sampled loop counts vs Parcae injection on the stdlib byte corpus, evaluated at 1..32 loops.
# Usage: bash experiments/recurrent_depth/run.sh [OUTDIR] [STEPS] [SEEDS]
# Defaults: OUTDIR=runs/recurrent_depth STEPS=300 SEEDS="0 1 2".
# Every variant: size=tiny widths (d_model 32, mlp 64) on the whole corpus (not tiny's first 200 kB),
# 64-byte sequences, batch 8; prelude 1, core 2 unique blocks, coda 1, trained mean loop count 4 with the
# last 4 iterations differentiated; the same stored parameters for fixed and sampled (parcae's injection
# stores D^2 + 2D instead of concat's 2 D^2). Compiled programs are shared across runs through JAX's
# persistent cache (fixed, sampled and the seeds trace the same program). Writes OUTDIR/<variant>_s<seed>/loops.jsonl (evaluate --loops);
# summarise with summarise.py OUTDIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/recurrent_depth}; STEPS=${2:-300}; SEEDS=${3:-"0 1 2"}
mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR="$OUT/jax_cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
BASE="size=tiny,prelude=1,core=2,coda=1,mean_loops=4,backprop_depth=4,max_loops=16"
VARIANTS=(
  "fixed_r4|$BASE,injection=concat,sample=fixed"
  "sampled|$BASE,injection=concat,sample=poisson_lognormal"
  "parcae_sampled|$BASE,injection=parcae,sample=poisson_lognormal"
)
COMMON=(--config.data.max_bytes=0 --config.data.seq_len=64 --config.data.batch_size=8
        --config.train.steps=$STEPS --config.optim.warmup_steps=30 --config.train.eval_every=$STEPS
        --config.train.checkpoint_every=$STEPS --config.train.log_every=100 --config.train.eval_batches=8)
for seed in $SEEDS; do
  for v in "${VARIANTS[@]}"; do
    name=${v%%|*}; wd="$OUT/${name}_s$seed"
    [ -f "$wd/loops.jsonl" ] && continue
    rm -rf "$wd"
    python -m recursive_lm.train --config "configs/recurrent.py:${v#*|}" --workdir "$wd" --config.seed=$seed \
      "${COMMON[@]}" > "$wd.log" 2>&1
    python -m recursive_lm.evaluate --workdir "$wd" --loops 1,2,4,8,16,32 --batches 8 > "$wd/loops.tmp"
    mv "$wd/loops.tmp" "$wd/loops.jsonl"
  done
done
python experiments/recurrent_depth/summarise.py "$OUT"
