"""Parameter / FLOP accounting pinned to hand-computed numbers, and the describe CLI."""

import json
import os
import subprocess
import sys

import pytest
from flax import nnx

from conftest import tiny_config
from recursive_lm import config as config_lib
from recursive_lm.analysis import accounting
from recursive_lm.model.transformer import Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tiny_config dims: V=61, D=42, H=3 query heads, 1 kv head, Hd=14, F=46 (SwiGLU), T=7.
V, D, HD, F, T = 61, 42, 14, 46, 7
Q = 3 * HD  # 42: query / output projection width
KV = 1 * HD  # 14: key / value width
BLOCK_MATMUL = (D * Q) + (D * KV) + (D * KV) + (Q * D) + 3 * (D * F)  # q k v o + gate up down
NORMS = 2 * D  # attn_norm + mlp_norm scales (RMSNorm: no bias)
EMBED = V * D
ATTN_PER_LAYER = 6 * T * Q  # causal QK^T + AV, forward + backward

assert BLOCK_MATMUL == 1764 + 588 + 588 + 1764 + 3 * 1932 == 10_500


def test_vanilla_two_layers():
  cfg = config_lib.load(tiny_config(preset="vanilla", num_layers=2))
  d = accounting.describe(cfg)
  unique = EMBED + D + 2 * (BLOCK_MATMUL + NORMS)  # embedding, final norm, 2 blocks
  assert unique == 2562 + 42 + 2 * 10_584 == 23_772
  flops = 6 * (2 * BLOCK_MATMUL + D * V) + 2 * ATTN_PER_LAYER  # tied head still multiplies: D x V
  assert flops == 6 * 23_562 + 2 * 1764 == 144_900
  assert d["unique_params"] == d["total_params"] == d["untied_params"] == unique
  assert d["lora_params"] == 0 and d["embedding_params"] == EMBED
  assert d["flops_per_token"] == flops and d["seq_len"] == T
  assert d["effective_depth"] == 2 and d["unique_blocks"] == 2


def test_cycle_four_layers_two_repeats_lora_rank_two():
  cfg = config_lib.load(tiny_config(preset="cycle", num_layers=4, repeats=2, lora_rank=2))
  d = accounting.describe(cfg)
  r = 2
  # One LoRA per projection per depth: rank * (d_in + d_out) each.
  lora_slot = r * ((D + Q) + (D + KV) + (D + KV) + (Q + D) + 3 * (D + F))
  assert lora_slot == 168 + 112 + 112 + 168 + 3 * 176 == 1088
  assert d["lora_params"] == 4 * lora_slot == 4352  # 4 effective layers, each its own slot
  assert d["unique_params"] == EMBED + D + 2 * (BLOCK_MATMUL + NORMS) == 23_772  # 2 stored blocks
  assert d["untied_params"] == EMBED + D + 4 * (BLOCK_MATMUL + NORMS) == 44_940  # 4 blocks, no LoRA
  assert d["total_params"] == 23_772 + 4352
  # Each stored block runs twice; every LoRA slot once.
  used = 2 * 2 * BLOCK_MATMUL + 4 * lora_slot + D * V
  assert used == 42_000 + 4352 + 2562
  assert d["flops_per_token"] == 6 * used + 4 * ATTN_PER_LAYER == 300_540
  assert (d["effective_depth"], d["unique_blocks"]) == (4, 2)
  assert [(p["block"], p["repeat"]) for p in d["plan"]] == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_sandwich_per_depth_norms_untied_head():
  cfg = config_lib.load(tiny_config(preset="sandwich", num_layers=4, per_depth_norms=True,
                                    **{"model.tie_embeddings": False}))
  d = accounting.describe(cfg)
  head = D * V
  # first + last own their norms; the shared middle block's norms live in its 2 depth slots.
  unique = EMBED + D + head + 2 * (BLOCK_MATMUL + NORMS) + BLOCK_MATMUL + 2 * NORMS
  assert unique == 2562 + 42 + 2562 + 21_168 + 10_500 + 168 == 37_002
  assert d["unique_params"] == d["total_params"] == unique
  assert d["untied_params"] == EMBED + D + head + 4 * (BLOCK_MATMUL + NORMS) == 47_502
  assert d["flops_per_token"] == 6 * (4 * BLOCK_MATMUL + head) + 4 * ATTN_PER_LAYER == 274_428
  assert [p["stage"] for p in d["plan"]] == ["first", "middle", "middle", "last"]


def test_count_params_concrete_equals_abstract():
  cfg = config_lib.load(tiny_config(preset="cycle", num_layers=4, repeats=2, lora_rank=2))
  concrete = accounting.count_params(Transformer(cfg.model, nnx.Rngs(0)))
  assert concrete == accounting.count_params(accounting.abstract_model(cfg))
  assert concrete["total_params"] == concrete["unique_params"] + concrete["lora_params"]


def _describe(*args):
  return subprocess.run([sys.executable, "-m", "recursive_lm.describe", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120)


def test_describe_cli_prints_json():
  out = _describe("--config", "configs/relaxed.py:size=tiny", "--config.model.lora.rank=3")
  assert out.returncode == 0, out.stderr
  d = json.loads(out.stdout)
  for key in ("unique_params", "untied_params", "lora_params", "total_params", "effective_depth", "unique_blocks",
              "flops_per_token", "seq_len", "plan"):
    assert key in d, key
  assert d["lora_params"] > 0 and d["total_params"] == d["unique_params"] + d["lora_params"]
  assert set(d["plan"][0]) == {"depth", "stage", "block", "repeat", "kv_slot"}
  assert d["kv_slots"] == d["effective_depth"] and d["kv_cache_bytes_per_token"] > 0


def test_describe_cli_reports_kv_sharing():
  out = _describe("--config", "configs/relaxed.py:size=tiny", "--config.model.kv_sharing=recursion")
  assert out.returncode == 0, out.stderr
  d = json.loads(out.stdout)
  assert d["kv_sharing"] == "recursion" and d["kv_slots"] == 1  # tiny: one block run twice
  assert [p["kv_slot"] for p in d["plan"]] == [0, 0]


@pytest.mark.parametrize("args,needle", [
    (("--config", "configs/recursive.py:size=tiny,repeats=3"), "model.plan"),  # 2 layers, 3 repeats
    (("--config", "configs/recursive.py:nope=1"), "'nope' is unknown"),
    (("--config", "configs/relaxed.py:size=tiny", "--config.model.kv_sharing=cla:3"), "model.kv_sharing='cla:3'"),
])
def test_describe_cli_config_error_is_one_line_exit_2(args, needle):
  out = _describe(*args)
  assert out.returncode == 2, (out.stdout, out.stderr)
  lines = [l for l in out.stderr.splitlines() if l.strip() and not l.startswith(("I", "W"))]  # absl log lines
  assert len(lines) == 1 and needle in lines[0], out.stderr
