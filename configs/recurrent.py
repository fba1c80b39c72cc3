"""Recurrent depth (Huginn): a prelude, a core looped a sampled number of times, a coda.

  python -m recursive_lm.train --config configs/recurrent.py --workdir runs/recurrent
  python -m recursive_lm.train --config configs/recurrent.py:injection=parcae --workdir runs/recurrent_parcae
  python -m recursive_lm.train --config configs/recurrent.py:size=tiny --workdir /tmp/tiny   # seconds on CPU
  python -m recursive_lm.evaluate --workdir runs/recurrent --loops 1,2,4,8,16,32   # test-time loop scaling

Reaches: small not measured yet. size=tiny: eval loss 4.84 nats per byte
after 20 steps (about 20 s on a shared 2-core CPU), and 4.85-4.88 when
evaluated at 1, 4, 8, 16 or 32 loops instead of the mean 2.

Model: prelude of `prelude` unique blocks, a core of `core` unique blocks
looped r times with the prelude output injected into every iteration
(`injection`: concat | add | parcae), a coda of `coda` unique blocks. Each
train step draws r from Huginn's Poisson log-normal with mean `mean_loops`
(sample=poisson_lognormal, clipped to [1, max_loops]; or uniform in
[1, max_loops], or fixed at mean_loops) and differentiates only the last
`backprop_depth` iterations. Evaluation during training runs mean_loops
iterations (the plan's repeats). Small: 1 + 2 x 4 + 1 = 10 effective layers at
the mean, 4 stored blocks; tiny: 1 + 1 x 2 + 1.

Variants (`:key=value,...`): size=small|tiny, injection, init_state
(normal | zeros | prelude), sample (poisson_lognormal | uniform | fixed),
mean_loops (0: the size's default), max_loops, backprop_depth (0: the size's
default), prelude, core, coda (unique blocks; 0: the size's default),
per_sequence (true: one loop count per row instead of per step).
"""

from recursive_lm.config import byte_lm, parse_arg

DEFAULTS = {"small": dict(prelude=1, core=2, coda=1, mean_loops=4, backprop_depth=4),
            "tiny": dict(prelude=1, core=1, coda=1, mean_loops=2, backprop_depth=2)}


def get_config(arg=None):
  a = parse_arg(arg, size="small", injection="concat", init_state="normal", sample="poisson_lognormal",
                mean_loops=0, max_loops=0, backprop_depth=0, prelude=0, core=0, coda=0, per_sequence=False)
  d = DEFAULTS.get(a["size"], DEFAULTS["small"])  # an unknown size is byte_lm's error
  pick = lambda key: a[key] or d[key]  # noqa: E731
  r = pick("mean_loops")
  c = byte_lm(a["size"], "recurrent", pick("prelude") + pick("core") * r + pick("coda"), repeats=r)
  c.model.plan.prelude, c.model.plan.coda = pick("prelude"), pick("coda")
  rc = c.model.recurrent
  rc.injection, rc.init_state, rc.sample = a["injection"], a["init_state"], a["sample"]
  rc.mean, rc.max_loops, rc.backprop_depth = float(r), a["max_loops"] or 4 * r, pick("backprop_depth")
  rc.per_sequence = a["per_sequence"]
  return c
