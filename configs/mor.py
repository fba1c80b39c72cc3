"""Mixture-of-Recursions: routers choose how many recursions of the shared middle stage each token takes.

  python -m recursive_lm.train --config configs/mor.py --workdir runs/mor
  python -m recursive_lm.train --config configs/mor.py:routing=token --workdir runs/mor_token
  python -m recursive_lm.train --config configs/mor.py:size=tiny --workdir /tmp/tiny   # seconds on CPU
  python -m recursive_lm.describe --config configs/mor.py --table   # active FLOPs per token vs all recursions

Reaches (experiments/mixture_of_recursions, at d_model 128 and 300 steps, 3 seeds): eval loss 2.405
nats/byte against 2.413 for the same plan without routers, with 0.75 of its FLOPs per token.
size=tiny: seconds on CPU (a smoke run).

Model (MoR's middle-cycle): a unique first block, `blocks` unique blocks
looped `repeats` times (cycle order), a unique last block. Expert routing:
recursion step r keeps the top capacity_r share of the tokens still active
(default (R - i) / R: 1, 2/3, 1/3), chosen by its own router; token routing:
one router gives each token a depth. Training gathers each step's tokens, so
a step costs its share of the tokens; router statistics go to metrics.jsonl
as router/* (router/depth_frac: share of tokens per depth 0..R,
router/step_frac: share per step). Generation routes each token causally
(expert: sigmoid(router) >= 0.5 per step; token: its argmax depth), with the
KV cache holding each step's chosen tokens (model/mor.py `run_causal`):

  python -m recursive_lm.generate --workdir runs/mor --input prompts.jsonl --output out.jsonl [--depthwise]

Variants (`:key=value,...`): size=small|tiny, routing=expert|token,
repeats (R), blocks (unique blocks in the loop; 0: the size's default),
capacities ('1-0.5-0.25': one per step, '-'-separated since ',' separates
variants; empty: the default), weighting=scaled|unit.
"""

from recursive_lm.config import byte_lm, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, size="small", routing="expert", repeats=3, blocks=0, capacities="", weighting="scaled")
  blocks = a["blocks"] or {"tiny": 1}.get(a["size"], 2)
  c = byte_lm(a["size"], "middle_cycle", 2 + blocks * a["repeats"], a["repeats"])
  mr = c.model.mor
  mr.routing, mr.weighting = a["routing"], a["weighting"]
  mr.capacities = a["capacities"].replace("-", ",")
  return c
