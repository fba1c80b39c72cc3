"""recursive_lm.analysis on a real (tiny) run: loading, per-depth probes, LoRA
spectra, MoE usage and the plots.

The run is `configs/default.py:size=tiny` (1 unique block x 2 loops, LoRA
rank 2 on every projection, 20 steps) trained in-process on one device,
once per session: `tiny_run_dir` is shared with tests/test_notebook.py, as is
`tiny_mor_run_dir` (`configs/mor.py:size=tiny`: expert routers over 3
recursions, 20 steps) for the router statistics.
"""

import atexit
import importlib.util
import os
import shutil
import tempfile
import types

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported anywhere (plots imports it)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from recursive_lm import analysis  # noqa: E402
from recursive_lm import config as config_lib  # noqa: E402
from recursive_lm.analysis import plots, probes  # noqa: E402
from recursive_lm.evaluate import evaluate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Set once trained: both test modules see them, whatever module object holds this.
_RUN_ENV, _MOR_RUN_ENV = "RLM_TEST_ANALYSIS_RUN", "RLM_TEST_ANALYSIS_MOR_RUN"


def tiny_cd(name: str = "default"):
  """configs/<name>.py:size=tiny as a ConfigDict, on a one-device data mesh."""
  spec = importlib.util.spec_from_file_location(f"rlm_{name}_config", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cd = module.get_config("size=tiny")
  cd.mesh.data = 1
  return cd


def default_tiny_cd():
  return tiny_cd("default")


def _trained_once(env: str, name: str) -> str:
  """Train configs/<name>.py:size=tiny once per session into a temporary directory; its path."""
  path = os.environ.get(env)
  if path and os.path.isdir(os.path.join(path, "checkpoints")):
    return path
  from recursive_lm import train

  path = tempfile.mkdtemp(prefix=f"rlm_analysis_{name}_run_")
  atexit.register(shutil.rmtree, path, True)
  train.run(config_lib.load(tiny_cd(name)), path, devices=jax.devices()[:1])
  os.environ[env] = path
  return path


def tiny_run_dir() -> str:
  """The default tiny run (1 block x 2 loops, LoRA), trained once per session."""
  return _trained_once(_RUN_ENV, "default")


def tiny_mor_run_dir() -> str:
  """The tiny Mixture-of-Recursions run (expert routers over 3 recursions), trained once per session."""
  return _trained_once(_MOR_RUN_ENV, "mor")


@pytest.fixture(scope="module")
def run():
  return analysis.load_run(tiny_run_dir())


@pytest.fixture(scope="module")
def hidden(run):
  return analysis.hidden_states(run)


def test_load_run(run):
  cfg = run.cfg
  assert run.step == cfg.train.steps == 20
  assert run.depth == 2 and run.layer_labels() == ["b0 r0", "b0 r1"]
  assert [r["step"] for r in run.train] == list(range(cfg.train.log_every, 21, cfg.train.log_every))
  assert [r["step"] for r in run.eval] == [10, 20]
  assert all("loss" in r for r in run.train) and all("eval_loss" in r for r in run.eval)
  assert len(run.metrics) == len(run.train) + len(run.eval)
  a = run.accounting
  assert a["effective_depth"] == 2 and a["unique_blocks"] == 1 and a["lora_params"] > 0
  assert a["total_params"] == a["unique_params"] + a["lora_params"]
  batches = run.eval_batches()
  assert len(batches) == cfg.train.eval_batches
  assert batches[0]["inputs"].shape == (cfg.data.batch_size, cfg.data.seq_len)
  assert run.eval_batches() is batches  # cached
  assert run.is_byte_level and "bits/byte" in run.summary()


def test_load_run_errors(tmp_path, monkeypatch):
  with pytest.raises(config_lib.ConfigError, match="config.json"):
    analysis.load_run(str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match="no such directory"):
    analysis.load_run(str(tmp_path / "no_such_run"))
  monkeypatch.chdir(tmp_path)  # relative paths are also looked up from the parents of the current directory
  with pytest.raises(config_lib.ConfigError, match="'runs/no_such_run' not found"):
    analysis.load_run("runs/no_such_run")


def test_relative_run_paths_resolve_from_parent_directories(run, monkeypatch):
  name = os.path.basename(run.workdir)
  # From a folder two levels below the run's parent, as a notebook in a sub-folder of the repository is.
  monkeypatch.chdir(os.path.join(run.workdir, "checkpoints"))
  assert analysis.resolve_workdir(name) == run.workdir


def test_depth_losses_end_at_the_eval_loss(run):
  losses = analysis.depth_losses(run)
  assert losses.shape == (run.depth,)
  own, _ = evaluate(run.model, run.eval_batches())  # the model's scanned forward on the same batches
  np.testing.assert_allclose(losses[-1], own, rtol=1e-5)
  np.testing.assert_allclose(losses[-1], run.eval[-1]["eval_loss"], rtol=1e-5)  # recorded by training
  with_emb = analysis.depth_losses(run, include_embedding=True)
  assert with_emb.shape == (run.depth + 1,)
  np.testing.assert_allclose(with_emb[1:], losses, rtol=1e-6)
  assert np.all(np.isfinite(with_emb)) and with_emb[0] > losses[-1]  # layers help, even after 20 steps


def test_hidden_states_reproduce_the_forward(run, hidden):
  tokens = jnp.asarray(run.eval_batches(1)[0]["inputs"])
  b, t = tokens.shape
  assert hidden.shape == (run.depth + 1, b, t, run.cfg.model.d_model)
  logits, _, aux = run.model(tokens)
  np.testing.assert_allclose(np.asarray(probes.readout(run.model, jnp.asarray(hidden[-1]))), np.asarray(logits),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hidden[0], np.asarray(run.model.embed(tokens, jnp.float32)), rtol=1e-6)
  # Every intermediate depth, not just the last: the blocks report the RMS of their output.
  rms = np.sqrt(np.mean(np.square(hidden[1:].astype(np.float64)), axis=(1, 2, 3)))
  np.testing.assert_allclose(rms, np.asarray(aux["resid_rms"]), rtol=1e-5)


def test_similarity(hidden):
  sim = analysis.similarity(hidden)
  n = hidden.shape[0]
  for name, m in sim.items():
    assert m.shape == (n, n), name
    np.testing.assert_allclose(m, m.T, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(np.diag(m), 1.0, rtol=1e-9, err_msg=name)
    assert np.all(m <= 1 + 1e-9), name
  x = hidden[-1]
  np.testing.assert_allclose(analysis.linear_cka(np.stack([x, x])), 1.0, rtol=1e-9)
  # CKA ignores rotations and isotropic scaling of the features; cosine does not ignore rotations.
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(x.shape[-1],) * 2))
  np.testing.assert_allclose(analysis.linear_cka(np.stack([x, 3.0 * x @ q]))[0, 1], 1.0, rtol=1e-9)
  assert analysis.cosine_similarity(np.stack([x, x @ q]))[0, 1] < 0.9


def test_lora_spectra(run):
  spectra = analysis.lora_spectra(run)
  ranks = dict(run.cfg.model.lora.ranks)
  assert sorted(spectra) == sorted(f"main/{t}" for t in ranks)
  lora = run.model.stages[0].slots.lora
  for key, s in spectra.items():
    target, r = s["target"], s["rank"]
    assert r == ranks[target] == 2
    sv = s["singular_values"]
    assert sv.shape == (run.depth, min(lora[target].a.shape[-2], lora[target].b.shape[-1]))
    assert np.all(sv[:, 0] > 0), key  # trained: B moved away from its zero init
    assert np.all(sv[:, r:] <= 1e-9 * sv[:, :1]), key  # rank-r product: at most r nonzero singular values
    for depth in range(run.depth):
      a, b = lora[target].a[...][depth], lora[target].b[...][depth]
      direct = float(jnp.linalg.norm(lora[target].scale * (a @ b)))
      np.testing.assert_allclose(s["norm"][depth], direct, rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(np.sqrt(np.sum(sv**2, axis=1)), s["norm"], rtol=1e-9)
    assert s["relative_norm"] is not None and np.all(s["relative_norm"] > 0)
    assert list(s["depths"]) == [0, 1] and list(s["repeats"]) == [0, 1]


def test_lora_spectra_of_a_random_adapter():
  """A synthetic adapter with known rank: the spectrum is exact, whatever the weights."""
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(3, 20, 4)), rng.normal(size=(3, 4, 30))
  fake = types.SimpleNamespace(scale=0.5, a=_Boxed(a), b=_Boxed(b))
  delta = probes.lora_delta(fake)
  sv = np.linalg.svd(delta, compute_uv=False)
  assert delta.shape == (3, 20, 30)
  assert np.all(sv[:, 4:] < 1e-10 * sv[:, :1]) and np.all(sv[:, 3] > 1e-6)
  np.testing.assert_allclose(np.linalg.norm(delta[1]), np.linalg.norm(0.5 * a[1] @ b[1]), rtol=1e-12)


class _Boxed:
  """Stands in for an nnx Variable: `v[...]` gives the array."""

  def __init__(self, value):
    self.value = value
    self.shape = value.shape

  def __getitem__(self, index):
    return self.value[index]


def test_moe_usage_of_a_dense_model(run):
  usage = analysis.moe_usage(run)
  assert not usage and usage.usage == {} and "dense" in usage.message


def test_moe_usage_of_a_moeut_model():
  """An untrained tiny MoEUT model (no checkpoint needed): usage per layer sums to top_k."""
  from flax import nnx

  from recursive_lm.model.transformer import Transformer

  spec = importlib.util.spec_from_file_location("rlm_moeut_config", os.path.join(ROOT, "configs", "moeut.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cd = module.get_config("size=tiny")
  cd.data.seq_len, cd.data.batch_size = 16, 2
  cfg = config_lib.load(cd)
  tokens = np.random.default_rng(0).integers(0, 256, size=(2, 16), dtype=np.int32)
  fake = types.SimpleNamespace(cfg=cfg, model=Transformer(cfg.model, nnx.Rngs(0)),
                               eval_batches=lambda n=None: [{"inputs": tokens, "targets": tokens}])
  usage = analysis.moe_usage(fake)
  depth, m = fake.model.plan.depth, cfg.model.moe
  assert usage and usage.usage["mlp_usage"].shape == (depth, m.experts)
  np.testing.assert_allclose(usage.usage["mlp_usage"].sum(-1), m.top_k, rtol=1e-6)
  assert sorted(usage.by_block) == ["main/b0", "main/b1"]  # 2 unique blocks x 2 repeats
  np.testing.assert_array_equal(usage.by_block["main/b1"]["mlp_usage"][1], usage.usage["mlp_usage"][3])
  assert usage.entropy["mlp_usage"].shape == (depth,) and np.all(usage.entropy["mlp_usage"] <= 1 + 1e-9)
  assert isinstance(plots.plot_moe_usage(usage), Figure)


def test_plots_return_figures(run, hidden):
  losses = analysis.depth_losses(run, include_embedding=True)
  spectra = analysis.lora_spectra(run)
  figures = [
      plots.plot_loss_curves(run),
      plots.plot_loss_curves(run, smooth=0.5, log_x=True),
      plots.plot_depth_loss(run, losses),
      plots.plot_depth_loss(run, losses[1:]),
      plots.plot_similarity(analysis.similarity(hidden), run),
      plots.plot_similarity(analysis.linear_cka(hidden)),
      plots.plot_lora_spectra(spectra),
      plots.plot_lora_spectra({k: spectra[k] for k in list(spectra)[:4]}),  # no spare panel for the legend
      plots.plot_lora_spectra({}),
      plots.plot_lora_norms(spectra),
      plots.plot_moe_usage(analysis.moe_usage(run)),  # dense: a figure with the message
  ]
  for fig in figures:
    assert isinstance(fig, Figure)
    fig.canvas.draw()  # layout and text actually render
  assert "Per-depth readout" in figures[2].axes[0].get_title()
  with pytest.raises(ValueError, match="effective layers"):
    plots.plot_depth_loss(run, losses[:1])


# ----------------------------------------------------------------------------
# Router depths of a trained Mixture-of-Recursions run.


@pytest.fixture(scope="module")
def mor_run():
  return analysis.load_run(tiny_mor_run_dir())


def test_byte_classes():
  text = b"aZ 7\t\n(_.\x00\xc3\x7f"
  want = ["letters", "letters", "whitespace", "digits", "whitespace", "whitespace", "punctuation", "punctuation",
          "punctuation", "other", "other", "other"]
  assert [analysis.BYTE_CLASSES[k] for k in analysis.byte_classes(list(text))] == want
  counts = np.bincount(analysis.byte_classes(np.arange(256)), minlength=5)
  np.testing.assert_array_equal(counts, [52, 10, 6, 32, 256 - 100])


def test_topk_router_depths_follow_the_capacities(mor_run):
  """Training's routing: step r keeps exactly ceil(capacity_r * T) tokens of every row, nested."""
  from recursive_lm.model.mor import step_sizes

  d = analysis.router_depths(mor_run)
  assert d and d.routing == "topk" and "'topk'" in d.message
  caps = mor_run.cfg.model.mor.capacities
  n, t = d.depth.shape
  assert n == mor_run.cfg.data.batch_size * mor_run.cfg.train.eval_batches
  for r, k in enumerate(step_sizes(caps, t)):
    np.testing.assert_array_equal((d.depth > r).sum(1), np.full(n, k), err_msg=f"step {r}")
  np.testing.assert_allclose(d.depth_frac, np.bincount(d.depth.ravel(), minlength=len(caps) + 1) / d.depth.size)
  np.testing.assert_allclose(d.by_position, d.depth.mean(0))


def test_threshold_router_depths_are_the_kv_cache_decoding_depths(mor_run):
  """Generation's routing: the depths equal those of decoding the same tokens one at a time
  through the KV cache (the path `generate` runs), and those of the cache-free forward with
  routing='threshold'; they are not training's top-k depths."""
  from flax import nnx

  d = analysis.router_depths(mor_run, routing="threshold")
  topk = analysis.router_depths(mor_run)
  assert d and d.routing == "threshold" and "causal" in d.message
  model = mor_run.model
  tokens = np.concatenate([b["inputs"] for b in mor_run.eval_batches()])
  np.testing.assert_array_equal(d.tokens, tokens)
  rows = tokens[:4]
  _, _, aux = model(jnp.asarray(rows), routing="threshold")
  np.testing.assert_array_equal(d.depth[:4], np.asarray(aux["router_depth"]))
  graphdef, state = nnx.split(model)

  @jax.jit
  def decode(state, cache, token, index):
    _, cache, aux = nnx.merge(graphdef, state)(token, cache, cache_index=index)
    return cache, aux["router_depth"][:, 0]

  cache, decoded = model.init_cache(*rows.shape), []
  for i in range(rows.shape[1]):
    cache, depth = decode(state, cache, jnp.asarray(rows[:, i:i + 1]), jnp.int32(i))
    decoded.append(np.asarray(depth))
  np.testing.assert_array_equal(d.depth[:4], np.stack(decoded, 1))
  assert (d.depth != topk.depth).any()  # the option changes the routing, not only the label
  np.testing.assert_allclose(d.depth_frac.sum(), 1.0)


def test_router_depths_by_byte_class_and_plot(mor_run):
  topk = analysis.router_depths(mor_run, n_batches=1)
  causal = analysis.router_depths(mor_run, n_batches=1, routing="threshold")
  classes = analysis.byte_classes(topk.tokens)
  for d in (topk, causal):
    assert sum(n for _, n in d.by_class.values()) == d.depth.size
    for name, (mean, n) in d.by_class.items():
      mask = classes == analysis.BYTE_CLASSES.index(name)
      assert n == mask.sum() and mean == pytest.approx(d.depth[mask].mean())
  fig = plots.plot_router_depths(topk, decode=lambda t: mor_run.tokenizer.decode([t]), compare=causal)
  fig.canvas.draw()
  assert [ax.get_title() for ax in fig.axes][:2] == ["Depth distribution", "Mean depth by byte class"]
  assert len(fig.axes[0].patches) == 2 * len(topk.depth_frac)  # both routings side by side
  with pytest.raises(ValueError, match="routing='greedy': one of \\['topk', 'threshold'\\]"):
    analysis.router_depths(mor_run, routing="greedy")


def test_router_depths_of_a_run_without_routers(run):
  d = analysis.router_depths(run, routing="threshold")
  assert not d and "model.mor.routing='none': no routers" in d.message
  assert isinstance(plots.plot_router_depths(d), Figure)


def _other_plans():
  cases = [("sandwich+per_depth_norms", dict(preset="sandwich", num_layers=5, per_depth_norms=True, lora_rank=2)),
           ("middle_sequence", dict(preset="middle_sequence", num_layers=6, repeats=2, lora_rank=3))]
  model = config_lib.base_config().model
  if "sliding_window" in model:  # per-depth rotary kinds and windows (and context-extended global rotary)
    windowed = {"preset": "cycle", "num_layers": 4, "repeats": 2, "model.sliding_window": 3,
                "model.global_every": 2, "model.rope_base_local": 100.0}
    if "rope_scaling" in model:
      windowed.update({"model.rope_scaling": "linear", "model.rope_scaling_factor": 4.0})
    cases.append(("cycle+sliding_window", windowed))
  return cases


@pytest.mark.parametrize("overrides", [kw for _, kw in _other_plans()], ids=[n for n, _ in _other_plans()])
def test_plan_walk_matches_the_forward_on_other_plans(overrides):
  """The walk in `residual_stream` re-implements how the model runs its plan;
  on plans the default run does not have (several stages, sequence order,
  per-depth norms, windowed layers) it must still give the model's logits and
  per-depth residual RMS. LoRA B is made nonzero so the adapters matter."""
  from conftest import tiny_config
  from flax import nnx

  from recursive_lm.model.transformer import Transformer

  cfg = config_lib.load(tiny_config(**overrides))
  model = Transformer(cfg.model, nnx.Rngs(0))
  for n, stage in enumerate(model.stages):
    for lora in ([] if stage.slots is None else stage.slots.lora.values()):
      lora.b[...] = 0.1 * jax.random.normal(jax.random.key(n), lora.b.shape)
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, size=(2, cfg.data.seq_len), dtype=np.int32)
  hidden = analysis.hidden_states(model, tokens)
  logits, _, aux = model(jnp.asarray(tokens))
  assert hidden.shape[0] == model.plan.depth + 1
  np.testing.assert_allclose(np.asarray(probes.readout(model, jnp.asarray(hidden[-1]))), np.asarray(logits),
                             rtol=1e-5, atol=1e-5)
  rms = np.sqrt(np.mean(np.square(hidden[1:].astype(np.float64)), axis=(1, 2, 3)))
  np.testing.assert_allclose(rms, np.asarray(aux["resid_rms"]), rtol=1e-5)
  assert len(analysis.lora_spectra(model)) == len(cfg.model.lora.ranks)  # only the repeated (middle) stage
