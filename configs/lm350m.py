"""A ~350M-parameter dense language model and its relaxed recursive sibling,
sized for one 80-140 GB GPU (H100 / H200): the models of the device benchmark
(experiments/gpu_benchmarks/run.sh).

  python -m recursive_lm.describe --config configs/lm350m.py --table                  # 341.9M parameters
  python -m recursive_lm.describe --config configs/lm350m.py:plan=relaxed --table     # 187.7M shared + 15.1M LoRA
  python -m recursive_lm.benchmark train --config configs/lm350m.py:plan=relaxed --out t.json
  python -m recursive_lm.train --config configs/lm350m.py:size=tiny --workdir /tmp/t  # seconds on CPU
  python -m recursive_lm.train --config configs/lm350m.py --workdir runs/lm350m \
      --config.data.source=tokens --config.data.tokens_path=DIR   # a token set of <= 32768 ids

  plan      blocks                                     params
  dense     24 untied layers (vanilla)                 341.9M (33.6M of them the embedding)
  relaxed   12 unique blocks x 2 loops (cycle), rank   187.7M shared + 15.1M LoRA = 202.9M
            32 LoRA per effective layer on every projection

Both: d_model 1024, 8 heads x 128 (head size cuDNN flash attention takes),
SwiGLU 2816, 32768-token tied embedding, 24 effective layers, sequences of
2048 tokens in batches of 16 (32k tokens per step). bfloat16 compute on
float32 parameters. remat 'dots' keeps the matmul outputs and recomputes the
element-wise work and the attention core in the backward pass (a few percent
more FLOPs). The step runs as 2 micro-batches of 8 x 2048 (optim.grad_accum):
XLA:CPU's memory estimate of the loss+grad at all 16 rows at once is 71.7 GiB
(arguments + temporaries, before the optimizer state), too close to an 80 GB
card; the device benchmark records XLA:GPU's estimate of the compiled step.

Variants (`:key=value,...`): plan=dense|relaxed, size=350m|tiny (tiny:
d_model 64, 4 effective layers, byte data; for tests), lora_rank (relaxed).
"""

from recursive_lm.config import ConfigError, base_config, parse_arg

# d_model, heads, head_dim, mlp_dim, layers, vocab, seq_len, batch
SIZES = {
    "350m": (1024, 8, 128, 2816, 24, 32768, 2048, 16),
    "tiny": (64, 4, 16, 176, 4, 256, 32, 4),
}
PLANS = ("dense", "relaxed")


def get_config(arg=None):
  a = parse_arg(arg, plan="dense", size="350m", lora_rank=32)
  if a["size"] not in SIZES:
    raise ConfigError(f"config arg size={a['size']!r} is not one of {list(SIZES)}")
  if a["plan"] not in PLANS:
    raise ConfigError(f"config arg plan={a['plan']!r} is not one of {list(PLANS)}")
  d, heads, head_dim, mlp, layers, vocab, seq_len, batch = SIZES[a["size"]]
  c = base_config()
  m, p = c.model, c.model.plan
  m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = d, heads, heads, head_dim, mlp
  m.vocab_size, m.max_seq_len = vocab, seq_len
  m.mlp_type, m.norm = "swiglu", "rms"
  p.num_layers = layers
  if a["plan"] == "relaxed":  # same effective depth: half the blocks, run twice, relaxed per depth
    p.preset, p.repeats = "cycle", 2
    m.lora.rank = a["lora_rank"] if a["size"] == "350m" else 2
  c.data.seq_len, c.data.batch_size = seq_len, batch
  if a["size"] == "tiny":
    c.data.max_bytes = 200_000
    c.optim.warmup_steps = 2
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.eval_batches = 20, 5, 10, 2
    c.train.checkpoint_every = 10
  else:
    m.compute_dtype, m.remat, c.optim.grad_accum = "bfloat16", "dots", 2
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 3e-4, 2000, 0.1
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 100_000, 100, 2000, 2000
  return c
