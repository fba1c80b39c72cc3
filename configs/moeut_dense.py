"""The dense baselines MoEUT is compared against (Csordas et al. 2024): pre-LN
RoPE transformers with ReLU MLPs and no sharing, at the same total parameter
count as configs/moeut.py.

  python -m recursive_lm.train --config configs/moeut_dense.py:size=tiny --workdir /tmp/dense

Sizes follow the authors' baseline sweeps (github.com/RobertCsordas/moeut_training_code,
sweeps/c4_baseline_*_rope_nodrop.yaml; d_ff = int(d_model * ff_multiplier)):

  size   d_model layers heads x head  d_ff   params (ours / paper)
  44m    412     16     10 x 41       2053   44.50M / 44.54M
  126m   768     16     16 x 48       3072   125.58M / 125.65M
  244m   1024    18     16 x 64       4110   243.47M / 243.57M

The paper's MLP layers and LM head carry biases, ours do not (0.04-0.1% of the
parameters). tiny matches configs/moeut.py:size=tiny exactly (151,168).
Training settings are those of configs/moeut.py.

Variants (`:key=value,...`): size=tiny|44m|126m|244m, accel=0|1 (as configs/moeut.py:
bfloat16 compute, remat 'dots', 4 micro-batches, for one 80-140 GB accelerator).
"""

from recursive_lm.config import ConfigError, base_config, parse_arg

# d_model, layers, heads, head_dim, d_ff
SIZES = {
    "tiny": (64, 4, 2, 32, 101),
    "44m": (412, 16, 10, 41, 2053),
    "126m": (768, 16, 16, 48, 3072),
    "244m": (1024, 18, 16, 64, 4110),
}


def get_config(arg=None):
  a = parse_arg(arg, size="tiny", accel=0)
  if a["size"] not in SIZES:
    raise ConfigError(f"config arg size={a['size']!r} is not one of {list(SIZES)}")
  c = base_config()
  m, p = c.model, c.model.plan
  d, layers, heads, head_dim, d_ff = SIZES[a["size"]]
  m.block, m.norm, m.norm_eps, m.tie_embeddings = "dense", "layer", 1e-5, False
  m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = d, heads, heads, head_dim
  m.mlp_type, m.mlp_dim, m.rope_fraction = "relu", d_ff, 0.5
  p.preset, p.num_layers, p.repeats = "vanilla", layers, 1
  if a["size"] == "tiny":
    m.vocab_size, m.max_seq_len = 256, 64
    c.data.source, c.data.tokenizer = "stdlib", "byte"
    c.data.seq_len, c.data.batch_size, c.data.max_bytes = 32, 4, 200_000
    c.optim.lr, c.optim.warmup_steps = 3e-3, 2
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.eval_batches = 20, 5, 10, 2
    c.train.checkpoint_every = 10
  else:
    m.vocab_size, m.max_seq_len = 8000, 1024
    c.data.seq_len, c.data.batch_size = 1024, 64
    c.optim.lr, c.optim.weight_decay, c.optim.clip_norm = 2.5e-4, 0.01, 0.25
    c.optim.schedule, c.optim.final_lr_fraction, c.optim.b2 = "cosine", 0.1, 0.999
    c.optim.warmup_steps = 4000
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 100_000, 100, 2000, 2000
    if a["accel"]:  # one 80-140 GB GPU or a TPU: bf16 matmuls; the backward recomputes all but the matmul outputs;
      # 4 micro-batches of 16 x 1024 (XLA's estimate for 244M MoEUT at 64 rows at once: 218 GiB)
      m.compute_dtype, m.remat, c.optim.grad_accum = "bfloat16", "dots", 4
  return c
