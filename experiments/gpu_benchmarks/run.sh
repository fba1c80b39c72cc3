#!/bin/bash
# The device benchmark: about 10 minutes on one NVIDIA GPU, run from the
# repository root with the machine's own jax (installs nothing from the
# network). Writes JSON records and logs to the folder given as $1, else $OUT,
# else gpu_out/.
#
#   1. a GPU smoke subset of the tests: the kernel choice and every attention
#      kernel against the reference (cuDNN included), the MoE dispatch;
#   2. `benchmark train` (tokens/s, MFU against the card's bf16 peak, compile
#      time, XLA's memory estimate) for the ~350M dense model, its relaxed
#      recursive sibling (configs/lm350m.py), MoEUT 244M and its dense
#      sibling (configs/moeut.py, configs/moeut_dense.py), all bfloat16 with
#      the kernels `auto` picks (logged: grep 'kernels on' in the logs);
#   3. `benchmark moe`: the sigma-MoE layer against a dense MLP.
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
  tests/test_kernel_choice.py tests/test_kernels.py tests/test_moe.py 2>&1 | tail -15 | tee "$O/tests.txt"

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
BF16="--config.model.compute_dtype=bfloat16 --config.model.remat=dots --config.data.batch_size=16"
train moeut244m --config configs/moeut.py:size=244m $BF16
train dense244m --config configs/moeut_dense.py:size=244m $BF16

# 3. The sigma-MoE layer (44M sizes) against the dense MLP of equal active FLOPs, 4k and 16k tokens.
stamp "moe"
timeout 120 $B moe --moe_batches 4,16 --out "$O/moe_44m.json" > "$O/moe_44m.log" 2>&1 \
  || { echo "moe failed:"; tail -5 "$O/moe_44m.log"; }

# Summary: one line per train record.
python3 - "$O" <<'EOF'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "train_*.json"))):
  r = json.load(open(path))
  mem = (r.get("memory_bytes") or {}).get("total", 0) / 2**30
  print(f"{os.path.basename(path):28s} {r['tokens_per_s']:>12,.0f} tok/s  mfu {r['mfu']:.3f}  "
        f"compile {r['compile_s']:.0f} s  mem {mem:.1f} GiB  {r['device']}")
EOF
stamp "done"
