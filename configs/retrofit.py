"""Uptraining a pretrained model retrofitted to recurrent depth (prelude / core / coda).

  python -m recursive_lm.convert --source hf:DIR --workdir runs/retro --plan recurrent \
      --prelude 4 --core 4 --coda 4 --drop 8-13 --set train.steps=1000
  python -m recursive_lm.evaluate --workdir runs/retro --loops 1,2,4,8     # before: loop 1 is the source
  python -m recursive_lm.train --config configs/retrofit.py:workdir=runs/retro --workdir runs/retro
  python -m recursive_lm.evaluate --workdir runs/retro --loops 1,2,4,8,16  # test-time loop scaling

The recipe is written into the run by `convert --plan recurrent`
(recursive_lm.convert.retrofit.RECIPE; change it there with --set KEY=VALUE,
since train refuses a different model section): concat injection initialised
to pass the state through (init_state 'prelude'), loop counts drawn per step
from Huginn's Poisson log-normal (model.recurrent.sample) whose mean rises
from model.recurrent.min_loops to model.recurrent.mean = 4 by the `1-sqrt`
curriculum (model.recurrent.curriculum) over model.recurrent.curriculum_steps
(= train.steps at conversion), clipped to max_loops 16, with only the last
backprop_depth = 4 iterations differentiated; data / optimiser / schedule are
the converter's uptraining defaults (AdamW, lr 1e-4, no weight decay).

With a workdir this config reads WORKDIR/config.json back (like
configs/converted.py) and refuses a run that is not a recurrent retrofit;
`--config.train.*` and `--config.optim.*` change the training settings as
usual (a train.steps other than curriculum_steps ends the curriculum earlier
or later than the run). Without one it applies the same recipe to a byte-level
recurrent model trained from scratch at one of the shared sizes (prelude /
core / coda of 2 / 2 / 2 blocks, tiny 1 / 1 / 1): a quick way to exercise it.
Reaches: experiments/recurrent_retrofit (Gemma 3 270M, 20 CPU steps).

Variants (`:key=value,...`): workdir (a retrofitted run), or size=small|tiny.
"""

from recursive_lm.config import ConfigError, byte_lm, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, workdir="", size="small")
  if a["workdir"]:
    from recursive_lm.convert.workdir import config_from_workdir
    c = config_from_workdir(a["workdir"])
    if c.model.plan.preset != "recurrent":
      raise ConfigError(f"configs/retrofit.py: {a['workdir']} holds a {c.model.plan.preset!r} model, not a "
                        "recurrent retrofit (use configs/converted.py)")
    return c
  from recursive_lm.convert import retrofit
  from recursive_lm.convert.workdir import set_key
  n = 1 if a["size"] == "tiny" else 2
  c = byte_lm(a["size"], "recurrent", 3 * n, repeats=1)
  c.model.plan.prelude = c.model.plan.coda = n
  for key, value in retrofit.RECIPE.items():
    set_key(c, key, value)
  c.model.recurrent.init_state = retrofit.INIT_STATE[c.model.recurrent.injection]
  c.model.recurrent.curriculum_steps = c.train.steps
  return c
