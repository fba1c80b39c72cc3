#!/bin/bash
# GPU benchmark records, run from the repository root on a machine with one
# NVIDIA GPU. Writes JSON records and a log to $OUT (default: gpu_out/).
# Packages missing on the machine can travel as wheels in .whl/ (installed
# into /tmp/site first).
set -u
O=${OUT:-gpu_out}; mkdir -p "$O"
if ls .whl/*.whl >/dev/null 2>&1; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
B="python3 -m recursive_lm.benchmark"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$O/gpu.txt"
python3 -c "import jax, flax, optax, orbax.checkpoint, grain; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
# sigma-MoE layer vs the dense MLP of equal active FLOPs, 4k and 16k tokens: auto (= blocks on GPU),
# and jax.lax.ragged_dot for comparison.
$B moe --moe_batches 4 --out "$O/moe_44m_b4.json"
$B moe --moe_batches 16 --out "$O/moe_44m_b16.json"
$B moe --moe_batches 4 --moe_dispatch ragged --out "$O/moe_44m_b4_ragged.json"
# Train steps in bfloat16: the d512 model of the CPU records at a GPU-sized batch, and MoEUT 44M.
D512="--config configs/vanilla.py --config.model.d_model=512 --config.model.num_heads=8 --config.model.num_kv_heads=8
      --config.model.mlp_dim=1376 --config.model.plan.num_layers=8 --config.data.seq_len=512
      --config.model.max_seq_len=512 --config.model.compute_dtype=bfloat16"
$B train $D512 --config.data.batch_size=64 --steps 10 --out "$O/train_d512_bf16_b64.json"
$B train --config configs/moeut.py:size=44m --config.model.compute_dtype=bfloat16 --config.data.batch_size=16 \
   --steps 5 --out "$O/train_moeut44m_bf16_b16.json"
$B train --config configs/moeut_dense.py:size=44m --config.model.compute_dtype=bfloat16 --config.data.batch_size=16 \
   --steps 5 --out "$O/train_dense44m_bf16_b16.json"
# Correctness of the kernels and MoE dispatch on the GPU backend.
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_moe.py 2>&1 | tail -15
