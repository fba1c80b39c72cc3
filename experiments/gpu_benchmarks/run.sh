#!/bin/bash
# The device benchmark: about 10 minutes on one NVIDIA GPU, run from the
# repository root with the machine's own jax (installs nothing from the
# network). Writes JSON records and logs to the folder given as $1, else $OUT,
# else gpu_out/.
#
#   1. a GPU smoke subset of the tests: the kernel choice and every attention
#      kernel against the reference (cuDNN included), the MoE dispatches (the
#      Mosaic GPU ragged dot in bf16 against float32 included);
#   2. `benchmark train` (tokens/s, MFU against the card's bf16 peak, compile
#      time, XLA's memory estimate) for the ~350M dense model, its relaxed
#      recursive sibling (configs/lm350m.py), MoEUT 244M and its dense
#      sibling (configs/moeut.py:accel=1, configs/moeut_dense.py:accel=1:
#      remat dots, 64 x 1024 tokens as 4 micro-batches), all bfloat16 with the
#      kernels `auto` picks (logged: grep 'kernels on');
#   3. `benchmark moe`: the sigma-MoE layer against a dense MLP of equal
#      active FLOPs, per dispatch: 44M float32 (auto = blocks, as the earlier
#      records), 244M bfloat16 with `blocks` and with `ragged_mgpu` (the
#      Mosaic GPU ragged dot; needs a Hopper GPU, dims multiples of 64);
#   4. if time is left: MoEUT 244M trained with `ragged_mgpu`.
#
# Packages the image lacks (the pinned flax does not import on jax 0.11.x, so
# a matching flax may be needed) can travel as wheels in .whl/; they are
# installed from there into /tmp/site, never from an index.
set -u
O=${1:-${OUT:-gpu_out}}; mkdir -p "$O"
if ls .whl/*.whl >/dev/null 2>&1; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
B="python3 -m recursive_lm.benchmark"
T0=$SECONDS
stamp() { echo "[$((SECONDS - T0)) s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$O/gpu.txt"
python3 -c "import jax, flax, optax, orbax.checkpoint, grain; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  | tee -a "$O/gpu.txt" || exit 1

# 1. Smoke tests on the GPU backend (float32 references at full matmul precision, not TF32).
stamp "tests"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 240 python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_kernel_choice.py tests/test_kernels.py tests/test_moe_kernels.py tests/test_moe.py 2>&1 \
  | tail -15 | tee "$O/tests.txt"

# 2. Train steps, bfloat16 compute (the configs' own for lm350m), 5 timed steps each; one log per record.
train() {  # name, then the benchmark's arguments
  local name=$1; shift
  stamp "train $name"
  timeout 150 $B train --verbosity=0 "$@" --steps 5 --out "$O/train_$name.json" > "$O/train_$name.log" 2>&1 \
    || { echo "train $name failed (exit $?):"; tail -5 "$O/train_$name.log"; }
  grep -h "kernels on" "$O/train_$name.log" | tail -1
}
train lm350m_dense --config configs/lm350m.py
train lm350m_relaxed --config configs/lm350m.py:plan=relaxed
# MoEUT 244M and its dense sibling as configured for one GPU (accel=1: bf16, remat dots, 64 x 1024 tokens per
# step as 4 micro-batches of 16).
train moeut244m --config configs/moeut.py:size=244m,accel=1
train dense244m --config configs/moeut_dense.py:size=244m,accel=1

# 3. The sigma-MoE layer against the dense MLP of equal active FLOPs, 4k and 16k tokens, per dispatch.
moe() {  # name, then the benchmark's arguments
  local name=$1; shift
  stamp "moe $name"
  timeout 120 $B moe --moe_batches 4,16 "$@" --out "$O/moe_$name.json" > "$O/moe_$name.log" 2>&1 \
    || { echo "moe $name failed (exit $?):"; tail -5 "$O/moe_$name.log"; }
}
moe 44m                                                      # float32, auto (blocks)
moe 244m_bf16_blocks --moe_size 244m --moe_dtype bfloat16 --moe_dispatch blocks
moe 244m_bf16_mgpu --moe_size 244m --moe_dtype bfloat16 --moe_dispatch ragged_mgpu

# 4. MoEUT 244M with the Mosaic GPU ragged dot, while the run stays near 10 minutes.
if [ $((SECONDS - T0)) -lt 480 ]; then
  train moeut244m_mgpu --config configs/moeut.py:size=244m,accel=1,dispatch=ragged_mgpu
fi

# Summary: one line per train record.
python3 - "$O" <<'EOF'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "train_*.json"))):
  r = json.load(open(path))
  mem = (r.get("memory_bytes") or {}).get("total", 0) / 2**30
  print(f"{os.path.basename(path):28s} {r['tokens_per_s']:>12,.0f} tok/s  mfu {r['mfu']:.3f}  "
        f"compile {r['compile_s']:.0f} s  mem {mem:.1f} GiB  {r['device']}")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "moe_*.json"))):
  r = json.load(open(path))
  print(f"{os.path.basename(path):28s} {r['size']} {r['dtype']} {r['dispatch']:12s} moe/dense fwd+bwd "
        + "  ".join(f"{x['tokens']}: {x['ratio_fwd_bwd']:.2f}x ({x['moe_fwd_bwd_tok_s']:,.0f} tok/s)" for x in r["results"]))
EOF
stamp "done"
