"""recursive_lm.lm_eval_model against hand computations with the model's forward, evaluate and the Engine."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[eval]')")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from recursive_lm import data, evaluate  # noqa: E402
from recursive_lm.data.tokenizers import encode_prompt  # noqa: E402
from recursive_lm.inference import Engine  # noqa: E402
from recursive_lm.checkpoint import load_model as load_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "recursive_lm", "eval_tasks")
CONFIGS = {"vanilla": "configs/vanilla.py:size=tiny", "relaxed": "configs/relaxed.py:size=tiny,lora_rank=2",
           "recurrent": "configs/recurrent.py:size=tiny"}


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the children as a user runs them: one CPU device
  env.update(JAX_PLATFORMS="cpu", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
  return env


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def run(request, tmp_path_factory):
  """A tiny trained run (3 steps) of each plan, through the train CLI."""
  wd = str(tmp_path_factory.mktemp(request.param) / "run")
  subprocess.run([sys.executable, "-m", "recursive_lm.train", "--config", CONFIGS[request.param], "--workdir", wd,
                  "--config.train.steps=3", "--config.train.eval_every=3", "--config.train.checkpoint_every=3",
                  "--config.train.eval_batches=1"], cwd=ROOT, env=_env(), check=True, capture_output=True)
  return wd


def _req(*args):
  return types.SimpleNamespace(args=args)


def _hand_logprob(model, tok, context, continuation):
  ctx = np.asarray(encode_prompt(tok, context), np.int32)
  ids = np.concatenate([ctx, np.asarray(tok.encode(continuation), np.int32)])
  logits = model(jnp.asarray(ids[None, :-1]))[0][0].astype(jnp.float32)
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
  k = len(ids) - len(ctx)
  pos = np.arange(len(ids) - 1 - k, len(ids) - 1)
  return float(logp[pos, ids[pos + 1]].sum()), bool((logp[pos].argmax(-1) == ids[pos + 1]).all())


def test_loglikelihood_equals_forward(run):
  from recursive_lm.lm_eval_model import RecursiveLM
  lm = RecursiveLM(workdir=run, batch_size=4)
  _, model, _ = load_checkpoint(run)
  docs = [json.loads(l) for l in open(os.path.join(TASKS, "local_mc.jsonl"))]
  reqs = [(d["question"], c) for d in docs for c in d["choices"]]
  got = lm.loglikelihood([_req(*r) for r in reqs])
  for (ctx, cont), (lp, greedy) in zip(reqs, got):
    want_lp, want_greedy = _hand_logprob(model, lm.tokenizer, ctx, cont)
    assert lp == pytest.approx(want_lp, rel=1e-4, abs=1e-4)
    assert greedy == want_greedy


def test_rolling_equals_evaluate_loss(run):
  from recursive_lm.lm_eval_model import RecursiveLM
  lm = RecursiveLM(workdir=run)
  cfg, model, _ = load_checkpoint(run)
  doc = "def add(a, b):\n    return a + b\n"
  [total] = lm.loglikelihood_rolling([_req(doc)])
  ids = np.asarray(encode_prompt(lm.tokenizer, doc), np.int32)
  batch = {"inputs": ids[None, :-1], "targets": ids[None, 1:]}
  loss, n = evaluate.evaluate(model, [batch])
  assert n == len(ids) - 1
  assert -total / n == pytest.approx(loss, rel=1e-5)


def test_rolling_long_document_scores_every_token_once(run, capsys):
  """Past the context, windows of max_length targets, each token scored once after the tokens before it."""
  from recursive_lm.lm_eval_model import RecursiveLM
  lm = RecursiveLM(workdir=run)
  lm.max_length = T = 16  # a 41-byte document: windows of targets 1-16, 17-32, 33-40
  doc = "x = [i * i for i in range(10)]  # squares"
  [total] = lm.loglikelihood_rolling([_req(doc)])
  _, model, _ = load_checkpoint(run)
  ids = np.asarray(encode_prompt(lm.tokenizer, doc), np.int32)
  want, i, n = 0.0, 0, len(ids) - 1
  while i < n:
    e = min(i + T, n)
    x = ids[max(0, e - T):e]
    logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(x[None]))[0][0].astype(jnp.float32)), np.float64)
    tgt = ids[max(0, e - T) + 1:e + 1]
    want += float(logp[np.arange(len(x)), tgt][-(e - i):].sum())
    i = e
  assert total == pytest.approx(want, rel=1e-4)
  # a loglikelihood request past the context keeps its last T + 1 tokens, said once
  lm.loglikelihood([_req(doc, " ok"), _req(doc + doc, " ok")])
  assert capsys.readouterr().err.count("truncated from the left") == 1


def test_generate_until_equals_engine(run):
  from recursive_lm.lm_eval_model import RecursiveLM
  lm = RecursiveLM(workdir=run, slots=2)
  cfg, model, _ = load_checkpoint(run)
  tok = data.get_tokenizer(cfg.data.tokenizer)
  prompts = ["def main(", "import o", "self."]
  got = lm.generate_until([_req(p, {"until": ["\n", ")"], "max_gen_toks": 8}) for p in prompts])
  want = Engine(model, tok, slots=2).generate(prompts, max_new_tokens=8, stop=["\n", ")"])
  assert got == [c.text for c in want]


@pytest.mark.slow
def test_lm_eval_cli_end_to_end(run, tmp_path):
  out = tmp_path / "res"
  r = subprocess.run([sys.executable, "-m", "recursive_lm.lm_eval_model", "--model", "recursive_lm", "--model_args",
                      f"workdir={run}", "--tasks", "rlm_local_mc,rlm_local_gen", "--include_path", TASKS,
                      "--output_path", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=500)
  assert r.returncode == 0, r.stderr[-3000:]
  results = [json.load(open(os.path.join(dp, f))) for dp, _, fs in os.walk(out) for f in fs if f.endswith(".json")]
  res = results[0]["results"]
  assert 0 <= res["rlm_local_mc"]["acc,none"] <= 1
  assert 0 <= res["rlm_local_gen"]["exact_match,none"] <= 1


def test_across_loops_scores_and_overthinking(tmp_path, monkeypatch):
  """A strictly tied run at loops 1, 2, 4: each score is the harness's at that count; gain and
  overthinking follow from the per-example results."""
  from recursive_lm import lm_eval_model
  wd = str(tmp_path / "rec")
  subprocess.run([sys.executable, "-m", "recursive_lm.train", "--config", "configs/recursive.py:size=tiny",
                  "--workdir", wd, "--config.train.steps=3", "--config.train.eval_every=3",
                  "--config.train.checkpoint_every=3", "--config.train.eval_batches=1"], cwd=ROOT, env=_env(),
                 check=True, capture_output=True)
  monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository root
  recs = lm_eval_model.across_loops(wd, [1, 2, 4], ["rlm_local_mc"], TASKS)
  assert [r["loops"] for r in recs] == [1, 2, 4]
  assert recs[0]["gain"] is None and recs[0]["overthinking"] is None
  for a, b in zip(recs, recs[1:]):
    assert b["gain"] == pytest.approx(b["score"] - a["score"])
    assert 0.0 <= b["overthinking"] <= 1.0
  # loops=2 is the trained depth: the same score as the model without a loop count
  lm = lm_eval_model.RecursiveLM(workdir=wd)
  docs = [json.loads(l) for l in open(os.path.join(TASKS, "local_mc.jsonl"))]
  right = []
  for d in docs:
    lps = [lp for lp, _ in lm.loglikelihood([_req(d["question"], c) for c in d["choices"]])]
    right.append(int(np.argmax(lps)) == d["answer"])
  assert recs[1]["score"] == pytest.approx(np.mean(right))
