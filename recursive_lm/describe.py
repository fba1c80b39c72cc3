"""Describe a config's model without building it: depth plan, unique vs
effective parameters, LoRA overhead and training FLOPs per token.

  python -m recursive_lm.describe --config configs/relaxed.py
  python -m recursive_lm.describe --config configs/recursive.py:order=sequence,repeats=3 --table
  python -m recursive_lm.describe --config configs/default.py --config.model.lora.rank=4

Prints one JSON object (keys from `recursive_lm.analysis.accounting.describe`),
or a readable table with --table. Nothing is allocated: the model is built
with `nnx.eval_shape`. A bad config prints one line naming the problem on
stderr and exits with status 2.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from recursive_lm import cli
from recursive_lm import config as config_lib
from recursive_lm.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, FILE[:ARG].", lock_config=True)
_TABLE = flags.DEFINE_bool("table", False, "Print a readable table instead of JSON.")



def _fmt(n: int) -> str:
  for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= div:
      return f"{n / div:.2f}{unit}"
  return str(n)


def table(d: dict) -> str:
  """The describe() dict as aligned text: counts first, then the depth plan."""
  rows = [
      ("effective depth", str(d["effective_depth"])),
      ("unique blocks", str(d["unique_blocks"])),
      ("unique params", f"{d['unique_params']:,} ({_fmt(d['unique_params'])})"),
      ("  of which embedding", f"{d['embedding_params']:,}"),
      ("lora params", f"{d['lora_params']:,}"),
      ("total params", f"{d['total_params']:,} ({_fmt(d['total_params'])})"),
      ("untied params", f"{d['untied_params']:,} ({_fmt(d['untied_params'])})"),
      ("stored / untied", f"{d['total_params'] / d['untied_params']:.3f}"),
      ("train FLOPs / token", "not accounted for this block type" if d["flops_per_token"] is None else
       f"{d['flops_per_token']:,} ({_fmt(d['flops_per_token'])}) at seq_len {d['seq_len']}"),
      ("kv sharing", f"{d['kv_sharing']} ({d['kv_slots']} KV slots)"),
      ("KV cache bytes / token", f"{d['kv_cache_bytes_per_token']:,}"),
  ]
  if "mor_routing" in d:
    rows += [("routing (MoR)", f"{d['mor_routing']}, capacities {[round(c, 3) for c in d['mor_capacities']]}, "
                               f"tokens per step {d['mor_tokens_per_step']} of {d['seq_len']}"),
             ("  FLOPs / token, all recursions", f"{d['flops_per_token_all_recursions']:,} (active: "
                                                 f"{d['active_flops_ratio']:.3f} of it)")]
  width = max(len(k) for k, _ in rows)
  lines = [f"{k:<{width}}  {v}" for k, v in rows]
  lines += ["", "depth  stage     block  repeat  kv_slot"]
  lines += [f"{p['depth']:>5}  {p['stage']:<8}  {p['block']:>5}  {p['repeat']:>6}  {p['kv_slot']:>7}" for p in d["plan"]]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    cli.fail(ValueError("--config FILE[:ARG] is required"))
  cli.route_library_logs(None, "describe")
  try:
    cfg = config_lib.load(_CONFIG.value)  # a missing config file raises OSError here, on first access
    from recursive_lm.analysis import accounting  # imports jax: only once the config is known good

    d = accounting.describe(cfg)
  except (ConfigError, OSError) as e:
    cli.fail(e)
  print(table(d) if _TABLE.value else json.dumps(d))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
