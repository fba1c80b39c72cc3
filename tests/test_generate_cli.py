"""`python -m recursive_lm.generate` in a subprocess on a tiny trained run:
one output line per input line, completions equal to `generate` (greedy),
bad lines answered with a named error while the rest run, bad flags exit 2."""

import json
import os

import numpy as np
import pytest

from recursive_lm import data
from recursive_lm.data.tokenizers import encode_prompt
from recursive_lm.inference import generate, load_checkpoint

from test_native import needs_cxx
from test_train_e2e import cli, tiny


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  from recursive_lm import train
  workdir = str(tmp_path_factory.mktemp("gen_run"))
  train.run(tiny(**{"train.steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2}), workdir)
  return workdir


def _write(path, lines):
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def test_generate_cli(run_dir, tmp_path):
  good = [{"id": "a", "prompt": "def "}, {"id": 7, "prompt": "import os\nimport sys\n", "max_new_tokens": 5},
          {"id": "c", "prompt": "class Foo(", "max_new_tokens": 20}, {"id": "d", "prompt": "x", "max_new_tokens": 0}]
  lines = [json.dumps(good[0]), "{broken", json.dumps(good[1]), json.dumps({"id": "np"}),
           json.dumps({"id": "long", "prompt": "y" * 60}), json.dumps(good[2]), json.dumps(good[3]),
           json.dumps({"id": "bad", "prompt": "z", "max_new_tokens": -1})]
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write(inp, lines)
  r = cli("recursive_lm.generate", f"--workdir={run_dir}", f"--input={inp}", f"--output={out}",
          "--max_new_tokens=12", "--slots=2")
  assert r.returncode == 1, r.stderr
  assert "4 of 8 input lines failed" in r.stderr
  recs = [json.loads(l) for l in open(out)]
  assert len(recs) == len(lines)
  errors = {i: recs[i] for i in (1, 3, 4, 7)}
  assert errors[1]["id"] is None and "line 2: not valid JSON" in errors[1]["error"]
  assert errors[3] == {"id": "np", "error": 'line 4: "prompt" must be a string, got nothing'}
  assert errors[4]["id"] == "long" and "too long" in errors[4]["error"] and "line 5" in errors[4]["error"]
  assert errors[7]["id"] == "bad" and "max_new_tokens" in errors[7]["error"]

  cfg, model, _ = load_checkpoint(run_dir)
  tok = data.get_tokenizer(cfg.data.tokenizer)
  for i, g in zip((0, 2, 5, 6), good):
    rec = recs[i]
    n = g.get("max_new_tokens", 12)
    assert rec["id"] == g["id"] and rec["new_tokens"] == n and rec["finish_reason"] == "length"
    assert rec["mean_exit_loop"] is None  # no --exit: every token ran every loop
    ids = encode_prompt(tok, g["prompt"])
    want = np.asarray(generate(model, ids[None], n))[0, ids.size:] if n else []
    assert rec["completion"] == tok.decode(want), (i, rec)

  # A stop string taken from a completion ends that request before it.
  text = recs[5]["completion"]
  stop = text[3:5]
  _write(inp, [json.dumps({"id": 0, "prompt": "class Foo(", "max_new_tokens": 20, "stop": [stop]})])
  r = cli("recursive_lm.generate", f"--workdir={run_dir}", f"--input={inp}", f"--output={out}")
  assert r.returncode == 0, r.stderr
  rec = json.loads(open(out).read())
  assert rec["finish_reason"] == "stop" and rec["completion"] == text[:text.find(stop)]


@needs_cxx
def test_generate_cli_native_matmul(run_dir, tmp_path):
  """--matmul native (the packed CPU kernel) completes every line as the default does."""
  inp = tmp_path / "in.jsonl"
  _write(inp, [json.dumps({"id": i, "prompt": p, "max_new_tokens": n})
               for i, (p, n) in enumerate([("def ", 9), ("class A", 5), ("import", 12)])])
  recs = {}
  for matmul in ("xla", "native"):
    out = tmp_path / f"{matmul}.jsonl"
    r = cli("recursive_lm.generate", f"--workdir={run_dir}", f"--input={inp}", f"--output={out}", "--slots=2",
            f"--matmul={matmul}")
    assert r.returncode == 0, r.stderr
    recs[matmul] = [json.loads(l) for l in open(out)]
  assert recs["native"] == recs["xla"] and [r["new_tokens"] for r in recs["xla"]] == [9, 5, 12]


@pytest.mark.parametrize("args,needle", [
    (["--slots=0"], "--slots=0 must be >= 1"), (["--temperature=-1"], "--temperature"),
    (["--input=/nonexistent.jsonl"], "no such file"), (["--exit=kl:0"], "--exit='kl:0' must be"), (["--workdir=/nonexistent"], "no such directory")])
def test_generate_cli_bad_flags(run_dir, tmp_path, args, needle):
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write(inp, [json.dumps({"id": 1, "prompt": "a"})])
  r = cli("recursive_lm.generate", f"--workdir={run_dir}", f"--input={inp}", f"--output={out}", *args)
  assert r.returncode == 2
  assert r.stderr.count("error:") == 1 and needle in r.stderr, r.stderr
  assert not os.path.exists(out)


@pytest.mark.slow
def test_generate_cli_with_exits(run_dir, tmp_path):
  """A rule that never fires gives the full-depth completions with mean_exit_loop = all loops (2 here);
  one that always fires exits after the first loop."""
  inp = tmp_path / "in.jsonl"
  _write(inp, [json.dumps({"id": i, "prompt": p, "max_new_tokens": 6}) for i, p in enumerate(["def ", "class A"])])
  recs = {}
  for rule in ("none", "confidence:1.0", "confidence:0.000001"):
    out = tmp_path / f"{rule}.jsonl"
    r = cli("recursive_lm.generate", f"--workdir={run_dir}", f"--input={inp}", f"--output={out}", f"--exit={rule}")
    assert r.returncode == 0, r.stderr
    recs[rule] = [json.loads(l) for l in open(out)]
  assert all(r["mean_exit_loop"] is None for r in recs["none"])
  for a, b in zip(recs["none"], recs["confidence:1.0"]):
    assert b["completion"] == a["completion"] and b["mean_exit_loop"] == 2.0
  assert all(r["mean_exit_loop"] == 1.0 for r in recs["confidence:0.000001"])


@pytest.mark.slow
def test_generate_cli_depthwise(run_dir, tmp_path):
  """--depthwise decodes the same completions (and exit loops) as the engine without it, with exits off and
  on (a threshold at which this run's tokens exit after either loop)."""
  inp = tmp_path / "in.jsonl"
  _write(inp, [json.dumps({"id": i, "prompt": p, "max_new_tokens": n})
               for i, (p, n) in enumerate([("def ", 6), ("class A", 9), ("import", 3)])])
  recs = {}
  for rule in ("none", "confidence:0.1"):
    for flag in ((), ("--depthwise",)):
      out = tmp_path / f"{rule}{len(flag)}.jsonl"
      r = cli("recursive_lm.generate", f"--workdir={run_dir}", f"--input={inp}", f"--output={out}",
              f"--exit={rule}", "--slots=2", *flag)
      assert r.returncode == 0, r.stderr
      recs[rule, bool(flag)] = [json.loads(l) for l in open(out)]
  for rule in ("none", "confidence:0.1"):
    assert recs[rule, True] == recs[rule, False]
  loops = [r["mean_exit_loop"] for r in recs["confidence:0.1", True]]
  assert min(loops) < 2 and max(loops) > 1, loops  # tokens exit after loop 1 and after loop 2


def test_generate_cli_depthwise_needs_a_loop(tmp_path):
  """A model without a repeated stage: one error line naming --depthwise, exit 2, no output."""
  from recursive_lm import train
  workdir = str(tmp_path / "vanilla")
  train.run(tiny(**{"model.plan.preset": "vanilla", "model.plan.repeats": 1, "model.lora.rank": 0,
                    "train.steps": 1, "train.eval_every": 1, "train.checkpoint_every": 1}), workdir)
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write(inp, [json.dumps({"id": 1, "prompt": "a"})])
  r = cli("recursive_lm.generate", f"--workdir={workdir}", f"--input={inp}", f"--output={out}", "--depthwise")
  assert r.returncode == 2
  assert r.stderr.count("error:") == 1 and "--depthwise: depth-wise batching needs" in r.stderr, r.stderr
  assert not os.path.exists(out)
