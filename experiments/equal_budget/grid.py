"""The equal_budget comparison as a sweep grid: tied plans at vanilla's stored parameters.

  python -m recursive_lm.sweep experiments/equal_budget/grid.py --workers 2 --out runs/equal_budget_sweep

Every arm is the tiny byte model at effective depth 6 (d_model 32) trained as sweep.sh trains it (500 steps
of 16 x 32 bytes); the tied arms get the SwiGLU width (model.mlp_dim) that brings their total parameters to
within 1 % of vanilla's (solved by the sweep from the accounting, reported per arm). Five seeds, evaluated
on 1 M validation tokens or the whole split, whichever is smaller, spread over the split.
Not run yet at this size: the table in README.md is sweep.sh's.
"""

COMMON = {"train.steps": 500, "data.batch_size": 16, "optim.warmup_steps": 20, "train.eval_every": 500,
          "train.checkpoint_every": 500, "train.log_every": 100}


def get_grid():
  return {
      "arms": {
          "vanilla": {"config": "configs/vanilla.py:size=tiny,num_layers=6"},
          "cycle_R2": {"config": "configs/recursive.py:size=tiny,order=cycle,repeats=2,num_layers=6"},
          "sequence_R2": {"config": "configs/recursive.py:size=tiny,order=sequence,repeats=2,num_layers=6"},
          "relaxed_r4": {"config": "configs/relaxed.py:size=tiny,order=cycle,repeats=2,num_layers=6,lora_rank=4"},
          "sandwich": {"config": "configs/sandwich.py:size=tiny,num_layers=6"},
          "middle_cycle_R2": {"config": "configs/middle.py:size=tiny,order=cycle,repeats=2,num_layers=6"},
      },
      "seeds": [0, 1, 2, 3, 4],
      "baseline": "vanilla",
      "common": COMMON,
      "budget": {"kind": "total_params", "target": "baseline", "field": "model.mlp_dim", "range": (8, 4096),
                 "tolerance": 0.01},
      "eval_tokens": 1_000_000,
  }
