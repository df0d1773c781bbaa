"""colabs/stylize.ipynb: clean on disk, and runs end to end on CPU with real images.

The end-to-end test works as papermill does (without depending on it): the source
of the cell tagged ``parameters`` is replaced with small real images and an output
in tmp_path, then nbclient executes every cell in a fresh kernel. That kernel
runs this interpreter (a kernel spec written to tmp_path, found through
$JUPYTER_PATH), imports this checkout's cdft (PYTHONPATH) and runs JAX on CPU.
"""
import json
import os
import pathlib
import re
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from PIL import Image  # noqa: E402

from cdft.io.images import load_image  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "colabs" / "stylize.ipynb"
KERNEL_NAME = "cdft-test-python"
CELL_TIMEOUT_S = 300
PARAMETERS = ("CONTENT", "STYLE", "CONTENT_SIZE", "STYLE_SIZE", "ALPHA", "OUTPUT", "STYLE2",
              "ADAIN_MODEL", "ADAIN_TEACHER", "ADAIN_PRESET", "ADAIN_STEPS")
PROGRESS = re.compile(r"^level (\d): \d+\.\d+ s$", re.MULTILINE)


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def _parameters_cell(nb):
  tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{len(tagged)} cells tagged 'parameters' (want 1)"
  return tagged[0]


def test_notebook_is_clean():
  nb = _read()
  nbformat.validate(nb)
  assert nb.nbformat == 4
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs, f"cell {cell.id} has outputs"
      assert cell.execution_count is None, f"cell {cell.id} has an execution count"
  params = _parameters_cell(nb)
  assert params.cell_type == "code"
  assigned = re.findall(r"^(\w+) = ", params.source, re.MULTILINE)
  assert tuple(assigned) == PARAMETERS


def _write_kernel_spec(jupyter_dir):
  """A kernel spec running ``sys.executable`` (whatever kernels are installed)."""
  spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "cdft tests (this interpreter)",
      "language": "python",
  }))


def _kernel_env(weights_dir, cache_dir):
  env = dict(os.environ)
  pythonpath = [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  env.update({
      "PYTHONPATH": os.pathsep.join(pythonpath),
      "JAX_PLATFORMS": "cpu",
      "CDFT_WEIGHTS_DIR": str(weights_dir),
      "CDFT_CACHE_DIR": str(cache_dir),  # converted weights: not in ~/.cache
  })
  return env


def _stream_text(nb):
  return "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", [])
                 if out.output_type == "stream")


def test_notebook_runs(images_dir, weights_dir, tmp_path, monkeypatch):
  content_path = images_dir / "content" / "adain_avril.jpg"
  style_path = images_dir / "style" / "adain_la_muse.jpg"
  style2_path = images_dir / "style" / "adain_mondrian.jpg"
  output = tmp_path / "out" / "stylized.jpg"
  size = 64

  nb = _read()
  _parameters_cell(nb).source = "\n".join([
      f"CONTENT = {str(content_path)!r}",
      f"STYLE = {str(style_path)!r}",
      f"CONTENT_SIZE = {size}",
      f"STYLE_SIZE = {size}",
      "ALPHA = 1.0",
      f"OUTPUT = {str(output)!r}",
      f"STYLE2 = {str(style2_path)!r}",
      # AdaIN: no pytorch-AdaIN files here; 3 steps of a narrow random-VGG decoder demo.
      'ADAIN_MODEL = "adain-vgg"',
      'ADAIN_TEACHER = "random"',
      'ADAIN_PRESET = "16x"',
      "ADAIN_STEPS = 3",
  ])
  # Which cdft the kernel imported (this checkout, not an installed copy).
  nb.cells.append(nbformat.v4.new_code_cell("import cdft\nprint('cdft from', cdft.__file__)"))

  jupyter_dir = tmp_path / "jupyter"
  _write_kernel_spec(jupyter_dir)
  monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))
  work = tmp_path / "work"  # the kernel's cwd: nothing lands in the checkout
  work.mkdir()
  client = nbclient.NotebookClient(
      nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S, allow_errors=False,
      resources={"metadata": {"path": str(work)}})
  client.execute(env=_kernel_env(weights_dir, tmp_path / "cache"))

  errors = [(cell.id, out.get("ename"), out.get("evalue")) for cell in nb.cells
            for out in cell.get("outputs", []) if out.output_type == "error"]
  assert not errors

  text = _stream_text(nb)
  assert [int(k) for k in PROGRESS.findall(text)] == [5, 4, 3, 2, 1], text
  assert f"cdft from {REPO / 'cdft' / '__init__.py'}" in text, text
  images = [out for cell in nb.cells for out in cell.get("outputs", [])
            if out.output_type == "display_data" and "image/png" in out.get("data", {})]
  # content | style | result, the variations, the AdaIN loss curves and its stylizations
  assert len(images) == 4
  assert "trained 3 steps" in text and "-> AdaIN with the decoder trained above" in text, text

  height, width = load_image(content_path, shorter_side=size).shape[:2]
  assert min(height, width) == size
  expected = ((width // 16) * 16, (height // 16) * 16)
  assert output.is_file()
  with Image.open(output) as result:
    assert result.size == expected
