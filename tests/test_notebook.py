"""experiments/analysis_notebook/analysis.ipynb runs top to bottom, unedited,
against a real run (the tiny default run of tests/test_analysis.py, passed
through RLM_RUN as a user would), in a fresh Jupyter kernel."""

import os
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from test_analysis import tiny_run_dir  # noqa: E402  (tests/ is on sys.path under pytest)

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                        "analysis_notebook", "analysis.ipynb")


def test_notebook_runs_without_errors(monkeypatch):
  run_dir = tiny_run_dir()
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
  images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
  assert images >= 6, f"expected a figure per plotting cell, got {images}"  # curves, depth, similarity, 2 LoRA, MoE
  text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
  assert "depth 1: stage main, block 0, repeat 1" in text and "dense model has no experts" in text
  assert "model.mor.routing='none': no routers" in text
  assert elapsed < 60, f"notebook took {elapsed:.0f} s"
