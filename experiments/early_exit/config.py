"""The early-exit experiment's model: 2 unique blocks x 4 loops (cycle order,
8 effective layers) with rank-4 per-depth LoRA, d_model 64, on the embedded
stdlib bytes, trained with per-loop readout losses.

  python -m recursive_lm.train --config experiments/early_exit/config.py:seed=0 --workdir /work/runs/early_exit/exit_s0

Variants (`:key=value,...`): seed, steps, exit_weights (train.exit_loss_weights
with ';' between the 4 weights, since ',' separates variants; 'none' trains
without exit losses), d_model, mlp_dim, seq_len (the wide runs: d_model=192,
mlp_dim=512, seq_len=128).
"""

from recursive_lm.config import byte_lm, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, seed=0, steps=250, exit_weights="0.25;0.25;0.25;1", d_model=64, mlp_dim=192, seq_len=64)
  c = byte_lm("tiny", "cycle", 8, repeats=4, lora_rank=4)
  c.seed = a["seed"]
  m, d, t = c.model, c.data, c.train
  m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim, m.max_seq_len = a["d_model"], 4, 4, a["mlp_dim"], 256
  d.seq_len, d.batch_size, d.max_bytes = a["seq_len"], 16, 400_000
  c.optim.warmup_steps = 30
  t.steps, t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches = a["steps"], 50, a["steps"], a["steps"], 8
  t.exit_loss_weights = "" if a["exit_weights"] == "none" else a["exit_weights"].replace(";", ",")
  return c
