"""The package's layers (ARCHITECTURE.md): every import inside cdft/ points downward."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "cdft"

# Unit -> layer, as the table of ARCHITECTURE.md.
LAYERS = {
    "cdft.errors": 0, "cdft.configlib": 0, "cdft.cachedir": 0,
    "cdft.io": 1, "cdft.kernels": 1,
    "cdft.models": 2, "cdft.training": 2, "cdft.data": 2,
    "cdft.losses": 3, "cdft.weights": 3,
    "cdft.tasks": 4, "cdft.stylize": 4,
    "cdft.train": 5, "cdft.evaluation": 5,
}


def _unit(module):
  """``cdft.weights.zoo`` -> ``cdft.weights``; ``cdft.train`` -> ``cdft.train``."""
  return ".".join(module.split(".")[:2])


def _imports(path):
  """Every cdft module ``path`` imports (at the top or inside functions)."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith("cdft."))
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == "cdft":
        yield from (f"cdft.{a.name}" for a in node.names)
      elif node.module.startswith("cdft."):
        yield node.module


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    yield ".".join(p for p in parts if p != "__init__"), path


def test_every_unit_has_a_layer():
  units = {_unit(m) for m, _ in _modules() if m != "cdft"}
  assert units == set(LAYERS), "a new unit needs its row in ARCHITECTURE.md and LAYERS"
  text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
  assert all(f"`{u}`" in text for u in LAYERS)


@pytest.mark.parametrize("module,path", list(_modules()), ids=lambda x: str(x))
def test_imports_point_downward(module, path):
  if module == "cdft":
    return
  here = _unit(module)
  for target in _imports(path):
    there = _unit(target)
    if there == here:
      continue
    assert LAYERS[there] < LAYERS[here], (
        f"{path.relative_to(PACKAGE.parent)} imports {target}: {there} (layer {LAYERS[there]}) "
        f"is not below {here} (layer {LAYERS[here]}); see ARCHITECTURE.md")
