"""The serving engine (recursive_lm.inference.engine) against `generate`.

With more requests than slots, requests are admitted at different ticks into
slots whose rows held other requests before; each must still get exactly the
greedy tokens `generate` gives it (here in one right-padded batch with
per-row prompt lengths), on a tied plan with per-depth LoRA and sliding windows.
"""

import numpy as np
import pytest

from recursive_lm.inference import engine as engine_lib
from recursive_lm.inference import generate
from recursive_lm.inference.engine import Engine

from test_decode import V, build

WINDOWED = dict(preset="cycle", num_layers=4, repeats=2, lora_rank=2, **{
    "model.sliding_window": 4, "model.global_every": 2, "model.rope_base_local": 100.0})


def _prompts(lengths, seed=5):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, V, n).astype(np.int32) for n in lengths]


@pytest.mark.parametrize("sharing", ["none", "recursion"])
def test_continuous_greedy_equals_generate(sharing):
  model = build(**WINDOWED, **{"model.kv_sharing": sharing})
  lengths = [1, 5, 17, 3, 9, 2, 12]
  budgets = [6, 2, 9, 4, 1, 7, 3]  # different lengths: slots free at different ticks
  prompts = _prompts(lengths)
  eng = Engine(model, slots=3, buckets=(4, 8, 16, 32), chunk=1)  # one token per tick
  for i, (p, n) in enumerate(zip(prompts, budgets)):
    eng.submit(p, max_new_tokens=n, id=f"r{i}")
  order, ticks, got = [], 0, {}
  while not eng.done():
    done = eng.step()
    order += [c.id for c in done]
    got.update({c.id: c.tokens for c in done})
    ticks += 1
  # Requests finish out of submission order, and later ones were admitted only as slots freed.
  assert sorted(order) == [f"r{i}" for i in range(7)] and order != sorted(order)
  assert ticks < sum(budgets)
  eng2 = Engine(model, slots=3, buckets=(4, 8, 16, 32))
  outs = eng2.generate(prompts, max_new_tokens=max(budgets))
  padded = np.zeros((len(prompts), max(lengths)), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :p.size] = p
  ref = np.asarray(generate(model, padded, max(budgets), prompt_lengths=lengths))
  for i, (p, c) in enumerate(zip(prompts, outs)):
    want = ref[i, p.size:p.size + max(budgets)]
    np.testing.assert_array_equal(c.tokens, want, err_msg=f"request {i} (length {p.size})")
    assert c.finish_reason == "length" and c.new_tokens == max(budgets)
  # Runs with per-request budgets (one token per tick, and 3 per device call) give prefixes of the same tokens.
  eng3 = Engine(model, slots=3, buckets=(4, 8, 16, 32), chunk=3, unrolled=False)  # and through the scanned stage
  for i, (p, n) in enumerate(zip(prompts, budgets)):
    eng3.submit(p, max_new_tokens=n)
  for c in eng3.stream():
    np.testing.assert_array_equal(c.tokens, ref[c.id, lengths[c.id]:lengths[c.id] + budgets[c.id]])
  for i in range(len(prompts)):
    np.testing.assert_array_equal(got[f"r{i}"], ref[i, lengths[i]:lengths[i] + budgets[i]])


@pytest.mark.parametrize("seed", [0, 11, 29])
def test_sampled_generate_equals_the_engine(seed):
  """One sampling rule: at temperature 0.8 and top-k 20, generate(seed=s)
  draws row i's tokens exactly as an Engine of seed s draws its request i,
  for prompts of different lengths and with fewer slots than requests."""
  model = build(**WINDOWED)
  lengths = [3, 7, 1, 5]
  prompts = _prompts(lengths, seed=seed + 1)
  padded = np.zeros((len(prompts), max(lengths)), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :p.size] = p
  kw = dict(temperature=0.8, top_k=20)
  ref = np.asarray(generate(model, padded, 9, prompt_lengths=lengths, seed=seed, **kw))
  outs = Engine(model, slots=3, seed=seed).generate(prompts, max_new_tokens=9, **kw)
  for i, (p, c) in enumerate(zip(prompts, outs)):
    np.testing.assert_array_equal(c.tokens, ref[i, p.size:p.size + 9], err_msg=f"request {i}")
  greedy = np.asarray(generate(model, padded, 9, prompt_lengths=lengths))
  assert any((ref[i, p.size:p.size + 9] != greedy[i, p.size:p.size + 9]).any() for i, p in enumerate(prompts))


def test_compiles_once_per_bucket():
  # Per bucket, one prefill program per power-of-two count of rows admitted together: here 2, then 1.
  model = build(**WINDOWED)
  eng = Engine(model, slots=2, buckets=(4, 32))
  eng.generate(_prompts([1, 3, 4]), max_new_tokens=3)
  decode, prefill = engine_lib._decode._cache_size(), engine_lib._prefill._cache_size()
  eng.generate(_prompts([2, 4, 1], seed=9), max_new_tokens=5, temperature=1.0, top_k=3)
  assert engine_lib._decode._cache_size() == decode and engine_lib._prefill._cache_size() == prefill
  eng.generate(_prompts([20]), max_new_tokens=2)  # the second bucket: one more prefill program
  assert engine_lib._prefill._cache_size() == prefill + 1


def test_sampling_is_reproducible_and_independent_of_batching():
  model = build(**WINDOWED)
  prompts = _prompts([3, 6, 2, 8])
  kw = dict(max_new_tokens=8, temperature=2.0, top_k=5)
  a = Engine(model, slots=2, seed=3).generate(prompts, **kw)
  b = Engine(model, slots=2, seed=3).generate(prompts, **kw)
  assert [c.tokens for c in a] == [c.tokens for c in b]
  c = Engine(model, slots=3, seed=3).generate(prompts, **kw)  # other slots and neighbours, same seeds
  assert [x.tokens for x in a] == [x.tokens for x in c]
  d = Engine(model, slots=2, seed=4).generate(prompts, **kw)
  assert [x.tokens for x in a] != [x.tokens for x in d]
  # top_k=1 at any temperature is greedy.
  greedy = Engine(model, slots=2).generate(prompts, max_new_tokens=8)
  one = Engine(model, slots=2).generate(prompts, max_new_tokens=8, temperature=3.0, top_k=1)
  assert [x.tokens for x in greedy] == [x.tokens for x in one]


class _Letters:
  """One character per id (chr(0x100 + id)), so text positions are token positions."""

  add_bos, bos_id, vocab_size = False, None, V

  def __init__(self, eos=None):
    self.eos_id = eos

  def encode(self, text):
    return np.asarray([ord(c) - 0x100 for c in text], np.int32)

  def decode(self, ids):
    return "".join(chr(0x100 + int(i)) for i in np.asarray(ids).reshape(-1))


def test_eos_and_stop_strings_end_a_request():
  model = build(**WINDOWED)
  tok = _Letters()
  prompts = [tok.decode(p) for p in _prompts([2, 5, 3])]
  kw = dict(max_new_tokens=10, temperature=1.5, seed=1)
  free = Engine(model, tok, slots=2).generate(prompts, **kw)
  assert all(c.finish_reason == "length" and c.text == tok.decode(c.tokens) for c in free)
  # EOS: the token request 0 draws third; a request ends at its first EOS (kept in tokens, not in text).
  eos = free[0].tokens[2]
  outs = Engine(model, _Letters(eos), slots=2).generate(prompts, **kw)
  for f, o in zip(free, outs):
    if eos in f.tokens:
      j = f.tokens.index(eos)
      assert o.tokens == f.tokens[:j + 1] and o.finish_reason == "eos" and o.text == tok.decode(f.tokens[:j])
    else:
      assert o.tokens == f.tokens and o.finish_reason == "length"
  assert outs[0].finish_reason == "eos" and outs[0].new_tokens <= 3
  # Stop strings: request 1 ends as soon as its text contains one; the text is cut before it.
  stop = free[1].text[4:6]
  cut = free[1].text.find(stop)
  out = Engine(model, tok, slots=2).generate(prompts, stop=[stop, "\u0100" * 11], **kw)[1]
  assert out.finish_reason == "stop" and out.text == free[1].text[:cut]
  assert out.tokens == free[1].tokens[:cut + 2]


def test_bad_requests_are_rejected():
  model = build(**WINDOWED)
  eng = Engine(model, slots=2, max_top_k=4)
  for kw, needle in [(dict(prompt=[]), "empty"), (dict(prompt=[V]), "vocab_size"),
                     (dict(prompt=[1] * 30), "too long"),
                     (dict(prompt=[1], top_k=5), "max_top_k"), (dict(prompt=[1], temperature=-1), "temperature"),
                     (dict(prompt="text"), "tokenizer"), (dict(prompt=[1], stop=["x"]), "stop")]:
    with pytest.raises(ValueError, match=needle):
      eng.submit(**{"max_new_tokens": 3, **kw})
  assert eng.done()
  with pytest.raises(ValueError, match="slots"):
    Engine(model, slots=0)
  with pytest.raises(ValueError, match="max_len"):
    Engine(model, max_len=33)
  # max_new_tokens 0 completes at once without running the model.
  assert eng.generate([[1, 2]], max_new_tokens=0)[0].tokens == []
