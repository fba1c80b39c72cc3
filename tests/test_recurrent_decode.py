"""Test-time loop counts of a recurrent plan at inference: KV-cache decoding at
any loop count (more than trained included) against the full forward pass at
that count, the Engine and the CLIs (`sample --loops`, `generate --loops`), and
the per-token exit rules on the recurrent core."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.inference import exits, generate
from recursive_lm.inference.engine import Engine
from recursive_lm.inference.exits import ExitRule, forward_with_exits
from recursive_lm.model.recurrent import initial_state
from recursive_lm.model.recursion import apply_layer

from test_decode import V, build, full_forward, prompt

# prelude 1, core 2 blocks x 2 repeats (trained count), coda 1; per-depth LoRA and norms on the core.
RECURRENT = dict(preset="recurrent", num_layers=6, repeats=2, lora_rank=2, per_depth_norms=True, **{
    "model.plan.prelude": 1, "model.plan.coda": 1, "model.recurrent.injection": "concat"})
NEVER, ALWAYS = ExitRule("confidence", 1.0), ExitRule("confidence", 1e-9)


def full_at(model, tokens, loops):
  """Logits [B, T, V] of the cache-free forward pass with the core run `loops` times."""
  from flax import nnx
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, loops=loops)[0])(state, tokens)


@pytest.mark.parametrize("loops", [1, 2, 5])
def test_cached_greedy_at_any_loop_count_equals_the_full_forward(loops):
  """generate(loops=N) (prefill + decode through the scanned core, cache of
  U * N entries) picks the argmax of the full forward at N loops on the
  growing sequence, with the same logits; the Engine (unrolled decode) gives
  the same tokens. N = 5 is more than the trained 2: iterations 2..4 reuse
  repeat 1's LoRA and norms."""
  model = build(**RECURRENT)
  p, n = prompt(3, b=2, p=4), 5
  tokens, logits = generate(model, p, n, return_logits=True, loops=loops)
  full = full_at(model, tokens, loops)
  np.testing.assert_allclose(logits, full[:, p.shape[1] - 1:-1], rtol=1e-4, atol=1e-4)
  assert (np.asarray(tokens[:, p.shape[1]:]) == np.asarray(jnp.argmax(full[:, p.shape[1] - 1:-1], -1))).all()
  engine = Engine(model, slots=2, max_len=16, loops=loops)
  outs = engine.generate(list(np.asarray(p)), max_new_tokens=n)
  assert [o.tokens for o in outs] == np.asarray(tokens[:, p.shape[1]:]).tolist()
  if loops != 2:  # the count is really used: the plan's own count decodes differently
    assert not np.allclose(full, full_forward(model, tokens), atol=1e-3)


def test_bad_loop_counts_are_errors():
  model = build(**RECURRENT)
  for bad in (0, -2):
    with pytest.raises(ValueError, match=f"loops={bad} must be >= 1"):
      Engine(model, loops=bad)
    with pytest.raises(ValueError, match=f"loops={bad} must be >= 1"):
      generate(model, prompt(0), 2, loops=bad)
  with pytest.raises(ValueError, match="only a recurrent plan takes a loop count"):
    Engine(build(preset="cycle", num_layers=4, repeats=2), loops=3)
  with pytest.raises(ValueError, match="cache has 4"):  # a cache built for another count
    model(prompt(0), cache=model.init_cache(2, 8), cache_index=jnp.zeros((2,), jnp.int32), loops=3)


def _step_inputs(model, loops):
  seq = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 6)), jnp.int32)
  cache = model.init_cache(2, 8, loops=loops)
  _, cache, _ = model(seq[:, :5], cache=cache, cache_index=jnp.zeros((2,), jnp.int32), loops=loops)
  return seq[:, 5:6], cache, jnp.asarray([5, 5], jnp.int32)


def test_exits_without_an_exit_are_the_model_at_that_loop_count():
  model = build(**RECURRENT)
  tok, cache, pos = _step_inputs(model, 4)
  want, want_cache, _ = model(tok, cache=cache, cache_index=pos, loops=4)
  got, got_cache, ran = jax.jit(lambda c: forward_with_exits(model, tok, c, pos, NEVER, loops=4))(cache)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got_cache, want_cache)
  assert ran.tolist() == [4, 4]


def test_exit_after_the_first_iteration_runs_the_coda_on_that_state():
  """Every row exits after core iteration 1 of 3: the logits are the coda and
  readout of the state after one iteration (Huginn's exit, not a readout of the
  core state), later iterations' K/V are those their layers compute from that
  frozen state, and the coda's K/V are written from it too."""
  model = build(**RECURRENT)
  tok, cache, pos = _step_inputs(model, 3)
  got, got_cache, ran = jax.jit(lambda c: forward_with_exits(model, tok, c, pos, ALWAYS, loops=3))(cache)
  assert ran.tolist() == [1, 1]
  plan, ctx = model.plan, model.context(1, pos)[0]
  want = [dict(c) for c in cache]

  def run(stage_i, layers, x, entries):
    for n, layer in zip(entries, layers):
      x, entry, _ = apply_layer(model.stages[stage_i], layer, x, ctx, jax.tree.map(lambda a: a[n], want[stage_i]))
      want[stage_i] = jax.tree.map(lambda a, v: a.at[n].set(v), want[stage_i], entry)
    return x

  x = run(0, plan.stage_layers(0), model.embed(tok, jnp.float32), [0])
  core = plan.loop_layers(1, 3)
  s = run(1, core[:2], model.injection(initial_state("normal", x, None, ctx.positions), x), [0, 1])
  for n, layer in enumerate(core[2:], start=2):  # the frozen state is every later core layer's input
    run(1, [layer], s, [n])
  np.testing.assert_allclose(got, model.readout(run(2, plan.stage_layers(2), s, [0])), rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got_cache, want)
  full = model(tok, cache=cache, cache_index=pos, loops=3)[0]
  assert float(jnp.max(jnp.abs(full - got))) > 1e-3  # the exit changes the prediction


def test_engine_kl_exit_on_the_recurrent_core():
  """KL rule (Huginn's) in the engine at 6 loops: a huge EPS exits every token
  after iteration 2 (nothing to compare after 1), a tiny one never; in
  between, rows exit on their own and the batched engine gives every request
  the tokens and exit loops it gets alone."""
  model = build(**RECURRENT)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, V, n).astype(np.int32) for n in (2, 7, 4, 9)]
  kw = dict(max_new_tokens=5)
  never = Engine(model, slots=2, exit="kl:1e-30", loops=6).generate(prompts, **kw)
  plain = Engine(model, slots=2, loops=6).generate(prompts, **kw)
  assert [c.tokens for c in never] == [c.tokens for c in plain] and all(c.mean_exit_loop == 6 for c in never)
  soon = np.concatenate([c.exit_loops for c in Engine(model, slots=2, exit="kl:1e9", loops=6).generate(prompts, **kw)])
  assert (soon == 2).all()
  # An EPS between the KL values this model shows, so some tokens exit early and some do not.
  rule = "kl:1.1"  # successive KLs of this random model lie around 0.7-2.6
  batched = Engine(model, slots=3, exit=rule, chunk=3, loops=6).generate(prompts, **kw)
  alone = [Engine(model, slots=1, exit=rule, loops=6).generate([p], **kw)[0] for p in prompts]
  for b, a in zip(batched, alone):
    assert b.tokens == a.tokens and b.exit_loops == a.exit_loops
  every = np.concatenate([c.exit_loops for c in batched])
  assert len(set(every.tolist())) > 1, every


@pytest.fixture(scope="module")
def recurrent_run(tmp_path_factory):
  import tiny_run
  from recursive_lm import config as config_lib
  from recursive_lm import train
  workdir = str(tmp_path_factory.mktemp("recurrent_run"))
  train.run(config_lib.load(tiny_run.config("batch=8,steps=2,eval_every=2,checkpoint_every=2", **{
      "model.plan.preset": "recurrent", "model.plan.num_layers": 6, "model.plan.repeats": 2,
      "model.plan.prelude": 1, "model.plan.coda": 1, "model.recurrent.sample": "uniform",
      "model.recurrent.max_loops": 4, "model.recurrent.backprop_depth": 2})), workdir)
  return workdir


@pytest.mark.slow
def test_sample_and_generate_clis_take_a_loop_count(recurrent_run, tmp_path):
  """`sample --loops 5` and `generate --loops 5` (more than the trained 2)
  print what greedy `generate(loops=5)` decodes; `generate --exit kl:EPS
  --loops 5` reports the loops each request ran per token; `--loops 0` or
  negative: one error line, exit 2, no output file."""
  from recursive_lm import data
  from recursive_lm.data.tokenizers import encode_prompt
  from recursive_lm.inference import load_checkpoint
  from test_train_e2e import finish, start
  prompts = ["def ", "import os\n"]
  inp = tmp_path / "in.jsonl"
  inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
  base = ("--max_new_tokens=6", "--ignore_eos")
  procs = {
      "sample": start("recursive_lm.sample", f"--workdir={recurrent_run}", "--prompt=def ", "--loops=5", *base),
      "generate": start("recursive_lm.generate", f"--workdir={recurrent_run}", f"--input={inp}",
                        f"--output={tmp_path / 'out.jsonl'}", "--loops=5", *base),
      "exits": start("recursive_lm.generate", f"--workdir={recurrent_run}", f"--input={inp}",
                     f"--output={tmp_path / 'exits.jsonl'}", "--loops=5", "--exit=kl:1e9", *base),
      "sample0": start("recursive_lm.sample", f"--workdir={recurrent_run}", "--prompt=def ", "--loops=0"),
      "generate-1": start("recursive_lm.generate", f"--workdir={recurrent_run}", f"--input={inp}",
                          f"--output={tmp_path / 'bad.jsonl'}", "--loops=-1"),
  }
  r = {name: finish(p) for name, p in procs.items()}
  cfg, model, _ = load_checkpoint(recurrent_run)
  tok = data.get_tokenizer(cfg.data.tokenizer)
  want = []
  for p in prompts:
    ids = encode_prompt(tok, p)
    want.append(tok.decode(np.asarray(generate(model, ids[None], 6, loops=5))[0, ids.size:]))
  assert r["sample"].returncode == 0, r["sample"].stderr
  assert r["sample"].stdout == "def " + want[0] + "\n"
  assert r["generate"].returncode == 0, r["generate"].stderr
  assert [json.loads(l)["completion"] for l in open(tmp_path / "out.jsonl")] == want
  assert r["exits"].returncode == 0, r["exits"].stderr
  assert [json.loads(l)["mean_exit_loop"] for l in open(tmp_path / "exits.jsonl")] == [2.0, 2.0]
  for name, value in (("sample0", 0), ("generate-1", -1)):
    assert r[name].returncode == 2 and r[name].stdout == ""
    assert r[name].stderr.strip() == f"error: --loops={value} must be >= 1 (the recurrent core's loop count)"
  assert not (tmp_path / "bad.jsonl").exists()


def test_loops_flag_on_a_plan_without_a_core_is_a_config_error():
  from recursive_lm import cli
  from recursive_lm import config as config_lib
  from recursive_lm.config import ConfigError
  from conftest import tiny_config
  cfg = config_lib.load(tiny_config(preset="cycle", num_layers=4, repeats=2))
  with pytest.raises(ConfigError, match="--loops=3: only a recurrent plan .* this run's plan is 'cycle'"):
    cli.check_loops(3, cfg)
