"""A run directory written by `python -m recursive_lm.convert`, continued as is.

  python -m recursive_lm.train --config configs/converted.py:workdir=runs/rrt --workdir runs/rrt
  python -m recursive_lm.train --config configs/converted.py:workdir=runs/rrt --workdir runs/rrt \
      --config.train.steps=50 --config.optim.lr=3e-5

Reads WORKDIR/config.json back into a config (model, plan, LoRA, data, optim,
train as converted); `--config.KEY=VALUE` changes training settings as usual.
The model section must stay as it is: train refuses a workdir holding a
different model.

Without a workdir it gives a byte-level model with the Gemma 3 block options
a converted Gemma uses (sandwich norms, q/k norms, GeGLU, 1 + w norm scales,
sqrt(D) embedding scale, 5 local : 1 global layers), trained from scratch at
one of the shared sizes: a quick way to exercise those options.

Variants (`:key=value,...`): workdir (a converted run), or size=small|tiny.
"""

from recursive_lm.config import byte_lm, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, workdir="", size="small")
  if a["workdir"]:
    from recursive_lm.convert.workdir import config_from_workdir
    return config_from_workdir(a["workdir"])
  c = byte_lm(a["size"], "cycle", 6, repeats=2, lora_rank={"tiny": 2}.get(a["size"], 8))
  m = c.model
  m.post_norms, m.qk_norm, m.scale_embeddings, m.norm_offset, m.mlp_type = True, True, True, 1.0, "geglu"
  m.sliding_window, m.global_every, m.rope_base_local = 32, 6, 10000.0
  return c
