"""Figures for a loaded run; every function returns a matplotlib Figure.

  plot_loss_curves(run)                    train loss vs step, eval points (and bits per byte)
  plot_depth_loss(run, depth_losses(run))  logit lens across loops, annotated with the plan
  plot_similarity(similarity(h), run)      cosine and CKA heatmaps between depths
  plot_lora_spectra(lora_spectra(run))     singular values of each depth's LoRA delta, per target
  plot_lora_norms(lora_spectra(run))       size of each depth's LoRA delta relative to the shared weight
  plot_moe_usage(moe_usage(run))           expert usage per layer (MoEUT)
  plot_router_depths(router_depths(run))   recursions per token: distribution, byte class, position, token (MoR)

Figures are made with pyplot and closed before they are returned: in a
notebook the returned Figure is shown once (as the cell's value), and scripts
or tests that make many figures do not accumulate open ones. Choose the
backend as usual (tests use Agg).
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

LN2 = math.log(2)
_BLOCK_COLORS = plt.get_cmap("tab10").colors


def _style(ax) -> None:
  ax.grid(True, alpha=0.3, linewidth=0.6)
  for side in ("top", "right"):
    ax.spines[side].set_visible(False)


def _finish(fig: Figure) -> Figure:
  fig.tight_layout()
  plt.close(fig)
  return fig


def _message(text: str, title: str) -> Figure:
  """A small figure that says why there is nothing to plot."""
  fig, ax = plt.subplots(figsize=(6, 1.8))
  ax.axis("off")
  ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10)
  ax.set_title(title)
  return _finish(fig)


def _run_title(run) -> str:
  m = run.cfg.model
  stages = ", ".join(f"{s.unique_blocks}x{s.repeats}" for s in run.plan.stages)
  return f"{run.workdir.rstrip('/').split('/')[-1]} ({m.plan.preset} {stages}, L_eff={run.depth}, step {run.step})"


def _bits_axis(ax, byte_level: bool) -> None:
  """A right-hand axis in bits per byte for nats/token losses of a byte-level tokenizer."""
  if byte_level:
    right = ax.secondary_yaxis("right", functions=(lambda x: x / LN2, lambda x: x * LN2))
    right.set_ylabel("bits per byte")
    ax.spines["right"].set_visible(False)


def _layer_label(layer: dict, many_stages: bool) -> str:
  return (f"{layer['stage']}\n" if many_stages else "") + f"b{layer['block']} r{layer['repeat']}"


# ----------------------------------------------------------------------------


def _ema(values: np.ndarray, alpha: float) -> np.ndarray:
  out, acc = np.empty_like(values), values[0]
  for i, v in enumerate(values):
    acc = alpha * acc + (1 - alpha) * v
    out[i] = acc
  return out


def plot_loss_curves(run, smooth: float = 0.0, log_x: bool = False) -> Figure:
  """Train loss vs step (line; with smooth in (0, 1) an EMA over the raw,
  faint, curve) and eval loss at its steps (markers, last one labelled).
  Byte-level runs get a bits-per-byte axis on the right."""
  if not run.train and not run.eval:
    return _message(f"{run.workdir}: no metrics.jsonl records", "Loss curves")
  fig, ax = plt.subplots(figsize=(8, 4.5))
  if run.train:
    steps = np.array([r["step"] for r in run.train])
    loss = np.array([r["loss"] for r in run.train], np.float64)
    if 0.0 < smooth < 1.0 and len(loss) > 2:
      ax.plot(steps, loss, color="C0", alpha=0.25, linewidth=1)
      ax.plot(steps, _ema(loss, smooth), color="C0", linewidth=1.8, label=f"train (EMA {smooth})")
    else:
      ax.plot(steps, loss, color="C0", linewidth=1.8, label="train")
  if run.eval:
    steps = np.array([r["step"] for r in run.eval])
    loss = np.array([r["eval_loss"] for r in run.eval], np.float64)
    ax.plot(steps, loss, "o--", color="C3", markersize=6, linewidth=1, label="eval")
    last = f"{loss[-1]:.3f}" + (f" nats ({loss[-1] / LN2:.2f} bpb)" if run.is_byte_level else "")
    # Below and left of the last point: the eval line arrives from the upper left.
    ax.annotate(last, (steps[-1], loss[-1]), textcoords="offset points", xytext=(-6, -16), ha="right",
                color="C3", fontsize=9)
  if run.step < max(r["step"] for r in run.metrics):
    ax.axvline(run.step, color="gray", linestyle=":", linewidth=1, label=f"loaded checkpoint ({run.step})")
  if log_x:
    ax.set_xscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  _bits_axis(ax, run.is_byte_level)
  ax.set_title(f"Loss curves: {_run_title(run)}")
  ax.legend(frameon=False)
  _style(ax)
  return _finish(fig)


def plot_depth_loss(run, losses, reference: float | None = None) -> Figure:
  """Loss if the model stopped after each effective layer.

  losses: [L_eff] from `depth_losses(run)`, or [L_eff+1] with the
  embedding-only readout first (`include_embedding=True`). Markers are
  coloured by unique block, shaded bands mark repeats (loops), and stage
  boundaries are drawn when the plan has several stages. reference: a
  horizontal line (default: the run's last eval loss, when there is one).
  """
  losses = np.asarray(losses, np.float64)
  layers = run.plan.describe()
  if losses.shape[0] not in (len(layers), len(layers) + 1):
    raise ValueError(f"losses has {losses.shape[0]} entries; the plan has {len(layers)} effective layers")
  with_emb = losses.shape[0] == len(layers) + 1
  stages = [s.name for s in run.plan.stages]
  many = len(stages) > 1
  fig, ax = plt.subplots(figsize=(max(6.5, 0.75 * len(losses) + 3), 4.5))
  x = np.arange(1, len(layers) + 1)
  layer_losses = losses[1:] if with_emb else losses
  # Bands: one per (stage, repeat) run of consecutive depths.
  start, band = 0, 0
  for i in range(1, len(layers) + 1):
    if i == len(layers) or (layers[i]["stage"], layers[i]["repeat"]) != (layers[start]["stage"], layers[start]["repeat"]):
      if run.plan.stages[stages.index(layers[start]["stage"])].repeats > 1:
        ax.axvspan(start + 0.5, i + 0.5, color="0.5" if band % 2 else "0.8", alpha=0.15, linewidth=0)
        ax.text((start + i + 1) / 2, 1.0, f"repeat {layers[start]['repeat']}", transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8, color="0.35")
        band += 1
      if many and i < len(layers) and layers[i]["stage"] != layers[start]["stage"]:
        ax.axvline(i + 0.5, color="0.3", linewidth=1)
      start = i
  ax.plot(x, layer_losses, "-", color="0.45", linewidth=1.2, zorder=2)
  blocks = sorted({(l["stage"], l["block"]) for l in layers}, key=lambda sb: (stages.index(sb[0]), sb[1]))
  for n, (stage, block) in enumerate(blocks):
    idx = [i for i, l in enumerate(layers) if (l["stage"], l["block"]) == (stage, block)]
    ax.scatter(x[idx], layer_losses[idx], s=55, color=_BLOCK_COLORS[n % 10], zorder=3, edgecolor="white",
               label=(f"{stage} " if many else "") + f"block {block}")
  shown = losses.copy()  # where each point is drawn
  if with_emb:
    # The embedding alone can be far worse than any layer (a tied head scores the input
    # token itself highest); drawn to scale it would flatten the layers' differences.
    lo, hi = float(layer_losses.min()), float(layer_losses.max())
    span = max(hi - lo, 0.05 * max(abs(hi), 1e-3))
    off_scale = losses[0] > hi + 1.5 * span
    if off_scale:
      top = hi + 0.6 * span
      ax.set_ylim(lo - 0.2 * span, top)
      shown[0] = hi + 0.45 * span
    ax.scatter([0], [shown[0]], s=70 if off_scale else 55, marker="^" if off_scale else "s", color="0.2", zorder=3,
               label="embedding only" + (" (off scale)" if off_scale else ""))
    ax.plot([0, 1], [shown[0], layer_losses[0]], ":", color="0.45", linewidth=1)
  if len(losses) <= 32:
    for xi, yi, y_at in zip(np.arange(0 if with_emb else 1, len(layers) + 1), losses, shown):
      ax.annotate(f"{yi:.2f}", (xi, y_at), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
  if reference is None and run.eval:
    reference = run.eval[-1]["eval_loss"]
  if reference is not None:
    ax.axhline(reference, color="C3", linestyle="--", linewidth=1, label=f"eval loss {reference:.3f}")
  ticks = ([0] if with_emb else []) + list(x)
  # Tick text uses the plan's 0-based layer index, as every other figure does.
  labels = (["emb"] if with_emb else []) + [f"{l['depth']}\n{_layer_label(l, many)}" for l in layers]
  ax.set_xticks(ticks, labels, fontsize=8)
  ax.set_xlim(min(ticks) - 0.6, max(ticks) + 0.6)
  ax.set_xlabel("exit after effective layer (index, unique block b, repeat r)")
  ax.set_ylabel("loss (nats / token)")
  _bits_axis(ax, run.is_byte_level)
  ax.set_title(f"Per-depth readout (logit lens): {_run_title(run)}", pad=16)
  ax.legend(frameon=False, fontsize=8, loc="best")
  _style(ax)
  return _finish(fig)


def plot_similarity(sim, run=None, labels: list[str] | None = None) -> Figure:
  """Heatmaps of depth x depth similarity matrices [L+1, L+1] (depth 0 = embedding).

  sim: one matrix or {'cosine': ..., 'cka': ...} (from `similarity`), one
  panel each. Tick labels come from `labels`, else from the run's plan.
  """
  mats = {"similarity": np.asarray(sim)} if not isinstance(sim, dict) else {k: np.asarray(v) for k, v in sim.items()}
  n = next(iter(mats.values())).shape[0]
  if labels is None and run is not None:
    # Row i is the stream after layer i - 1 (the plan's 0-based index); row 0 the embedding.
    labels = [f"{i - 1}: {t}" if i else t for i, t in enumerate(run.layer_labels(with_embedding=True))]
  labels = labels or [str(i) for i in range(n)]
  titles = {"cosine": "cosine (mean over tokens)", "cka": "linear CKA"}
  size = min(max(4.2, 0.45 * n + 2.5), 9)
  fig, axes = plt.subplots(1, len(mats), figsize=(size * len(mats) + 0.5, size), squeeze=False)
  for ax, (name, m) in zip(axes[0], mats.items()):
    im = ax.imshow(m, cmap="magma", vmin=min(0.0, float(m.min())), vmax=1.0, interpolation="nearest")
    if n <= 16:
      for i in range(n):
        for j in range(n):
          ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7 if n > 9 else 8,
                  color="black" if m[i, j] > 0.6 else "white")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("residual stream after layer")
    ax.set_ylabel("residual stream after layer")
    ax.set_title(titles.get(name, name))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  fig.suptitle("Representation similarity between depths" + (f": {_run_title(run)}" if run is not None else ""))
  return _finish(fig)


_TARGET_ORDER = ("q", "k", "v", "o", "gate", "up", "down")


def _ordered(spectra: dict) -> list[str]:
  """Keys in stage order, then in the order projections run (q k v o gate up down)."""
  rank = lambda t: _TARGET_ORDER.index(t) if t in _TARGET_ORDER else len(_TARGET_ORDER)
  stages = list(dict.fromkeys(s["stage"] for s in spectra.values()))
  return sorted(spectra, key=lambda k: (stages.index(spectra[k]["stage"]), rank(spectra[k]["target"]), k))


_SHORT = FuncFormatter(lambda v, _: f"{v:.2g}")


def plot_lora_spectra(spectra: dict, ncols: int = 4) -> Figure:
  """Singular values of scale * A_l @ B_l: one panel per LoRA target (and
  stage), one line per depth (colour = effective layer); only the first
  `rank` values, the rest being zero by construction. Panels share the
  log y axis, so targets compare directly."""
  if not spectra:
    return _message("no LoRA adapters in this model (model.lora.rank = 0, or no shared stage)", "LoRA spectra")
  keys = _ordered(spectra)
  many_stages = len({s["stage"] for s in spectra.values()}) > 1
  ncols = min(ncols, len(keys))
  nrows = math.ceil(len(keys) / ncols)
  spare = nrows * ncols > len(keys)  # an empty panel holds the legend; otherwise a right margin does
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols + (0 if spare else 1.6), 2.8 * nrows + 0.5),
                           squeeze=False, sharey=True)
  all_depths = sorted({int(d) for s in spectra.values() for d in s["depths"]})
  cmap = plt.get_cmap("viridis")
  color = lambda d: cmap(all_depths.index(d) / max(1, len(all_depths) - 1))
  for n, (ax, key) in enumerate(zip(axes.flat, keys)):
    s = spectra[key]
    r = s["rank"]
    idx = np.arange(1, r + 1)
    for row, d in enumerate(s["depths"]):
      ax.plot(idx, np.maximum(s["singular_values"][row, :r], 1e-12), "o-", markersize=3, linewidth=1.3,
              color=color(int(d)), label=f"{d}: b{s['blocks'][row]} r{s['repeats'][row]}")
    ax.set_yscale("log")
    # Spectra often span less than a decade: label 2x and 5x ticks too, in plain numbers.
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_major_formatter(_SHORT)
    ax.yaxis.set_minor_formatter(_SHORT)
    ax.set_xticks(idx if r <= 16 else idx[:: max(1, r // 8)])
    ax.set_title(key if many_stages else s["target"], fontsize=10)
    if n >= len(keys) - ncols:
      ax.set_xlabel("singular value index")
    if n % ncols == 0:
      ax.set_ylabel("singular value")
    _style(ax)
  handles, labels = axes.flat[0].get_legend_handles_labels()
  if spare:
    for ax in list(axes.flat)[len(keys):]:
      ax.axis("off")
    axes.flat[-1].legend(handles, labels, title="depth: block, repeat", loc="center", frameon=False, fontsize=8,
                         ncol=1 if len(labels) <= 12 else 2)
    fig.suptitle("LoRA delta (scale * A @ B) singular values per depth")
    return _finish(fig)
  fig.legend(handles, labels, title="depth", loc="center right", frameon=False, fontsize=8)
  fig.suptitle("LoRA delta (scale * A @ B) singular values per depth")
  fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
  plt.close(fig)
  return fig


def plot_lora_norms(spectra: dict, relative: bool = True) -> Figure:
  """Frobenius norm of each depth's LoRA delta, one line per target; relative
  to the norm of the shared kernel it adapts when known (how far each depth
  moves away from the tied weight)."""
  if not spectra:
    return _message("no LoRA adapters in this model (model.lora.rank = 0, or no shared stage)", "LoRA norms")
  use_rel = relative and all(s["relative_norm"] is not None for s in spectra.values())
  many_stages = len({s["stage"] for s in spectra.values()}) > 1
  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  for n, key in enumerate(_ordered(spectra)):
    s = spectra[key]
    y = s["relative_norm"] if use_rel else s["norm"]
    ax.plot(s["depths"], y, "o-", markersize=4, linewidth=1.4, color=plt.get_cmap("tab10")(n % 10),
            label=key if many_stages else s["target"])
  ticks = sorted({(int(d), int(b), int(r)) for s in spectra.values() for d, b, r in
                  zip(s["depths"], s["blocks"], s["repeats"])})
  ax.set_xticks([d for d, _, _ in ticks], [f"{d}\nb{b} r{r}" for d, b, r in ticks], fontsize=8)
  ax.set_xlabel("effective layer (index, unique block b, repeat r)")
  ax.set_ylabel("||ΔW||_F / ||W_shared||_F" if use_rel else "||ΔW||_F")
  ax.set_title("Size of each depth's LoRA delta" + (" relative to the shared weight" if use_rel else ""))
  ax.legend(frameon=False, fontsize=8, ncol=2)
  _style(ax)
  return _finish(fig)


def plot_moe_usage(usage) -> Figure:
  """Heatmaps of expert usage per effective layer (rows) and expert (columns),
  one panel per router kind; attention routers show their heads side by side.
  A dense model gives a figure carrying `usage.message`."""
  if not usage:
    return _message(usage.message, "MoE expert usage")
  many = len({l["stage"] for l in usage.layers}) > 1
  rows = [f"{l['depth']}: {_layer_label(l, many).replace(chr(10), ' ')}" for l in usage.layers]
  kinds = list(usage.usage)
  fig, axes = plt.subplots(len(kinds), 1, figsize=(9, 1.2 + 0.4 * len(rows) * len(kinds) + 0.6 * len(kinds)),
                           squeeze=False)
  titles = {"mlp_usage": "σ-MoE MLP experts", "att_v_usage": "SwitchHead V experts",
            "att_o_usage": "SwitchHead O experts"}
  for ax, key in zip(axes[:, 0], kinds):
    u = usage.usage[key]
    n_exp = u.shape[-1]
    flat = u.reshape(u.shape[0], -1)  # heads side by side for attention routers
    im = ax.imshow(flat, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    if u.ndim == 3:
      for h in range(1, u.shape[1]):
        ax.axvline(h * n_exp - 0.5, color="white", linewidth=1.5)
      ax.set_xlabel(f"expert (heads side by side, {n_exp} experts each)")
    else:
      ax.set_xlabel("expert")
    if flat.shape[1] <= 48:
      ax.set_xticks(range(flat.shape[1]), [str(i % n_exp) for i in range(flat.shape[1])], fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_ylabel("effective layer")
    dead = int(np.sum(usage.dead[key]))
    ax.set_title(f"{titles.get(key, key)}: share of tokens per expert (mean normalised entropy "
                 f"{np.mean(usage.entropy[key]):.2f}, {dead} dead)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
  fig.suptitle("MoE expert usage per layer")
  return _finish(fig)


_ROUTING_COLORS = {"topk": "tab:blue", "threshold": "tab:orange"}


def _bars(ax, groups: list, labels: list[str]) -> None:
  """Grouped bars: groups [(name, color, values [K])] side by side at each of the K labels."""
  width = 0.8 / len(groups)
  for n, (name, color, values) in enumerate(groups):
    ax.bar(np.arange(len(labels)) + (n - (len(groups) - 1) / 2) * width, values, width, color=color, label=name)
  ax.set_xticks(range(len(labels)), labels)


def plot_router_depths(depths, decode=None, top: int = 24, compare=None) -> Figure:
  """Which tokens go deep (Mixture-of-Recursions, `analysis.router_depths`):
  the share of tokens per depth, the mean depth by byte class (byte-level
  runs), by position, and of the `top` most frequent tokens, deepest first.
  decode: token id -> label (e.g. the run's tokenizer). compare: a second
  RouterDepths of the same tokens under the other routing, drawn next to
  `depths` in the distribution, class and position panels. A model without
  routers gives a figure carrying `depths.message`."""
  if not depths:
    return _message(depths.message, "Router depths")
  runs = [depths] + ([compare] if compare else [])
  color = lambda d: _ROUTING_COLORS.get(d.routing, "tab:gray")
  name = lambda d: f"{d.routing} routing"
  r = len(depths.depth_frac) - 1
  if depths.by_class:
    fig, grid = plt.subplots(2, 2, figsize=(13, 7.2), gridspec_kw={"width_ratios": [1, 1.6]})
    ax_frac, ax_class, ax_pos, ax_tok = grid.flat
  else:
    fig, grid = plt.subplots(1, 3, figsize=(14, 3.6), gridspec_kw={"width_ratios": [1, 2, 2]})
    (ax_frac, ax_pos, ax_tok), ax_class = grid, None
  _bars(ax_frac, [(name(d), color(d), d.depth_frac) for d in runs], [str(k) for k in range(r + 1)])
  ax_frac.set_xlabel("recursions taken")
  ax_frac.set_ylabel("share of tokens")
  ax_frac.set_title("Depth distribution")
  if ax_class is not None:
    classes = list(depths.by_class)
    _bars(ax_class, [(name(d), color(d), [d.by_class.get(c, (np.nan, 0))[0] for c in classes]) for d in runs],
          [f"{c}\n({depths.by_class[c][1]} tokens)" for c in classes])
    ax_class.set_ylim(0, r)
    ax_class.set_ylabel("mean recursions")
    ax_class.set_title("Mean depth by byte class")
  for d in runs:
    ax_pos.plot(d.by_position, color=color(d), label=name(d))
  ax_pos.set_xlabel("position in the sequence")
  ax_pos.set_ylabel("mean recursions")
  ax_pos.set_ylim(0, r)
  ax_pos.set_title("Mean depth by position")
  frequent = sorted(depths.by_token.items(), key=lambda kv: -kv[1][1])[:top]
  frequent.sort(key=lambda kv: -kv[1][0])
  label = decode or (lambda t: str(t))
  ax_tok.bar(range(len(frequent)), [d for _, (d, _) in frequent], color=color(depths))
  names = [{" ": "␣", "": "''"}.get(repr(label(t))[1:-1], repr(label(t))[1:-1]) for t, _ in frequent]
  ax_tok.set_xticks(range(len(frequent)), names, fontsize=9, rotation=0 if max(map(len, names)) <= 2 else 90)
  ax_tok.set_ylim(0, r)
  ax_tok.set_ylabel("mean recursions")
  ax_tok.set_title(f"Mean depth ({depths.routing}) of the {len(frequent)} most frequent tokens, deepest first")
  for ax in fig.axes:
    _style(ax)
  if compare:
    ax_frac.legend(frameon=False, fontsize=8)
  fig.suptitle(depths.message)
  return _finish(fig)


__all__ = ["plot_depth_loss", "plot_loss_curves", "plot_lora_norms", "plot_lora_spectra", "plot_moe_usage",
           "plot_router_depths", "plot_similarity"]
