"""Retrofitting recurrence (convert --plan recurrent) and the loop-count curriculum.

A tiny Llama-like safetensors model (tests/test_convert.py's) is converted to
prelude / core / coda: at one loop it reproduces the numpy forward of the
source (all layers, or the layers kept after --drop) for every injection
kind; with the concat initialisation, r loops equal the source with the core
layers repeated r times. The CLI writes a run that evaluate --loops 1,3,
sample and train read; bad splits and drops are one error line, exit 2,
nothing written. The curriculum's mean loop count matches a hand computation.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm import config as config_lib
from recursive_lm import plan as plan_lib
from recursive_lm.config import ConfigError
from recursive_lm.convert import build, readers, retrofit, workdir as wd
from recursive_lm.model.recurrent import curriculum_mean, draw

pytest.importorskip("safetensors")
from test_convert import GEMMA3, LLAMA, REPO, hf_weights, reference_logits, tokens, write_hf  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": REPO}
# One CPU device for train (the run's mesh is 1 device; the suite simulates 8).
ONE_DEVICE = {**ENV, "XLA_FLAGS": " ".join(f for f in ENV.get("XLA_FLAGS", "").split()
                                           if not f.startswith("--xla_force_host_platform_device_count"))}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  return write_hf(tmp_path_factory.mktemp("llama"), LLAMA, hf_weights(LLAMA, 1))


def retrofitted(src, split, drops=(), repeats=1, **overrides):
  cfg = config_lib.load(wd.make_config(src, "recurrent", repeats, overrides=overrides, split=split))
  lmap = retrofit.checked_map(src, list(drops), cfg.model)
  model, _ = build.converted_model(src, cfg.model, layer_map=lmap)
  return model, lmap


def source_logits(src, layers, toks):
  """The source's numpy forward through `layers` (source indices, in order)."""
  return reference_logits(dataclasses.replace(src, layers=[src.layers[i] for i in layers]), toks)


@pytest.mark.parametrize("injection", ["concat", "add", "parcae"])
def test_one_loop_reproduces_the_source_and_the_kept_layers(injection, llama):
  src = readers.read(f"hf:{llama}")
  toks = tokens()
  model, lmap = retrofitted(src, (1, 2, 1), **{"model.recurrent.injection": injection})
  assert lmap == [0, 1, 2, 3]
  assert model.cfg.recurrent.init_state == retrofit.INIT_STATE[injection]
  ref = source_logits(src, range(4), toks)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(toks), loops=1)[0]), ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(toks))[0]), ref, rtol=1e-4, atol=1e-4)  # the plan's R=1
  dropped, lmap = retrofitted(src, (1, 1, 1), ["1"], **{"model.recurrent.injection": injection})
  assert lmap == [0, 2, 3]
  np.testing.assert_allclose(np.asarray(dropped(jnp.asarray(toks), loops=1)[0]), source_logits(src, [0, 2, 3], toks),
                             rtol=1e-4, atol=1e-4)


def test_concat_init_loops_the_core_layers(llama):
  src = readers.read(f"hf:{llama}")
  toks = tokens(seed=2)
  model, lmap = retrofitted(src, (1, 2, 1), repeats=3)
  assert lmap == [0, 1, 2, 1, 2, 1, 2, 3]
  ref = source_logits(src, lmap, toks)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(toks))[0]), ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(toks), loops=3)[0]), ref, rtol=1e-4, atol=1e-4)
  two = source_logits(src, [0, 1, 2, 1, 2, 3], toks)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(toks), loops=2)[0]), two, rtol=1e-4, atol=1e-4)


def test_layer_map_and_kind_check_on_a_sliding_window_source(tmp_path):
  src = readers.read(f"hf:{write_hf(tmp_path, GEMMA3, hf_weights(GEMMA3, 2))}")  # local, local, global x 2
  toks = tokens(seed=4)
  model, lmap = retrofitted(src, (2, 2, 2))
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(toks), loops=1)[0]), source_logits(src, range(6), toks),
                             rtol=1e-4, atol=1e-4)
  # Dropping a whole local-local-global period keeps every kind: 0 1 2 | (3 4 5 dropped) ... here 1 / 1 / 1.
  model, lmap = retrofitted(src, (1, 1, 1), ["3-5"])
  assert lmap == [0, 1, 2]
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(toks), loops=1)[0]), source_logits(src, [0, 1, 2], toks),
                             rtol=1e-4, atol=1e-4)
  # Dropping layer 0 moves global layer 2 to effective depth 1 (local there).
  with pytest.raises(ConfigError, match="effective layer 1 .* local .* source layer 2, which is global"):
    retrofitted(src, (1, 2, 2), ["0"])


def test_drop_parsing_and_split_checks():
  assert retrofit.parse_drops(["8-13", "2"], 18) == [(2, 2), (8, 13)]
  assert retrofit.kept_layers(6, [(1, 2), (4, 4)]) == [0, 3, 5]
  for drops, msg in [(["3-1"], "reversed"), (["16-18"], "out of range, the source has layers 0..17"),
                     (["-1"], "expected a-b"), (["2-5", "5-6"], "'2-5' and --drop '5-6' overlap")]:
    with pytest.raises(ConfigError, match=msg):
      retrofit.parse_drops(drops, 18)
  with pytest.raises(ConfigError, match=r"= 11 layers, but 12 source layers are kept \(18 minus 6 dropped\)"):
    retrofit.check_split(4, 4, 3, 12, 18, 6)
  with pytest.raises(ConfigError, match="--core 0"):
    retrofit.check_split(4, 0, 8, 12, 18, 6)


def convert_cli(src_dir, work, *extra):
  return subprocess.run([sys.executable, "-m", "recursive_lm.convert", "--source", f"hf:{src_dir}", "--workdir",
                         str(work), "--plan", "recurrent", *extra], capture_output=True, text=True, env=ENV,
                        timeout=600)


@pytest.mark.parametrize("extra,message", [
    (["--prelude", "1", "--core", "1", "--coda", "1"], "--prelude 1 + --core 1 + --coda 1 = 3 layers, but 4 source"),
    (["--prelude", "1", "--core", "1", "--coda", "1", "--drop", "1-2", "--drop", "2-3"], "'1-2' and --drop '2-3'"),
    (["--prelude", "1", "--core", "1", "--coda", "1", "--drop", "3-4"], "'3-4': out of range"),
    (["--prelude", "2", "--core", "0", "--coda", "2"], "--prelude 2 --core 0 --coda 2: each must be >= 1"),
    (["--prelude", "-1", "--core", "4", "--coda", "1"], "--prelude -1 --core 4 --coda 1"),
])
def test_cli_refuses_a_bad_split_or_drop_writing_nothing(extra, message, llama, tmp_path):
  run = convert_cli(llama, tmp_path / "w", *extra)
  assert run.returncode == 2, run.stderr
  lines = [line for line in run.stderr.strip().splitlines() if line.startswith("error")]
  assert len(lines) == 1 and lines[0] == run.stderr.strip().splitlines()[-1], run.stderr
  assert message in lines[0], lines[0]
  assert not os.path.exists(tmp_path / "w")


def test_cli_retrofit_evaluates_samples_and_trains_at_any_loop_count(llama, tmp_path):
  from recursive_lm import checkpoint, evaluate
  work = tmp_path / "retro"
  sets = ["--set", "data.seq_len=16", "--set", "data.batch_size=2", "--set", "data.max_bytes=20000",
          "--set", "train.steps=3", "--set", "train.eval_every=3", "--set", "train.eval_batches=1",
          "--set", "train.checkpoint_every=3", "--set", "train.log_every=1", "--set", "mesh.data=1"]
  run = convert_cli(llama, work, "--prelude", "1", "--core", "2", "--coda", "1", *sets)
  assert run.returncode == 0, run.stderr
  record = json.loads(run.stdout)
  assert record["effective_from_source_layers"] == [0, 1, 2, 3] and record["plan"] == "recurrent"
  assert record["blocks_from_source_layers"] == [[[0]], [[1], [2]], [[3]]]
  cfg = checkpoint.load_config(str(work))
  rc = cfg.model.recurrent
  assert (rc.injection, rc.init_state, rc.curriculum, rc.curriculum_steps) == ("concat", "prelude", "1-sqrt", 3)
  # One loop is the source: its eval loss equals the vanilla conversion's on the same batches.
  vanilla = tmp_path / "vanilla"
  src = readers.read(f"hf:{llama}")
  overrides = {s.split("=")[0]: s.split("=")[1] for s in sets[1::2]}
  wd.write_run(src, wd.make_config(src, overrides=overrides), str(vanilla), log=lambda s: None)
  ev = subprocess.run([sys.executable, "-m", "recursive_lm.evaluate", "--workdir", str(work), "--loops", "1,3"],
                      capture_output=True, text=True, env=ENV, timeout=600)
  assert ev.returncode == 0, ev.stderr
  records = [json.loads(line) for line in ev.stdout.strip().splitlines()]
  assert [r["loops"] for r in records] == [1, 3]
  assert records[0]["eval_loss"] == pytest.approx(evaluate.run(str(vanilla))["eval_loss"], abs=1e-4)
  assert np.isfinite(records[1]["eval_loss"]) and records[1]["eval_loss"] != records[0]["eval_loss"]
  sample = subprocess.run([sys.executable, "-m", "recursive_lm.sample", "--workdir", str(work), "--prompt", "def ",
                           "--max_new_tokens", "5", "--ignore_eos"], capture_output=True, text=True, env=ENV,
                          timeout=600)
  assert sample.returncode == 0 and sample.stdout.startswith("def "), sample.stderr
  # configs/retrofit.py continues it; the loops drawn follow the curriculum from (seed, step).
  train = subprocess.run([sys.executable, "-m", "recursive_lm.train", "--config",
                          f"{REPO}/configs/retrofit.py:workdir={work}", "--workdir", str(work)],
                         capture_output=True, text=True, env=ONE_DEVICE, timeout=600)
  assert train.returncode == 0, train.stderr
  with open(work / "metrics.jsonl") as f:
    logged = [r["loops"] for r in map(json.loads, f) if "loops" in r]
  assert logged == [float(draw(rc, 1, cfg.seed, s)["loops"]) for s in range(1, 4)]


def test_curriculum_mean_matches_a_hand_computation():
  rc = config_lib.load(config_lib.base_config()).model.recurrent
  lin = dataclasses.replace(rc, curriculum="linear", curriculum_steps=100, mean=5.0, min_loops=1)
  sq = dataclasses.replace(lin, curriculum="1-sqrt")
  assert [curriculum_mean(lin, 2, s) for s in (0, 25, 50, 100, 400)] == [1.0, 2.0, 3.0, 5.0, 5.0]
  # 1 + 4 (1 - sqrt(1 - x)): x = 0.19 -> 1.4, x = 0.75 -> 3.0, x = 0.96 -> 4.2.
  assert [curriculum_mean(sq, 2, s) for s in (0, 19, 75, 96, 100)] == pytest.approx([1.0, 1.4, 3.0, 4.2, 5.0])
  assert curriculum_mean(dataclasses.replace(sq, mean=0.0), 3, 75) == pytest.approx(1 + 2 * 0.5)  # mean 0: repeats
  assert curriculum_mean(rc, 3, 10) == 3.0  # none: the plan's repeats
  # fixed: the mean rounded half up; poisson_lognormal: Huginn's draw around it, a function of (seed, step).
  fixed = dataclasses.replace(lin, sample="fixed")
  assert [int(draw(fixed, 2, 0, s)["loops"]) for s in (0, 12, 13, 37, 38, 100)] == [1, 1, 2, 2, 3, 5]
  pois = dataclasses.replace(sq, sample="poisson_lognormal", sigma=0.5, max_loops=64)
  for step in (3, 60, 90):
    rng = np.random.default_rng([7, step, 0x6C6F6F70])
    rng.integers(0, 2**32, 2, dtype=np.uint32)
    m = 1 + 4 * (1 - math.sqrt(1 - step / 100))
    want = min(max(rng.poisson(math.exp(rng.normal(math.log(m) - 0.125, 0.5))) + 1, 1), 64)
    assert int(draw(pois, 2, 7, step)["loops"]) == want
  late = [int(draw(pois, 2, 7, s)["loops"]) for s in range(100, 1100)]
  early = [int(draw(pois, 2, 7, s)["loops"]) for s in range(0, 10)]
  assert np.mean(late) > 4.5 and max(early) < np.mean(late)


@pytest.mark.parametrize("field,value,message", [
    ("curriculum", "cosine", "model.recurrent.curriculum"),
    ("curriculum_steps", 0, "model.recurrent.curriculum_steps=0"),
    ("sample", "uniform", "needs model.recurrent.sample='fixed' or 'poisson_lognormal'"),
])
def test_bad_curriculum_is_a_config_error(field, value, message):
  c = config_lib.base_config()
  c.model.recurrent.curriculum, c.model.recurrent.curriculum_steps = "linear", 10
  c.model.recurrent[field] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.load(c)
