"""Few-loop self-speculation (recursive_lm.inference.speculate) against plain decoding.

Greedy output of `Engine(speculate=K)` must be exactly `generate`'s, for
prompts of different lengths admitted at different ticks, on tied plans with
per-depth LoRA and sliding windows (3 loops, drafts after 1 or 2), with a
stage after the loops, and with recursion KV sharing; sampled output must be
the plain engine's draws (same seeds); EOS ends a request inside a round. The
draft is checked against its reference (the layers up to the loop boundary,
read out). The CLI takes --speculate and refuses bad values with exit 2.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.inference import generate, speculate
from recursive_lm.inference.engine import Engine

from test_decode import V, build, full_forward
from test_engine import _Letters, _prompts

LOOPS3 = dict(preset="cycle", num_layers=6, repeats=3, lora_rank=2, **{
    "model.sliding_window": 4, "model.global_every": 2, "model.rope_base_local": 100.0})
LENGTHS, BUDGETS = [1, 5, 17, 3, 9, 2], [9, 3, 12, 6, 1, 10]


def _reference(model, prompts, n):
  padded = np.zeros((len(prompts), max(p.size for p in prompts)), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :p.size] = p
  out = np.asarray(generate(model, padded, n, prompt_lengths=[p.size for p in prompts]))
  return [out[i, p.size:p.size + n] for i, p in enumerate(prompts)]


CASES = {
    "windows_lora_draft1_k3": (LOOPS3, 1, 3),
    "windows_lora_draft2_k5": (LOOPS3, 2, 5),
    "k1": (LOOPS3, 1, 1),
    "middle_cycle": (dict(preset="middle_cycle", num_layers=6, repeats=2, lora_rank=2), 1, 4),
    "recursion_kv": ({**LOOPS3, "model.global_every": 0, "model.kv_sharing": "recursion"}, 1, 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_speculation_equals_plain_decoding(case):
  overrides, draft_loops, k = CASES[case]
  model = build(**overrides)
  prompts = _prompts(LENGTHS)
  ref = _reference(model, prompts, max(BUDGETS))
  eng = Engine(model, slots=3, buckets=(4, 8, 32), chunk=2, speculate=k, draft_loops=draft_loops)
  for i, (p, n) in enumerate(zip(prompts, BUDGETS)):
    eng.submit(p, max_new_tokens=n, id=i)
  got = {c.id: c for c in eng.stream()}
  for i, n in enumerate(BUDGETS):
    np.testing.assert_array_equal(got[i].tokens, ref[i][:n], err_msg=f"request {i}")
    assert got[i].finish_reason == "length"
  spec = eng.speculation
  assert 0 <= spec["accepted"] <= spec["drafted"] and spec["drafted"] % k == 0 and spec["drafted"] > 0


def test_draft_is_the_model_read_out_after_its_first_loops():
  """forward_draft over a whole prompt (no earlier cache) = the layers through the loop boundary, read out;
  its cache entries of those layers equal the full forward's, and it equals the full model at all loops' depth."""
  model = build(**LOOPS3)
  tokens = jnp.asarray(_prompts([7])[0])[None]
  depth = speculate.draft_depth(model, 2)
  assert depth == 4  # 2 unique blocks x 2 loops
  cache = model.init_cache(1, 8)
  logits, cache = speculate.forward_draft(model, tokens, cache, jnp.zeros((1,), jnp.int32), depth)
  full_cache = model.init_cache(1, 8)
  full, full_cache, _ = model(tokens, cache=full_cache, cache_index=jnp.zeros((1,), jnp.int32))
  np.testing.assert_allclose(cache[0]["k"][:depth], full_cache[0]["k"][:depth], rtol=1e-5, atol=1e-6)
  assert not np.allclose(cache[0]["k"][depth:], full_cache[0]["k"][depth:])  # later layers untouched
  assert not np.allclose(logits, full, atol=1e-3)
  whole, _ = speculate.forward_draft(model, tokens, model.init_cache(1, 8), jnp.zeros((1,), jnp.int32), 6)
  np.testing.assert_allclose(whole, full_forward(model, tokens), rtol=1e-4, atol=1e-5)


def test_sampled_speculation_equals_the_plain_engine():
  model = build(**LOOPS3)
  prompts = _prompts([3, 6, 2, 8], seed=7)
  kw = dict(max_new_tokens=9, temperature=1.3, top_k=6)
  plain = Engine(model, slots=2, seed=3).generate(prompts, **kw)
  spec = Engine(model, slots=3, seed=3, speculate=4, chunk=3).generate(prompts, **kw)
  assert [c.tokens for c in plain] == [c.tokens for c in spec]


def test_eos_inside_a_round_ends_the_request():
  model = build(**LOOPS3)
  tok = _Letters()
  prompts = [tok.decode(p) for p in _prompts([2, 5, 3])]
  free = Engine(model, tok, slots=2).generate(prompts, max_new_tokens=10)
  eos = free[0].tokens[4]
  plain = Engine(model, _Letters(eos), slots=2).generate(prompts, max_new_tokens=10)
  spec = Engine(model, _Letters(eos), slots=2, speculate=3).generate(prompts, max_new_tokens=10)
  assert [(c.tokens, c.finish_reason, c.text) for c in plain] == [(c.tokens, c.finish_reason, c.text) for c in spec]
  assert spec[0].finish_reason == "eos"


def test_bad_speculation_settings():
  model = build(**LOOPS3)
  for kw, needle in [(dict(speculate=-1), "speculate=-1"), (dict(speculate=33), "max_seq_len=32"),
                     (dict(speculate=2, exit="kl:0.1"), "cannot be combined"),
                     (dict(speculate=2, draft_loops=3), r"draft_loops=3 must lie in \[1, 2\]"),
                     (dict(speculate=2, draft_loops=0), "draft_loops=0")]:
    with pytest.raises(ValueError, match=needle):
      Engine(model, **kw)
  with pytest.raises(ValueError, match="speculate .* needs a plan with exactly one repeated stage"):
    Engine(build(preset="vanilla", num_layers=2), speculate=2)


# ---------------------------------------------------------------- the CLI

from test_generate_cli import _write, run_dir  # noqa: E402,F401  (the module-scoped tiny trained run)
from test_train_e2e import cli  # noqa: E402


@pytest.mark.slow
def test_generate_cli_speculate(run_dir, tmp_path):  # noqa: F811
  inp = tmp_path / "in.jsonl"
  _write(inp, [json.dumps({"id": i, "prompt": p, "max_new_tokens": n})
               for i, (p, n) in enumerate([("def ", 9), ("class A", 14), ("import", 3)])])
  recs = {}
  for k in (0, 3):
    out = tmp_path / f"k{k}.jsonl"
    r = cli("recursive_lm.generate", f"--workdir={run_dir}", f"--input={inp}", f"--output={out}",
            f"--speculate={k}", "--slots=2")
    assert r.returncode == 0, r.stderr
    recs[k] = [json.loads(l) for l in open(out)]
    assert ("draft acceptance" in r.stdout) == (k > 0), r.stdout
  assert recs[0] == recs[3]


@pytest.mark.parametrize("args,needle", [(["--speculate=-1"], "--speculate=-1 must lie in [0, the model's context"),
                                         (["--speculate=100000"], "--speculate=100000 must lie in"),
                                         (["--speculate=2", "--draft_loops=5"], "draft_loops=5 must lie in"),
                                         (["--speculate=2", "--exit=kl:0.1"], "cannot be combined")])
def test_generate_cli_bad_speculate(run_dir, tmp_path, args, needle):  # noqa: F811
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write(inp, [json.dumps({"id": 1, "prompt": "a"})])
  r = cli("recursive_lm.generate", f"--workdir={run_dir}", f"--input={inp}", f"--output={out}", *args)
  assert r.returncode == 2
  assert r.stderr.count("error:") == 1 and needle in r.stderr, r.stderr
  assert not (tmp_path / "out.jsonl").exists()
