"""The colab notebook (launch/colab/mstkd_quickstart.ipynb) runs top to bottom on the CPU.

The notebook is executed in a fresh Jupyter kernel of this Python with nbclient, shrunk by
MSTKD_NOTEBOOK_TINY=1 to configs/distill.py:tiny (as tests/test_pipeline.py) and writing into
a temporary MSTKD_NOTEBOOK_WORKDIR that holds a copy of the session's finished tiny recipe. The kernel inherits this process's environment
(conftest's 8 simulated devices and compilation cache; the tiny preset uses one device).
"""

import importlib
import json
import os
import shutil
import sys

import pytest

import data_fixtures as fx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "launch", "colab", "mstkd_quickstart.ipynb")
CELL_TIMEOUT_S = 900      # per cell; the recipe cell is the long one
STARTUP_TIMEOUT_S = 120   # kernel start


def _require(module: str):
  try:
    return importlib.import_module(module)
  except ImportError as e:
    pytest.skip(f"executing the notebook needs {module}, which is not importable ({e}); "
                "pip install -r requirements-dev.txt")


def _tagged(nb, tag):
  cells = [c for c in nb["cells"] if tag in c.get("metadata", {}).get("tags", [])]
  assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
  return cells[0]


def _set(cell, line: str, replacement: str) -> None:
  """Replaces one line of a cell's source, as a user filling in a path would."""
  assert cell.source.count(line) == 1, f"{line!r} not found once in cell {cell.get('id')}"
  cell.source = cell.source.replace(line, replacement)


def _text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", [])
                 if o.get("output_type") == "stream")


def test_notebook_is_committed_without_outputs():
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  assert nb["nbformat"] == 4
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, (
          f"cell {cell.get('id')} holds outputs; clear them before committing")


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch, tiny_recipe):
  """The notebook on a copy of the session's finished tiny recipe: its recipe cell resumes
  (every stage finished, so nothing trains again) and the cells after it read what the
  recipe wrote. The recipe's own run from scratch is tests/test_pipeline.py's."""
  nbclient, nbformat, _ = (_require(m) for m in ("nbclient", "nbformat", "ipykernel"))

  # A kernel spec of exactly this interpreter, whatever kernels the machine has installed.
  kernel_dir = tmp_path / "jupyter" / "kernels" / "mstkd-notebook-test"
  kernel_dir.mkdir(parents=True)
  (kernel_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "mstkd notebook test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
      p for p in (str(tmp_path / "jupyter"), os.environ.get("JUPYTER_PATH", "")) if p))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter_runtime"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  monkeypatch.setenv("MSTKD_NOTEBOOK_TINY", "1")
  workdir = tmp_path / "workdir"
  shutil.copytree(tiny_recipe[0], workdir)
  monkeypatch.setenv("MSTKD_NOTEBOOK_WORKDIR", str(workdir))
  for name in ("MSTKD_REPO_URL", "MSTKD_REPO_DIR"):
    monkeypatch.delenv(name, raising=False)

  # Section 5's "your data" cells, pointed at a small RFW-style .bin file and at the
  # MST-KD student the notebook trains, so the evaluation path runs too.
  bin_path = tmp_path / "African_test.bin"
  images = [fx.png_bytes(seed, size=16) for seed in range(80)]
  fx.write_bin_fixture(str(bin_path), images, [k % 2 == 0 for k in range(40)])
  nb = nbformat.read(NOTEBOOK, as_version=4)
  _set(_tagged(nb, "eval-pth"), "RFW_DATA = []", f"RFW_DATA = [{str(bin_path)!r}]")
  _set(_tagged(nb, "eval-api"), 'CHECKPOINT = ""',
       'CHECKPOINT = os.path.join(WORKDIR, "student", "mstkd", "SL", "a-KD")')
  client = nbclient.NotebookClient(
      nb, kernel_name="mstkd-notebook-test", timeout=CELL_TIMEOUT_S,
      startup_timeout=STARTUP_TIMEOUT_S, resources={"metadata": {"path": REPO}})
  client.execute()  # raises CellExecutionError, with the traceback, on any failing cell

  for cell in nb.cells:
    for output in cell.get("outputs", []):
      assert output.get("output_type") != "error", output
  assert "nothing to install" in _text(_tagged(nb, "install"))
  assert "[pipeline] stage" not in _text(_tagged(nb, "run"))  # resumed: nothing reran
  table = _text(_tagged(nb, "table"))
  assert "student_alone" in table and "mstkd/SL/a-KD" in table, table
  images = [o for o in _tagged(nb, "plots").outputs
            if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
  assert images, "the plots cell displayed no image"
  assert (workdir / "report" / "report.json").exists()
  for tag in ("eval-pth", "real-data"):
    assert "Skipped" in _text(_tagged(nb, tag)), tag
  evaluated = _tagged(nb, "eval-api")
  assert "African" in _text(evaluated) and "a-KD" in _text(evaluated), _text(evaluated)
  assert any("image/png" in o.get("data", {}) for o in evaluated.outputs)
  assert (workdir / "eval_checkpoint" / "report.json").exists()
