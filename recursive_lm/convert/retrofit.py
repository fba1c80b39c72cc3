"""Retrofitting recurrence: a pretrained N-layer model -> prelude / core / coda
(preset 'recurrent'; McLeish et al. 2025, on Huginn's architecture).

  python -m recursive_lm.convert --source hf:DIR --workdir W --plan recurrent \
      --prelude P --core C --coda Q [--drop a-b ...] [--repeats R]

Layer map. Each --drop a-b removes source layers a..b inclusive (0-based; a
lone `a` is a-a); ranges must lie in [0, N) and not overlap. The K layers
left, in source order, are split: prelude = the first P, core = the next C,
coda = the last Q, with P + C + Q = K (every kept layer used once), P, Q >= 1
(the plan's prelude and coda) and C >= 1. The plan has P + C * R + Q effective
layers, R (default 1) being the loop count the plan runs by default: prelude
slot p copies kept[p], every repeat of core block u copies kept[P + u], coda
slot q copies kept[P + C + q]. Core LoRA slots (model.lora) start at zero
(every repeat is its source layer).

Layer kinds: an effective layer's rotary base and sliding window follow its
depth in the new plan (recursive_lm.plan); each must match the kind of the
source layer it copies, or the conversion is refused naming the layers (a
Llama has one kind; Gemma 3's local / global pattern constrains the drops
and R, e.g. 4 / 4 / 4 with layers 8-13 of 18 dropped and R = 1 fits).

Injection at retrofit: one core iteration must hand the core the prelude
output e unchanged, so that at one loop with nothing dropped the converted
model is the source. Per model.recurrent.injection:

  concat  W = [I; 0] ([2D, D]: the state passes, e is ignored) and
          init_state 'prelude' (s0 = e): s1 = W [e; e] = e, and later
          iterations continue the state as the pretrained layers would
          (loop r is core^r(e)); uptraining learns how much e to mix back in
  add     init_state 'zeros': s1 = 0 + e
  parcae  init_state 'zeros', B = I / delta: s1 = a * 0 + delta * e B = e

init_state is set to the value above unless --set model.recurrent.init_state
is given. The uptraining recipe (RECIPE: Poisson log-normal loop counts whose
mean rises by the 1-sqrt curriculum over train.steps to 4, truncated
backprop through the last 4 iterations) is the default; --set changes it.
"""

from __future__ import annotations

import numpy as np

from recursive_lm import plan as plan_lib
from recursive_lm.config import ConfigError
from recursive_lm.convert.readers import Source

# init_state that makes the first iteration's injection return e (see the module docstring).
INIT_STATE = {"concat": "prelude", "add": "zeros", "parcae": "zeros"}
# Uptraining recipe of a retrofitted model (applied before --set overrides).
RECIPE = {"model.recurrent.injection": "concat", "model.recurrent.sample": "poisson_lognormal",
          "model.recurrent.mean": 4.0, "model.recurrent.curriculum": "1-sqrt", "model.recurrent.backprop_depth": 4,
          "model.recurrent.max_loops": 16}


def parse_drops(texts: list[str], n_layers: int) -> list[tuple[int, int]]:
  """['a-b' | 'a', ...] -> sorted inclusive ranges; ConfigError for a malformed,
  reversed, out-of-range or overlapping one."""
  ranges = []
  for text in texts:
    lo, sep, hi = text.strip().partition("-")
    try:
      a, b = int(lo), int(hi if sep else lo)
    except ValueError:
      raise ConfigError(f"--drop {text!r}: expected a-b (source layers a..b inclusive) or a single layer") from None
    if a > b:
      raise ConfigError(f"--drop {text!r}: the range is reversed ({a} > {b})")
    if a < 0 or b >= n_layers:
      raise ConfigError(f"--drop {text!r}: out of range, the source has layers 0..{n_layers - 1}")
    ranges.append((a, b, text))
  ranges.sort()
  for (a0, b0, t0), (a1, b1, t1) in zip(ranges, ranges[1:]):
    if a1 <= b0:
      raise ConfigError(f"--drop {t0!r} and --drop {t1!r} overlap (layers {a1}..{min(b0, b1)})")
  return [(a, b) for a, b, _ in ranges]


def kept_layers(n_layers: int, drops: list[tuple[int, int]]) -> list[int]:
  """Source layers left after the drops, in order."""
  gone = {l for a, b in drops for l in range(a, b + 1)}
  return [l for l in range(n_layers) if l not in gone]


def check_split_args(prelude: int, core: int, coda: int) -> None:
  """ConfigError unless P, C, Q >= 1."""
  if prelude < 1 or core < 1 or coda < 1:
    raise ConfigError(f"--prelude {prelude} --core {core} --coda {coda}: each must be >= 1 (the recurrent plan "
                      "has at least one prelude, core and coda block)")


def check_split(prelude: int, core: int, coda: int, n_kept: int, n_layers: int, dropped: int) -> None:
  """ConfigError unless P, Q >= 1, C >= 1 and P + C + Q covers the kept layers exactly."""
  check_split_args(prelude, core, coda)
  if prelude + core + coda != n_kept:
    raise ConfigError(f"--prelude {prelude} + --core {core} + --coda {coda} = {prelude + core + coda} layers, but "
                      f"{n_kept} source layers are kept ({n_layers} minus {dropped} dropped): the split must use "
                      "every kept layer once (drop the others with --drop a-b)")


def layer_map(plan: plan_lib.Plan, kept: list[int]) -> list[int]:
  """Per effective layer of the recurrent plan, the source layer it copies."""
  prelude, core, coda = plan.stages
  out = list(kept[:prelude.depth])
  for slot in range(core.depth):
    out.append(kept[prelude.depth + core.block_and_repeat(slot)[0]])
  out += kept[prelude.depth + core.unique_blocks:]
  assert len(out) == plan.depth and len(kept) == prelude.depth + core.unique_blocks + coda.depth
  return out


def check_kinds(source: Source, plan: plan_lib.Plan, lmap: list[int]) -> None:
  """ConfigError naming the effective layers whose rotary base / window differ from their source layer's."""
  m = source.model
  src_kinds = plan_lib.build("vanilla", source.num_layers, sliding_window=m.get("sliding_window", 0),
                             global_every=m.get("global_every", 0)).layers()
  names = lambda l: "global" if l.rope == 0 else f"local (window {l.window})"  # noqa: E731
  bad = [(l.depth, s) for l, s in zip(plan.layers(), lmap)
         if (l.rope, l.window) != (src_kinds[s].rope, src_kinds[s].window)]
  if bad:
    d, s = bad[0]
    raise ConfigError(f"effective layer {d} of the recurrent plan is {names(plan.layers()[d])} but copies source "
                      f"layer {s}, which is {names(src_kinds[s])} ({len(bad)} such layers: "
                      f"{', '.join(f'{d}<-{s}' for d, s in bad)}); choose --drop / --repeats so that kept layers "
                      f"keep their kind (global every {m.get('global_every', 0)} layers)")


def init_injection(kind: str, params: dict) -> None:
  """Set params['injection'] (pure dict, numpy) so that the first core iteration returns e."""
  if kind == "add":
    return  # no parameters: s0 = 0 gives s1 = e
  inj = params["injection"]
  if kind == "concat":
    d = inj["proj"]["kernel"].shape[1]
    inj["proj"]["kernel"] = np.concatenate([np.eye(d), np.zeros((d, d))]).astype(np.float32)
  elif kind == "parcae":
    dt = inj["dt"].astype(np.float32)
    delta = np.logaddexp(np.float32(0), dt).astype(np.float32)  # softplus, as the model computes it
    inj["proj"]["kernel"] = (np.eye(len(dt), dtype=np.float32) / delta[None, :]).astype(np.float32)


def checked_map(source: Source, drops: list[str], cfg) -> list[int]:
  """The layer map of a retrofit of `source` under cfg (a ModelConfig of preset
  'recurrent' from workdir.make_config(split=...)) after the --drop ranges,
  every check done: drops, split, layer kinds. Raises ConfigError."""
  ranges = parse_drops(drops, source.num_layers)
  kept = kept_layers(source.num_layers, ranges)
  check_split(cfg.plan.prelude, (cfg.plan.num_layers - cfg.plan.prelude - cfg.plan.coda) // cfg.plan.repeats,
              cfg.plan.coda, len(kept), source.num_layers, source.num_layers - len(kept))
  plan = plan_lib.from_config(cfg)
  lmap = layer_map(plan, kept)
  check_kinds(source, plan, lmap)
  return lmap
