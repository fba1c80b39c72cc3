"""Synthetic algorithmic tasks: generators, grain state, masked loss, accuracy."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recursive_lm import config as config_lib
from recursive_lm import data
from recursive_lm.data import synthetic
from recursive_lm.train_step import cross_entropy, make_eval_step


def _data_cfg(task="parity", train="1-8", evals="9-16", seq_len=0, batch_size=8):
  c = config_lib.base_config()
  c.data.source, c.data.task, c.data.train_lengths, c.data.eval_lengths = "synthetic", task, train, evals
  c.data.seq_len = seq_len or (synthetic.max_example_len(task, max(synthetic.parse_lengths(train) + synthetic.parse_lengths(evals))) - 1
                             if task in synthetic.TASKS else 64)
  c.data.batch_size = batch_size
  return config_lib.load(c).data


def _decode(ex):
  """(question, answer) bytes back from an encoded example."""
  valid = ex["targets"] >= 0
  t0 = int(np.argmax(valid))
  answer = bytes(ex["targets"][valid].astype(np.uint8))
  question = bytes(ex["inputs"][:t0 + 1].astype(np.uint8))
  return question, answer


def _check_answer(task, q, a, hops=2):
  if task == "parity":
    bits = q[:-1].decode()
    assert q.endswith(b"=") and set(bits) <= {"0", "1"}
    assert a.decode() == str(bits.count("1") % 2)
    return len(bits)
  if task == "addition":
    x, y = q[:-1].decode().split("+")
    assert int(a.decode()[::-1]) == int(x[::-1]) + int(y[::-1]) and len(a) == len(x) + 1 == len(y) + 1
    return len(x)
  if task == "copy":
    assert q.endswith(b"|") and a == q[:-1]
    return len(a)
  if task == "induction":
    s = list(q[:-1])
    i = len(s) - 1
    for _ in range(hops):
      i = max(j for j in range(i) if s[j] == s[i]) + 1
    assert a == bytes([s[i]])
    return len(s)
  raise AssertionError(task)


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_generators_deterministic_correct_and_lengths(task):
  train, evals = ("3-6", "7-9") if task == "induction" else ("1-4", "5-7")
  cfg = _data_cfg(task, train, evals)
  for split, spec in (("train", train), ("eval", evals)):
    src = synthetic.source_for(cfg, split, synthetic.parse_lengths(spec))
    again = synthetic.source_for(cfg, split, synthetic.parse_lengths(spec))
    seen = set()
    for i in range(60):
      ex = src[i]
      np.testing.assert_array_equal(ex["inputs"], again[i]["inputs"])
      np.testing.assert_array_equal(ex["targets"], again[i]["targets"])
      assert ex["inputs"].shape == ex["targets"].shape == (cfg.seq_len,)
      # targets are the next inputs wherever they count; everything else ignored
      valid = ex["targets"] >= 0
      np.testing.assert_array_equal(ex["targets"][:-1][valid[:-1]], ex["inputs"][1:][valid[:-1]])
      n = _check_answer(task, *_decode(ex))
      assert n in synthetic.parse_lengths(spec)
      seen.add(n)
    assert len(seen) > 1
  # train and eval splits differ at the same index
  tr = synthetic.source_for(cfg, "train", (4,))
  ev = synthetic.source_for(cfg, "eval", (4,))
  assert any(not np.array_equal(tr[i]["inputs"], ev[i]["inputs"]) for i in range(5))


def test_config_validation():
  with pytest.raises(config_lib.ConfigError, match="data.task"):
    _data_cfg("sorting")
  with pytest.raises(config_lib.ConfigError, match="seq_len"):
    _data_cfg("addition", "1-8", "9-16", seq_len=20)
  with pytest.raises(config_lib.ConfigError, match="train_lengths"):
    _data_cfg("parity", "0-3", seq_len=32)
  assert config_lib.load(config_lib.base_config()).data.task == "parity"  # defaults, LM data untouched


def test_grain_state_restore():
  cfg = _data_cfg("addition", "1-4", "5-6", batch_size=4)
  it = data.train_iterator(cfg, seed=3)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  it2 = data.train_iterator(cfg, seed=3)
  it2.set_state(state)
  for w in want:
    got = next(it2)
    for k in ("inputs", "targets"):
      np.testing.assert_array_equal(got[k], w[k])
  assert want[0]["inputs"].shape == (4, cfg.seq_len)
  ev = data.eval_batches(cfg, 2)
  assert len(ev) == 2 and ev[0]["targets"].shape == (4, cfg.seq_len)


def test_masked_loss_ignores_non_answer_positions():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 6, 11)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, (2, 6)), jnp.int32)
  # no negative targets: bit-identical to the plain mean
  plain = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  assert float(jax.jit(cross_entropy)(logits, targets)) == float(jax.jit(lambda a, b: optax.softmax_cross_entropy_with_integer_labels(a, b).mean())(logits, targets))
  np.testing.assert_allclose(float(cross_entropy(logits, targets)), float(plain), rtol=1e-6)
  mask = np.zeros((2, 6), bool)
  mask[0, 2] = mask[1, 4] = mask[1, 5] = True
  masked = jnp.where(jnp.asarray(mask), targets, synthetic.IGNORE)
  per = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  np.testing.assert_allclose(float(cross_entropy(logits, masked)), float(per[mask].mean()), rtol=1e-6)
  # changing logits at ignored positions changes neither loss nor gradient there
  bumped = logits.at[0, 0].add(5.0)
  assert float(cross_entropy(bumped, masked)) == float(cross_entropy(logits, masked))
  g = jax.grad(lambda l: cross_entropy(l, masked))(logits)
  assert float(jnp.abs(g[0, 0]).sum()) == 0.0


def test_exact_match_and_accuracy_on_perfect_predictor():
  cfg = _data_cfg("addition", "1-3", "4-5", batch_size=4)
  (b,) = synthetic.batches(cfg, (3,), 8, 8)
  perfect = np.where(b["targets"] >= 0, b["targets"], 7)
  assert synthetic.exact_match(perfect, b["targets"]).all()
  wrong = perfect.copy()
  row, col = 2, int(np.argmax(b["targets"][2] >= 0)) + 1  # second answer digit of row 2
  wrong[row, col] = (wrong[row, col] + 1) % 256
  em = synthetic.exact_match(wrong, b["targets"])
  assert not em[row] and em.sum() == 7


def test_accuracy_of_perfect_and_wrong_predictor_stubs():
  """A stub that looks each example up and returns its true next bytes scores 1.0
  per length; one that always predicts '0' scores the share of all-zero answers."""
  from recursive_lm import evaluate as ev
  c = config_lib.base_config()
  c.data.source, c.data.task, c.data.train_lengths, c.data.eval_lengths, c.data.seq_len = (
      "synthetic", "parity", "1-3", "4-5", 8)
  cfg = config_lib.load(c)
  table = {}
  for n in (2, 5):
    for b in synthetic.batches(cfg.data, (n,), 32, 64):
      for i, t in zip(b["inputs"], b["targets"]):
        table[i.tobytes()] = np.maximum(t, 0)
  perfect = lambda x: np.stack([table[r.tobytes()] for r in np.asarray(x)])
  assert ev.accuracy_of_predictor(perfect, cfg, (2, 5), n_examples=32) == {2: 1.0, 5: 1.0}
  zeros = lambda x: np.full(np.shape(x), ord("0"))
  acc = ev.accuracy_of_predictor(zeros, cfg, (2, 5), n_examples=32)
  for n in (2, 5):
    (b,) = synthetic.batches(cfg.data, (n,), 32, 64)
    want = float((b["targets"][b["targets"] >= 0] == ord("0")).mean())
    assert acc[n] == pytest.approx(want) and 0.0 < acc[n] < 1.0


def test_accuracy_by_length_real_model_and_loops():
  from flax import nnx
  from recursive_lm import evaluate as ev
  from recursive_lm.model.transformer import Transformer
  c = config_lib.base_config()
  c.model.d_model, c.model.num_heads, c.model.num_kv_heads, c.model.mlp_dim = 16, 2, 2, 32
  c.model.plan.preset, c.model.plan.num_layers = "looped", 2
  c.data.source, c.data.task, c.data.train_lengths, c.data.eval_lengths, c.data.seq_len = (
      "synthetic", "parity", "1-2", "3-4", 6)
  cfg = config_lib.load(c)
  model = Transformer(cfg.model, nnx.Rngs(0))
  acc = ev.accuracy_by_length(model, cfg, (1, 3), n_examples=8)
  assert set(acc) == {1, 3} and all(0.0 <= v <= 1.0 for v in acc.values())
  # same params, more loops: the looped model at 2 loops equals the loops=2 rerun
  assert ev.accuracy_by_length(model, cfg, (1, 3), n_examples=8, loops=2) == acc
  m4, cfg4 = ev.with_loops(model, cfg, 4)
  assert cfg4.model.plan.num_layers == 4
  x = jnp.zeros((1, 6), jnp.int32)
  assert m4(x)[0].shape == model(x)[0].shape
  c.model.lora.rank, c.model.plan.preset, c.model.plan.repeats = 2, "cycle", 2
  cfg_l = config_lib.load(c)
  with pytest.raises(config_lib.ConfigError, match="per-depth slots"):
    ev.with_loops(Transformer(cfg_l.model, nnx.Rngs(0)), cfg_l, 3)


def test_lm_eval_step_counts_unchanged():
  """Normal LM batches (no negative targets) count every token, as before."""
  from flax import nnx
  from recursive_lm.model.transformer import Transformer
  c = config_lib.base_config()
  c.model.d_model, c.model.num_heads, c.model.num_kv_heads, c.model.mlp_dim = 16, 2, 2, 32
  cfg = config_lib.load(c)
  model = Transformer(cfg.model, nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 9)), jnp.int32)
  s, n = make_eval_step(nnx.graphdef(model))(nnx.state(model), {"inputs": x[:, :-1], "targets": x[:, 1:]})
  logits = model(x[:, :-1])[0]
  ref = optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).sum()
  assert float(n) == 16.0
  np.testing.assert_allclose(float(s), float(ref), rtol=1e-6)


def test_synthetic_run_trains_and_evaluate_reports_accuracy(tmp_path):
  import importlib.util
  import os
  from recursive_lm import evaluate as ev
  from recursive_lm import train
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "algorithmic.py")
  spec = importlib.util.spec_from_file_location("algorithmic_cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cd = mod.get_config("size=tiny,task=parity,train_lengths=1-3,eval_lengths=4-5,plan=looped,depth=2")
  cd.train.steps, cd.train.eval_every, cd.train.checkpoint_every, cd.train.log_every = 3, 3, 3, 1
  cfg = config_lib.load(cd)
  train.run(cfg, str(tmp_path), devices=jax.devices()[:1])
  out = ev.run(str(tmp_path))
  assert set(out["accuracy_train_lengths"]) == {"1", "2", "3"} and set(out["accuracy_eval_lengths"]) == {"4", "5"}
  assert all(0.0 <= v <= 1.0 for v in out["accuracy_eval_lengths"].values())


def test_accuracy_by_length_of_a_recurrent_plan_takes_the_loop_count():
  """A recurrent plan with per-depth LoRA (which `with_loops` cannot rebuild)
  runs its core at the given count: the accuracy is that of the argmax of
  model(x, loops=r)."""
  from flax import nnx
  from recursive_lm import evaluate as ev
  from recursive_lm.model.transformer import Transformer
  c = config_lib.base_config()
  c.model.d_model, c.model.num_heads, c.model.num_kv_heads, c.model.mlp_dim = 16, 2, 2, 32
  c.model.plan.preset, c.model.plan.num_layers, c.model.plan.repeats = "recurrent", 4, 2
  c.model.plan.prelude, c.model.plan.coda, c.model.lora.rank = 1, 1, 2
  c.data.source, c.data.task, c.data.train_lengths, c.data.eval_lengths, c.data.seq_len = (
      "synthetic", "parity", "1-2", "3-4", 6)
  cfg = config_lib.load(c)
  model = Transformer(cfg.model, nnx.Rngs(0))
  for r in (1, 7):
    want = ev.accuracy_of_predictor(lambda x: np.asarray(jnp.argmax(model(jnp.asarray(x), loops=r)[0], -1)),
                                    cfg, (1, 3), 8)
    assert ev.accuracy_by_length(model, cfg, (1, 3), n_examples=8, loops=r) == want
