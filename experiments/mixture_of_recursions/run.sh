#!/usr/bin/env bash
# Mixture-of-Recursions against the recursive model and vanilla, at equal parameters and at equal training FLOPs.
# Usage: bash experiments/mixture_of_recursions/run.sh [OUTDIR] [SEEDS] [STEPS]
# Defaults: OUTDIR=runs/mixture_of_recursions SEEDS="0 1 2" STEPS=300.
# Every run: configs/mor.py (middle-cycle: a unique first block, 2 unique blocks x 3 recursions, a unique last
# block) at d_model 128, mlp 384, 64-byte sequences, batch 16, on the whole stdlib corpus. Equal parameters:
#   mor       expert routing, capacities 1, 2/3, 1/3 (0.754 of the recursive model's FLOPs per token)
#   recursive the same plan, no routers (every token takes all 3 recursions)
#   vanilla   the 4 unique blocks once each (4 layers, 0.509 of the recursive model's FLOPs)
#   relaxed   the recursive model with rank-4 per-depth LoRA on every projection (+6.9 % parameters, +3.4 % FLOPs)
# all for STEPS steps; equal training FLOPs (the recursive model's STEPS steps): mor_flops and vanilla_flops run
# STEPS / 0.754 and STEPS / 0.509 steps (from `describe`'s flops_per_token). Summarise with summarise.py OUTDIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/mixture_of_recursions}; SEEDS=${2:-"0 1 2"}; STEPS=${3:-300}
mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR="$OUT/jax_cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
WIDTH=(--config.model.d_model=128 --config.model.mlp_dim=384 --config.data.seq_len=64 --config.data.batch_size=16
       --config.data.max_bytes=0 --config.optim.warmup_steps=30 --config.train.log_every=50
       --config.train.eval_batches=8)
VANILLA=(--config.model.plan.preset=vanilla --config.model.plan.num_layers=4 --config.model.plan.repeats=1)
# Steps at equal training FLOPs: STEPS * (recursive FLOPs/token) / (the variant's), from `describe`.
read -r MOR_FLOPS_STEPS VAN_FLOPS_STEPS < <(python - "$STEPS" "${WIDTH[@]:0:3}" <<'PY'
import json, subprocess, sys
steps, width = int(sys.argv[1]), sys.argv[2:]
def flops(arg, *extra):
  out = subprocess.run([sys.executable, "-m", "recursive_lm.describe", "--config", f"configs/mor.py:{arg}", *width,
                        *extra], check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])["flops_per_token"]
rec = flops("routing=none")
van = flops("routing=none", "--config.model.plan.preset=vanilla", "--config.model.plan.num_layers=4",
            "--config.model.plan.repeats=1")
print(round(steps * rec / flops("routing=expert")), round(steps * rec / van))
PY
)
echo "equal FLOPs: mor $MOR_FLOPS_STEPS steps, vanilla $VAN_FLOPS_STEPS steps (recursive $STEPS)"
run() {  # name, steps, config arg, extra flags...
  local name=$1 steps=$2 arg=$3; shift 3
  local wd="$OUT/$name"
  [ -f "$wd/done" ] && return
  rm -rf "$wd"
  python -m recursive_lm.train --config "configs/mor.py:$arg" --workdir "$wd" "${WIDTH[@]}" "$@" \
    --config.train.steps=$steps --config.train.eval_every=$steps --config.train.checkpoint_every=$steps > "$wd.log" 2>&1
  touch "$wd/done"
}
for seed in $SEEDS; do
  run "mor_s$seed" "$STEPS" routing=expert --config.seed=$seed
  run "recursive_s$seed" "$STEPS" routing=none --config.seed=$seed
  run "vanilla_s$seed" "$STEPS" routing=none --config.seed=$seed "${VANILLA[@]}"
  run "relaxed_s$seed" "$STEPS" routing=none --config.seed=$seed --config.model.lora.rank=4
  run "mor_flops_s$seed" "$MOR_FLOPS_STEPS" routing=expert --config.seed=$seed
  run "vanilla_flops_s$seed" "$VAN_FLOPS_STEPS" routing=none --config.seed=$seed "${VANILLA[@]}"
done
python experiments/mixture_of_recursions/summarise.py "$OUT"
