"""Analysis of models and runs: parameter and FLOP accounting, and probes of trained checkpoints.

  from recursive_lm import analysis
  run = analysis.load_run("runs/demo")
  analysis.depth_losses(run); analysis.plots.plot_loss_curves(run)

`accounting` is imported by training; everything else is loaded on first
attribute access (PEP 562), so `import recursive_lm.analysis.accounting`
does not pull in matplotlib or the checkpoint code.
"""

import importlib

_SUBMODULES = ("accounting", "run", "probes", "plots")
_EXPORTS = {
    "Run": "run", "load_run": "run", "split_metrics": "run", "resolve_workdir": "run",
    "MoEUsage": "probes", "hidden_states": "probes", "depth_losses": "probes", "readout": "probes",
    "residual_stream": "probes", "cosine_similarity": "probes", "linear_cka": "probes", "similarity": "probes",
    "lora_delta": "probes", "lora_spectra": "probes", "moe_usage": "probes", "router_depths": "probes",
    "RouterDepths": "probes", "byte_classes": "probes", "BYTE_CLASSES": "probes",
    "describe": "accounting",
}


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_SUBMODULES) | set(_EXPORTS))
