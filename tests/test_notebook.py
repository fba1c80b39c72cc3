"""experiments/analysis_notebook/analysis.ipynb runs top to bottom, unedited,
against real runs (the tiny default run of tests/test_analysis.py, and its
tiny Mixture-of-Recursions run for the router section), passed through
RLM_RUN as a user would, in a fresh Jupyter kernel."""

import os
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from test_analysis import tiny_mor_run_dir, tiny_run_dir  # noqa: E402  (tests/ is on sys.path under pytest)

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                        "analysis_notebook", "analysis.ipynb")


def _execute(run_dir: str, monkeypatch) -> tuple[list, str, int]:
  """Run the notebook on run_dir: (code cells, their printed text, number of images)."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel inherits this environment: RLM_RUN, and conftest's XLA flags (fast compiles).
  monkeypatch.setenv("RLM_RUN", run_dir)
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  started = time.time()
  client.execute()  # raises CellExecutionError naming the cell on any error
  elapsed = time.time() - started
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code)
  errors = [o for c in code for o in c.outputs if o.output_type == "error"]
  assert not errors, errors
  assert elapsed < 60, f"notebook took {elapsed:.0f} s"
  images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
  text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
  return code, text, images


def test_notebook_runs_without_errors(monkeypatch):
  _, text, images = _execute(tiny_run_dir(), monkeypatch)
  assert images >= 6, f"expected a figure per plotting cell, got {images}"  # curves, depth, similarity, 2 LoRA, MoE
  assert "depth 1: stage main, block 0, repeat 1" in text and "dense model has no experts" in text
  assert "model.mor.routing='none': no routers" in text


def test_notebook_router_section_on_a_routed_run(monkeypatch):
  """A Mixture-of-Recursions run: the layer-by-layer sections say they do not
  apply, the router section prints both routings' depth shares and the byte
  classes, and draws its figure (the last cell's output)."""
  code, text, images = _execute(tiny_mor_run_dir(), monkeypatch)
  assert text.count("the layer-by-layer probes do not apply the routers") == 2
  assert "routing 'topk'" in text and "share of tokens per depth 0..R: topk" in text
  assert "tokens whose depth differs between the two routings" in text
  assert "letters" in text and "punctuation" in text and "deepest tokens" in text
  assert "no routers" not in text
  assert any("image/png" in o.get("data", {}) for o in code[-1].outputs)
  assert images >= 5  # curves, 2 LoRA messages, MoE message, router depths
