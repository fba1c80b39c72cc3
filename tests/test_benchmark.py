"""The benchmark command line: the moe mode's record, and one-line errors for bad flags."""

import json
import os
import subprocess
import sys

import pytest


def _run(*args):
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}  # one device
  return subprocess.run([sys.executable, "-m", "recursive_lm.benchmark", *args], capture_output=True, text=True,
                        env=env, timeout=300)


@pytest.mark.slow
def test_moe_mode_writes_one_record_per_batch(tmp_path):
  out = tmp_path / "moe.json"
  proc = _run("moe", "--moe_size", "tiny", "--moe_batches", "1,2", "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-2000:]
  rec = json.loads(out.read_text())
  assert rec["mode"] == "moe" and rec["dispatch"] == "loop" and rec["backend"] == "cpu"
  assert [r["tokens"] for r in rec["results"]] == [1024, 2048]
  for r in rec["results"]:
    assert r["moe_fwd_bwd_tok_s"] > 0 and r["dense_fwd_bwd_tok_s"] > 0
    assert abs(r["ratio_fwd_bwd"] - r["moe_fwd_bwd_tok_s"] / r["dense_fwd_bwd_tok_s"]) < 1e-9


def test_moe_mode_in_bfloat16_with_an_explicit_dispatch(tmp_path):
  out = tmp_path / "moe.json"
  proc = _run("moe", "--moe_size", "tiny", "--moe_batches", "1", "--moe_dtype", "bfloat16", "--moe_dispatch", "blocks",
              "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-2000:]
  rec = json.loads(out.read_text())
  assert (rec["dtype"], rec["dispatch"]) == ("bfloat16", "blocks") and rec["results"][0]["moe_fwd_bwd_tok_s"] > 0


def test_bad_moe_flags_exit_2_with_one_line():
  for args, word in [(("--moe_batches", "1,x"), "--moe_batches"), (("--moe_size", "7b"), "size"),
                     (("--moe_dispatch", "fast", "--moe_batches", "1"), "dispatch"),
                     (("--moe_dispatch", "ragged_mgpu", "--moe_batches", "1"), "does not run on the cpu backend"),
                     (("--moe_dtype", "float16", "--moe_batches", "1"), "--moe_dtype")]:
    proc = _run("moe", *args)
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and word in errors[0], proc.stderr[-2000:]


def test_generate_mode_compares_static_and_continuous(tmp_path):
  out = tmp_path / "gen.json"
  proc = _run("generate", "--config", "configs/recursive.py:size=tiny", "--gen_requests", "6", "--gen_slots", "2",
              "--gen_max_prompt", "12", "--gen_max_new", "8", "--gen_exit", "confidence:1.0", "--gen_prompts", "text",
              "--gen_repeats", "2", "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-2000:]
  rec = json.loads(out.read_text())
  assert rec["mode"] == "generate" and rec["requests"] == 6 and rec["slots"] == 2 and rec["prompts"] == "text"
  assert rec["repeats"] == 2
  assert rec["static_tokens_per_s"] > 0 and rec["continuous_tokens_per_s"] > 0
  assert abs(rec["continuous_vs_static"] - rec["continuous_tokens_per_s"] / rec["static_tokens_per_s"]) < 0.01
  assert rec["greedy_agreement"] == 1.0  # same greedy tokens both ways
  # A rule that never fires: every token runs all loops and matches full depth.
  assert rec["loops"] == 2 and rec["mean_exit_loop"] == 2.0 and rec["greedy_agreement_with_full_depth"] == 1.0
  assert rec["exit_static_tokens_per_s"] > 0 and rec["exit_depthwise_tokens_per_s"] > 0
  assert rec["depthwise_vs_static"] > 0 and rec["depthwise_agreement_with_exit_static"] == 1.0
  # A rule that never fires: the loss with exits is the full-depth loss.
  assert rec["eval_loss_with_exits"] == pytest.approx(rec["eval_loss"], abs=1e-3) and rec["eval_mean_exit_loop"] == 2
  proc = _run("generate", "--config", "configs/recursive.py:size=tiny", "--gen_slots", "0")
  assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "--gen_slots" in proc.stderr
  proc = _run("generate")
  assert proc.returncode == 2 and "--workdir" in proc.stderr
  proc = _run("generate", "--config", "configs/recursive.py:size=tiny", "--gen_repeats", "0")
  assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "--gen_repeats=0" in proc.stderr
  proc = _run("generate", "--config", "configs/recursive.py:size=tiny", "--gen_exit", "kl:0")
  assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "--gen_exit='kl:0'" in proc.stderr


@pytest.mark.slow
def test_generate_mode_on_a_routed_model_compares_depthwise_with_all_recursions(tmp_path):
  out = tmp_path / "gen.json"
  proc = _run("generate", "--config", "configs/mor.py:size=tiny", "--gen_requests", "4", "--gen_slots", "2",
              "--gen_max_prompt", "8", "--gen_max_new", "6", "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-2000:]
  rec = json.loads(out.read_text())
  assert rec["router_all_recursions_tokens_per_s"] == rec["continuous_tokens_per_s"] > 0
  assert rec["router_depthwise_tokens_per_s"] > 0 and rec["router_depthwise_agreement"] == 1.0
  assert 0 <= rec["mean_recursions"] <= 3 and rec["greedy_agreement"] == 1.0
  proc = _run("generate", "--config", "configs/mor.py:size=tiny", "--gen_exit", "confidence:0.9")
  assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "routers" in proc.stderr


@pytest.mark.slow
def test_train_mode_times_a_recurrent_plan_at_each_loop_count(tmp_path):
  """One compiled step, timed at loops 1 then 6 (k = 2): per-count step times
  and peak memory, and their ratios; --loops on another plan exits 2."""
  out = tmp_path / "train.json"
  cfg = "configs/recurrent.py:size=tiny,backprop_depth=2"
  proc = _run("train", "--config", cfg, "--loops", "1,6", "--steps", "1", "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-2000:]
  rec = json.loads(out.read_text())
  assert [r["loops"] for r in rec["loops"]] == [1, 6] and rec["backprop_depth"] == 2
  assert rec["step_ratio_6_vs_1"] == round(rec["loops"][1]["step_s_median"] / rec["loops"][0]["step_s_median"], 3)
  assert rec["peak_rss_ratio_6_vs_1"] >= 1.0 and rec["memory_bytes"]["temporaries"] > 0
  bad = _run("train", "--config", "configs/recursive.py:size=tiny", "--loops", "2", "--steps", "1")
  assert bad.returncode == 2 and [l for l in bad.stderr.splitlines() if l.startswith("error:")] == [
      "error: --loops=2 must be loop counts >= 1 of a recurrent plan (model.plan.preset='cycle')"]
