"""Mixture-of-Recursions in generation (recursive_lm/model/mor.py `run_causal`).

Reference: the cache-free forward with routing='threshold' (each recursion
step masked, every token deciding by its own router), recomputed from scratch
on the growing sequence at every decoded step. KV-cache decoding (`generate`),
prefill, the serving engine and depth-wise batching must give its tokens, for
expert and token routing, with recursion-wise caching (kv_sharing 'none') and
sharing ('recursion').
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recursive_lm.inference import generate
from recursive_lm.inference.engine import Engine

from test_decode import V, build

CASES = [("expert", "none"), ("expert", "recursion"), ("token", "none"), ("token", "recursion")]


def routed(routing, kv="none", **extra):
  """first block, 2 unique blocks x 3 recursions (LoRA, per-depth norms), last
  block. Expert capacities below 1 at step 0 too, so tokens of depth 0 occur."""
  caps = "0.9,0.6,0.3" if routing == "expert" else ""
  return build(preset="middle_cycle", num_layers=8, repeats=3, lora_rank=2, per_depth_norms=True,
               **{"model.mor.routing": routing, "model.mor.capacities": caps, "model.kv_sharing": kv,
                  "model.mor.router_scale": 0.5}, **extra)


def reference(model):
  """tokens [B, T] -> (logits [B, T, V], router depths [B, T]) of the cache-free threshold-routed forward."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, routing="threshold"))

  def run(tokens):
    logits, _, aux = fn(state, tokens)
    return np.asarray(logits), np.asarray(aux["router_depth"])
  return run


def _prompts(lengths, seed=5):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, V, n).astype(np.int32) for n in lengths]


@pytest.mark.parametrize("routing,kv", CASES)
def test_generate_equals_recomputation_from_scratch(routing, kv):
  model = routed(routing, kv)
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 4)), jnp.int32)
  n = 5
  toks, logits = generate(model, prompt, n, return_logits=True)
  toks, logits = np.asarray(toks), np.asarray(logits)
  ref = reference(model)
  depths = set()
  for j in range(n):  # the whole prefix again, without a cache, for every new token
    full, depth = ref(toks[:, :4 + j])
    np.testing.assert_allclose(logits[:, j], full[:, -1], rtol=1e-4, atol=1e-4, err_msg=f"token {j}")
    np.testing.assert_array_equal(toks[:, 4 + j], full[:, -1].argmax(-1))
    depths |= set(depth.ravel().tolist())
  assert len(depths) > 1, depths  # tokens really took different depths
  if routing == "expert":
    assert 0 in depths  # and some none at all (step 0 below capacity 1 thresholds too)


@pytest.mark.parametrize("routing,bias,caps,want", [
    ("expert", [9.0, 9.0, -9.0], "1,0.5,0.5", 2), ("expert", [-9.0, -9.0, 9.0], "1,0.5,0.5", 1),
    ("expert", [-9.0, 9.0, 9.0], "0.5,0.5,0.5", 0), ("expert", [9.0, 9.0, 9.0], "0.5,0.5,0.5", 3),
    ("expert", [9.0, -9.0, 9.0], "1,1,0.5", 3), ("token", [-9.0, 9.0, -9.0], "", 2),
    ("token", [-9.0, -9.0, 9.0], "", 3)])
def test_causal_routing_follows_the_rule(routing, bias, caps, want):
  """Routers pushed far to one side: expert routing thresholds each step at
  0.5 (a step of capacity 1 takes every token still active), token routing
  gives the argmax depth; prefill with a cache and the cache-free reference
  agree, and unlike training's top-k neither fills a capacity."""
  model = build(preset="middle_cycle", num_layers=8, repeats=3,
                **{"model.mor.routing": routing, "model.mor.capacities": caps})
  model.router.w[...] = jnp.zeros_like(model.router.w[...])
  model.router.b[...] = jnp.asarray(bias, model.router.b[...].dtype)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, V, (2, 6)), jnp.int32)
  _, _, aux = model(tokens, routing="threshold")
  np.testing.assert_array_equal(aux["router_depth"], np.full((2, 6), want))
  _, _, aux = model(tokens, cache=model.init_cache(2, 8), cache_index=jnp.zeros((2,), jnp.int32))
  np.testing.assert_array_equal(aux["router_depth"], np.full((2, 6), want))


@pytest.mark.parametrize("routing,kv", [("expert", "none"), ("token", "recursion")])
def test_prefill_equals_token_by_token(routing, kv):
  """One call over the prompt writes the cache (K/V where valid, and 'valid')
  and gives the logits that feeding its tokens one at a time does."""
  model = routed(routing, kv)
  b, p = 2, 9
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (b, p)), jnp.int32)
  graphdef, state = nnx.split(model)
  call = jax.jit(lambda s, t, c, i: nnx.merge(graphdef, s)(t, cache=c, cache_index=i)[:2])
  logits_all, cache_all = call(state, tokens, model.init_cache(b, 16), jnp.zeros((b,), jnp.int32))
  cache, steps = model.init_cache(b, 16), []
  for t in range(p):
    out, cache = call(state, tokens[:, t:t + 1], cache, jnp.full((b,), t, jnp.int32))
    steps.append(np.asarray(out[:, 0]))
  np.testing.assert_allclose(np.stack(steps, 1), logits_all, rtol=1e-4, atol=1e-4)
  for i, (one, each) in enumerate(zip(cache_all, cache)):
    keep = np.ones(one["k"].shape[:3], bool)
    if i == model.routed:  # the entries a query may read; the others hold whatever an unchosen token computed
      np.testing.assert_array_equal(one["valid"], each["valid"])
      keep = np.asarray(one["valid"])
      assert keep[:, :, :p].any() and not keep[:, :, :p].all()
    for name in ("k", "v"):
      np.testing.assert_allclose(np.asarray(one[name])[keep], np.asarray(each[name])[keep], rtol=1e-4, atol=1e-4,
                                 err_msg=f"stage {i} {name}")


def test_keys_of_tokens_a_step_did_not_choose_are_never_read():
  """Noise in every cache entry whose 'valid' is off leaves the next token's
  logits unchanged; noise in one valid entry changes them."""
  model = routed("expert")
  b, p = 2, 10
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, V, (b, p + 1)), jnp.int32)
  graphdef, state = nnx.split(model)
  call = jax.jit(lambda s, t, c, i: nnx.merge(graphdef, s)(t, cache=c, cache_index=i)[:2])
  _, cache = call(state, tokens[:, :p], model.init_cache(b, 16), jnp.zeros((b,), jnp.int32))
  step = lambda c: np.asarray(call(state, tokens[:, p:], c, jnp.full((b,), p, jnp.int32))[0])
  want = step(cache)
  stage = dict(cache[model.routed])
  valid = np.asarray(stage["valid"])[..., None, None]
  assert valid[:, :, :p].any() and not valid[:, :, :p].all()
  rng = np.random.default_rng(3)
  noisy = lambda a, where: jnp.where(where, a + jnp.asarray(rng.standard_normal(a.shape), a.dtype), a)
  hidden = list(cache)
  hidden[model.routed] = {**stage, "k": noisy(stage["k"], ~valid), "v": noisy(stage["v"], ~valid)}
  np.testing.assert_allclose(step(hidden), want, rtol=1e-5, atol=1e-5)
  one = np.zeros(valid.shape, bool)
  n, row, pos = (int(a[0]) for a in np.nonzero(np.asarray(stage["valid"])[:, :, :p]))
  one[n, row, pos] = True
  seen = list(cache)
  seen[model.routed] = {**stage, "k": noisy(stage["k"], one), "v": noisy(stage["v"], one)}
  assert np.abs(step(seen)[row] - want[row]).max() > 1e-4


@pytest.mark.parametrize("routing,kv", [("expert", "none"), ("token", "recursion")])
def test_engine_equals_generate(routing, kv):
  """More requests than slots (rows reused, stale entries behind them): each
  request gets generate's tokens, and its recursions per decoded token."""
  model = routed(routing, kv)
  lengths, budgets = [1, 5, 17, 3, 9], [6, 2, 9, 4, 5]
  prompts = _prompts(lengths)
  eng = Engine(model, slots=2, buckets=(4, 8, 16, 32), chunk=2)
  for i, (p, n) in enumerate(zip(prompts, budgets)):
    eng.submit(p, max_new_tokens=n, id=i)
  got = {c.id: c for c in eng.stream()}
  padded = np.zeros((len(prompts), max(lengths)), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :p.size] = p
  ref = np.asarray(generate(model, padded, max(budgets), prompt_lengths=lengths))
  full = reference(model)
  for i, p in enumerate(prompts):
    want = ref[i, p.size:p.size + budgets[i]]
    np.testing.assert_array_equal(got[i].tokens, want, err_msg=f"request {i}")
    # Recursions of decoded token j (fed at position P + j, j >= 1): the reference's router depth there.
    _, depth = full(np.concatenate([p, want])[None, :-1])
    np.testing.assert_array_equal(got[i].exit_loops, depth[0, p.size:], err_msg=f"request {i}")


def test_engine_refuses_exits_and_speculation_with_routers():
  model = routed("expert")
  for kw in (dict(exit="confidence:0.9"), dict(speculate=2)):
    with pytest.raises(ValueError, match="the routers decide each token's depth"):
      Engine(model, slots=2, **kw)


@pytest.mark.parametrize("routing", ["expert", "token"])
def test_depthwise_engine_equals_plain_engine(routing):
  """Depth-wise batching with the router as exit rule: a token the router stops
  leaves its slot (re-entering at loop 0 with the next token), so slots sit at
  different steps; every request gets the plain engine's tokens and recursions.
  Slots are reused (stale entries, 'valid' included, behind each new request)."""
  model = routed(routing, **{"model.mor.weighting": "unit"})  # a step's full update: keys matter more
  # Short prompts after long requests, in small buckets: decoded positions a slot's earlier request wrote.
  lengths, budgets = [17, 9, 5, 1, 3, 2], [9, 5, 4, 6, 7, 8]
  prompts = _prompts(lengths)
  out = []
  for depthwise in (False, True):
    eng = Engine(model, slots=3, buckets=(2, 4, 8, 16, 32), chunk=2, depthwise=depthwise)
    if depthwise:
      eng.depthwise.ticks = 4  # not a multiple of the loops: requests are admitted mid-loop of the others
    last, admit = {}, eng._admit

    def record(admitted, admit=admit, last=last):  # the last request each slot took
      last.update((slot, req.id) for slot, req in admitted)
      return admit(admitted)

    eng._admit = record
    for i, (p, n) in enumerate(zip(prompts, budgets)):
      eng.submit(p, max_new_tokens=n, id=i)
    done = {c.id: c for c in eng.stream()}
    out.append(done)
    # Each slot's cache row: at every position its last request decoded, step r's entries hold the token as a
    # key exactly when it took more than r recursions (whatever an earlier request left there).
    valid = np.asarray(eng._cache[model.routed]["valid"]).reshape(3, 2, 3, -1)  # [step, block, slot, S]
    for slot, rid in last.items():
      p, depths = lengths[rid], np.asarray(done[rid].exit_loops)
      for r in range(3):
        want = np.broadcast_to(depths > r, (2, depths.size))
        np.testing.assert_array_equal(valid[r, :, slot, p:p + depths.size], want,
                                      err_msg=f"depthwise={depthwise} request {rid} step {r}")
  plain, depthwise = out
  for i in range(len(prompts)):
    assert depthwise[i].tokens == plain[i].tokens, i
    assert depthwise[i].exit_loops == plain[i].exit_loops, i
  used = [d for c in plain.values() for d in c.exit_loops]
  assert len(set(used)) > 1 and min(used) < 3  # tokens left their slots before the last step


@pytest.mark.slow
def test_generate_cli_on_a_trained_routed_run(tmp_path):
  """configs/mor.py:size=tiny trained through the CLI, then `recursive_lm.generate
  --depthwise` on it: completions are plain `generate`'s, mean_exit_loop the
  mean recursions the plain engine's decoded tokens took."""
  from recursive_lm import data
  from recursive_lm.data.tokenizers import encode_prompt
  from recursive_lm.inference import load_checkpoint
  from test_train_e2e import cli

  wd, inp, out = tmp_path / "run", tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "mor.py")
  r = cli("recursive_lm.train", f"--config={config}:size=tiny", f"--workdir={wd}", "--config.train.steps=4",
          "--config.train.eval_every=4", "--config.train.checkpoint_every=4")
  assert r.returncode == 0, r.stderr[-3000:]
  prompts = ["def f(x):", "import os\n", "The"]
  inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
  r = cli("recursive_lm.generate", f"--workdir={wd}", f"--input={inp}", f"--output={out}", "--max_new_tokens=12",
          "--slots=2", "--depthwise", "--ignore_eos")
  assert r.returncode == 0, r.stderr[-3000:]
  recs = [json.loads(line) for line in out.read_text().splitlines()]
  cfg, model, _ = load_checkpoint(str(wd))
  tok = data.get_tokenizer(cfg.data.tokenizer)
  ids = [np.asarray(encode_prompt(tok, p), np.int32) for p in prompts]
  plain = Engine(model, tok, slots=2, stop_at_eos=False).generate(ids, max_new_tokens=12)
  for rec, p, c in zip(recs, ids, plain):
    want = np.asarray(generate(model, p[None], 12))[0, p.size:]
    assert rec["completion"] == tok.decode(want) and rec["new_tokens"] == 12
    assert rec["mean_exit_loop"] == pytest.approx(np.mean(c.exit_loops)) and 0 <= rec["mean_exit_loop"] <= 3
