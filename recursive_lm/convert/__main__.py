"""python -m recursive_lm.convert --source gguf:PATH|hf:DIR --workdir DIR [options]

Converts a pretrained transformer into a run directory (see workdir.py) and
prints the conversion record as JSON. Options:

  --plan vanilla|cycle|sequence|middle_cycle|middle_sequence|looped|sandwich|recurrent
  --repeats R              loops of the shared stage (default 2 unless vanilla; recurrent: 1)
  --prelude P --core C --coda Q [--drop a-b ...]
                           recurrent (a retrofit): the source layers left after the drops (a..b
                           inclusive, repeatable) become P prelude, C core (looped) and Q coda
                           blocks in order, P + C + Q = the kept layers; see convert/retrofit.py
  --init stepwise|average|lower|upper|random    shared-block initialisation
  --lora_rank N|full       depth-wise LoRA by truncated SVD of each layer's residual (0: strict tying)
  --lora_alpha A           LoRA scale alpha / r (0: scale 1)
  --per_depth_norms        every effective layer keeps its source layer's norms
  --set KEY=VALUE          any other config value, e.g. --set train.steps=20 --set data.seq_len=64
  --alsologtostderr        library log records (WORKDIR/logs/convert.log) on the console too

Errors (unsupported source, depth not divisible, a retrofit split that does
not cover the kept layers, a bad --drop, pickle files, a workdir that a
trainer is using) print one line on stderr and exit 2, writing nothing.
"""

from __future__ import annotations

import argparse
import json
import sys

from recursive_lm import cli, workdir_lock
from recursive_lm.config import ConfigError, PLAN_PRESETS


def parse(argv):
  p = argparse.ArgumentParser(prog="python -m recursive_lm.convert", description=__doc__.split("\n\n")[1])
  p.add_argument("--source", required=True, help="gguf:PATH or hf:DIR (config.json + *.safetensors)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--plan", default="vanilla", choices=PLAN_PRESETS)
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--init", default=None, choices=("stepwise", "average", "lower", "upper", "random"),
                 help="shared-block initialisation (default stepwise; not for recurrent, which copies layers)")
  p.add_argument("--prelude", type=int, default=None, help="recurrent: prelude blocks (the first kept layers)")
  p.add_argument("--core", type=int, default=None, help="recurrent: core blocks (the next kept layers)")
  p.add_argument("--coda", type=int, default=None, help="recurrent: coda blocks (the last kept layers)")
  p.add_argument("--drop", action="append", default=[], metavar="A-B",
                 help="recurrent: drop source layers A..B inclusive (repeatable)")
  p.add_argument("--lora_rank", default="0", help="an integer, or 'full'")
  p.add_argument("--lora_alpha", type=float, default=0.0)
  p.add_argument("--per_depth_norms", action="store_true")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--alsologtostderr", action="store_true", help="library log records on the console too")
  return p.parse_args(argv)


def retrofit_map(source, args, split, repeats, rank, overrides) -> list[int]:
  """The retrofit's layer map (effective -> source layer), checked: drops, split, config, layer kinds."""
  from recursive_lm import config as config_lib
  from recursive_lm.convert import retrofit, workdir as wd
  cfg = config_lib.load(wd.make_config(source, "recurrent", repeats, rank, args.lora_alpha, args.per_depth_norms,
                                       "byte", overrides, split))
  return retrofit.checked_map(source, args.drop, cfg.model)


def main(argv=None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  cli.route_library_logs(args.workdir, "convert", also_to_console=args.alsologtostderr, deferred=True)
  # An argparse CLI never runs absl's app.run, which puts absl's handler on the root logger; without it
  # the first root-level record (the HF path reaches one) makes Python add its own stderr handler, and
  # every orbax INFO record lands on the console as "INFO:absl:...". With absl's handler in place they
  # go where route_library_logs sends them (the workdir's log file).
  from absl import logging as absl_logging
  absl_logging.use_absl_handler()
  from recursive_lm.checkpoint import CheckpointWriteError
  from recursive_lm.convert import readers, workdir as wd
  try:
    rank = args.lora_rank if args.lora_rank == "full" else int(args.lora_rank)
  except ValueError:
    cli.fail(f"--lora_rank {args.lora_rank!r} is not an integer or 'full'")
  overrides = {}
  for item in args.set:
    key, sep, value = item.partition("=")
    if not sep:
      cli.fail(f"--set {item!r}: expected KEY=VALUE")
    overrides[key.strip()] = value.strip()
  retrofit_args = {"--prelude": args.prelude, "--core": args.core, "--coda": args.coda}
  recurrent = args.plan == "recurrent"
  if recurrent and None in retrofit_args.values():
    cli.fail(f"--plan recurrent needs --prelude, --core and --coda (got "
             f"{', '.join(f'{k} {v}' for k, v in retrofit_args.items())})")
  if not recurrent and (args.drop or any(v is not None for v in retrofit_args.values())):
    cli.fail(f"--prelude / --core / --coda / --drop retrofit a recurrent plan; --plan is {args.plan!r}")
  if recurrent and args.init is not None:
    cli.fail(f"--init {args.init}: --plan recurrent copies every kept layer (no shared-block rule to choose)")
  init = args.init or "stepwise"
  repeats = args.repeats if args.repeats is not None else (1 if args.plan in ("vanilla", "recurrent") else 2)
  split = (args.prelude, args.core, args.coda) if recurrent else None
  try:
    if recurrent:  # before reading the source (and before the plan's own, less direct, error)
      from recursive_lm.convert import retrofit
      retrofit.check_split_args(*split)
    source = readers.read(args.source)
    print(f"read {source.origin}: {source.family}, {source.num_layers} layers, d_model {source.model['d_model']}",
          file=sys.stderr)
    layer_map = None
    if recurrent:  # every check before anything is written
      layer_map = retrofit_map(source, args, split, repeats, rank, overrides)
    with workdir_lock.hold(args.workdir, log=lambda s: print(s, file=sys.stderr)):  # not into a live run
      cli.start_library_log()
      tokenizer = wd.write_tokenizer(source, args.workdir, log=lambda s: print(s, file=sys.stderr))
      cd = wd.make_config(source, args.plan, repeats, rank, args.lora_alpha, args.per_depth_norms, tokenizer,
                          overrides, split)
      record = wd.write_run(source, cd, args.workdir, init, log=lambda s: print(s, file=sys.stderr),
                            layer_map=layer_map)
  except (ConfigError, CheckpointWriteError) as e:  # the latter: a full disk, say
    cli.fail(e)
  print(json.dumps(record))
  config = "retrofit" if recurrent else "converted"
  print(f"continue with: python -m recursive_lm.train --config configs/{config}.py:workdir={args.workdir} "
        f"--workdir {args.workdir}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
