"""Mixtures of sources (data.mixture): weights, per-source eval batches, per-source eval losses in metrics."""

import dataclasses
import os

import numpy as np
import pytest

from recursive_lm.config import ConfigError
from recursive_lm.data import pipeline, sources
from test_documents import data_cfg


def letters_corpus(root, letters: str, n=30):
  """JSONL documents written only with `letters`, so a window shows which source it came from."""
  rng = np.random.default_rng(len(letters))
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "docs.jsonl"), "w") as f:
    for _ in range(n):
      text = "".join(rng.choice(list(letters), 80))
      f.write('{"text": "%s"}\n' % text)
  return os.path.join(root, "*.jsonl")


def mixture_cfg(tmp_path, weights=(0.75, 0.25), **kw):
  a, b = letters_corpus(tmp_path / "a", "ab"), letters_corpus(tmp_path / "b", "xy")
  return data_cfg(mixture=f"jsonl:{a}={weights[0]};jsonl:{b}={weights[1]}", **kw)


def test_mixture_hits_its_weights(tmp_path):
  cfg = mixture_cfg(tmp_path, batch_size=8)
  it = pipeline.train_iterator(cfg, seed=0)
  rows = np.concatenate([next(it)["inputs"] for _ in range(50)])
  from_a = np.isin(rows, [ord("a"), ord("b")]).any(axis=1)
  from_b = np.isin(rows, [ord("x"), ord("y")]).any(axis=1)
  assert not (from_a & from_b).any()
  share = from_a.mean()
  assert abs(share - 0.75) < 3 * np.sqrt(0.75 * 0.25 / len(rows))  # within sampling error (grain: exact)


def test_eval_sets_are_per_source_and_sharded(tmp_path):
  cfg = mixture_cfg(tmp_path)
  sets = pipeline.eval_sets(cfg, 2)
  assert list(sets) == ["mix0", "mix1"]
  assert np.isin(sets["mix0"][0]["inputs"], [ord("a"), ord("b"), ord("\n")]).all()
  assert np.isin(sets["mix1"][0]["inputs"], [ord("x"), ord("y"), ord("\n")]).all()
  assert len(pipeline.eval_batches(cfg, 2)) == 4
  halves = [pipeline.eval_sets(cfg, 2, p, 2)["mix1"][0]["inputs"] for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate(halves), sets["mix1"][0]["inputs"])
  assert list(pipeline.eval_sets(data_cfg(source="stdlib", max_bytes=50_000), 1)) == [""]


@pytest.mark.parametrize("mixture, message", [
    ("jsonl:/x=abc", "weight 'abc' is not a positive number"),
    ("jsonl:/x=-1", "weight '-1' is not a positive number"),
    ("nope:/x=1", "source 'nope'"),
    ("jsonl=1", "is not SOURCE:LOCATION=WEIGHT"),
    ("tokens:=1", "needs a location"),
])
def test_bad_mixture_names_the_entry(mixture, message):
  with pytest.raises(ConfigError, match=r"data\.mixture entry 0 .*" + message.replace("(", r"\(")):
    sources.mixture_components(data_cfg(mixture=mixture))


def test_training_reports_eval_loss_per_source(tmp_path):
  import tiny_run
  from recursive_lm import config as config_lib, metrics, train
  a, b = letters_corpus(tmp_path / "a", "ab"), letters_corpus(tmp_path / "b", "xy")
  cd = tiny_run.config("steps=2,eval_every=2,checkpoint_every=2,batch=8")
  cd.data.mixture = f"jsonl:{a}=0.5;jsonl:{b}=0.5"
  cd.data.val_fraction = 0.2
  train.run(config_lib.load(cd), str(tmp_path / "run"))
  ev = [r for r in metrics.read(str(tmp_path / "run")) if "eval_loss" in r][-1]
  assert {"eval_loss/mix0", "eval_loss/mix1"} <= set(ev)
  assert min(ev["eval_loss/mix0"], ev["eval_loss/mix1"]) <= ev["eval_loss"] <= max(ev["eval_loss/mix0"],
                                                                                    ev["eval_loss/mix1"])
