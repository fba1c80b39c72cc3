"""MoEUT (Csordas et al. 2024): a Universal Transformer of G unique MoE layers
repeated L / G times in A-B-A-B order, with SwitchHead attention, sigma-MoE
feed-forward layers and peri-layernorm.

  python -m recursive_lm.train --config configs/moeut.py:size=tiny --workdir /tmp/moeut   # seconds on CPU
  python -m recursive_lm.train --config configs/moeut.py:size=44m --workdir runs/moeut44m \
      --config.data.source=tokens --config.data.tokens_path=DIR   # an 8k-vocabulary token set

Sizes follow the authors' profiles (github.com/RobertCsordas/moeut, profiles.py):

  size   d_model layers G heads x head  att experts  MLP experts  K   params (ours / paper dense)
  44m    412     16     2 4 x 82        8            155          12  44.34M / 44.54M
  126m   768     18     2 4 x 96        10           254          12  125.66M / 125.65M
  244m   1024    18     2 4 x 128       10           387          16  243.32M / 243.57M

Expert size 128, attention top-2, 8000-token vocabulary, untied head (the
paper's head has a bias, ours does not: 8000 parameters), LayerNorm, RoPE on
half of each head's dims (the authors' rotate_fraction 0.5, rounded down to
an even count: 40 of 82 dims, hence rope_fraction 0.49 at 44m). Training as in
the paper: AdamW lr 2.5e-4, weight decay 0.01, clip 0.25, cosine to 0.1 x,
batch 64 x 1024 tokens, 100k steps (the paper trains in bf16; set
model.compute_dtype=bfloat16 on accelerators).

Variants (`:key=value,...`): size=tiny|44m|126m|244m, norm=peri|pre (the
layernorm ablation), dispatch=auto|loop|blocks|ragged|megablox|ragged_mgpu|dense,
accel=0|1 (1: bfloat16 compute, remat 'dots' and the paper's batch of 64 x
1024 as 4 micro-batches, for one 80-140 GB GPU or a TPU; the device benchmark's
setting).
"""

from recursive_lm.config import ConfigError, base_config, parse_arg

# d_model, layers, heads, head_dim, rope_fraction, att_experts, experts, top_k
SIZES = {
    "44m": (412, 16, 4, 82, 0.49, 8, 155, 12),
    "126m": (768, 18, 4, 96, 0.5, 10, 254, 12),
    "244m": (1024, 18, 4, 128, 0.5, 10, 387, 16),
}
GROUP = 2  # unique layers (G)


def get_config(arg=None):
  a = parse_arg(arg, size="tiny", norm="peri", dispatch="auto", accel=0)
  c = base_config()
  m, p, mo = c.model, c.model.plan, c.model.moe
  m.block, m.norm, m.norm_eps, m.tie_embeddings = "moeut", "layer", 1e-5, False
  mo.norm_style, mo.dispatch = a["norm"], a["dispatch"]
  mo.expert_size, mo.att_top_k, mo.mlp_balance, mo.att_balance = 128, 2, 0.01, 0.001
  p.preset = "cycle"  # A-B-A-B
  if a["size"] == "tiny":
    m.vocab_size = 256  # byte tokenizer
    m.d_model, m.num_heads, m.head_dim = 64, 2, 32
    p.num_layers, p.repeats = 4, 4 // GROUP
    mo.experts, mo.expert_size, mo.top_k, mo.att_experts = 8, 16, 2, 4
    m.max_seq_len = 64
    c.data.source, c.data.tokenizer = "stdlib", "byte"
    c.data.seq_len, c.data.batch_size, c.data.max_bytes = 32, 4, 200_000
    c.optim.lr, c.optim.warmup_steps = 3e-3, 2
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.eval_batches = 20, 5, 10, 2
    c.train.checkpoint_every = 10
  elif a["size"] in SIZES:
    d, layers, heads, head_dim, rope, att_experts, experts, top_k = SIZES[a["size"]]
    m.vocab_size = 8000
    m.d_model, m.num_heads, m.head_dim, m.rope_fraction = d, heads, head_dim, rope
    p.num_layers, p.repeats = layers, layers // GROUP
    mo.experts, mo.top_k, mo.att_experts = experts, top_k, att_experts
    m.max_seq_len = 1024
    c.data.seq_len, c.data.batch_size = 1024, 64
    c.optim.lr, c.optim.weight_decay, c.optim.clip_norm = 2.5e-4, 0.01, 0.25
    c.optim.schedule, c.optim.final_lr_fraction, c.optim.b2 = "cosine", 0.1, 0.999
    c.optim.warmup_steps = 4000
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 100_000, 100, 2000, 2000
    if a["accel"]:  # one 80-140 GB GPU or a TPU: bf16 matmuls; the backward recomputes all but the matmul outputs;
      # 4 micro-batches of 16 x 1024 (XLA's estimate for 244M MoEUT at 64 rows at once: 218 GiB)
      m.compute_dtype, m.remat, c.optim.grad_accum = "bfloat16", "dots", 4
  else:
    raise ConfigError(f"config arg size={a['size']!r} is not one of ['tiny', {', '.join(map(repr, SIZES))}]")
  m.num_kv_heads = m.num_heads  # SwitchHead: no grouped-query sharing
  m.mlp_dim = mo.top_k * mo.expert_size  # the active hidden width (FLOP accounting; no dense MLP exists)
  return c
