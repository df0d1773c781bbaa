"""The compiled-program layer: one future per program, the program store, the memory bound."""
import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import numpy as np
import pytest

from cdft.stylize import programs


@pytest.fixture
def store(tmp_path, monkeypatch):
  """An empty export store and program table; JAX's persistent cache (the test
  session's, see conftest.py) is off, so every program not in the store compiles."""
  monkeypatch.setitem(programs._STATE, "store", tmp_path / "programs")
  monkeypatch.setattr(programs, "_PROGRAMS", {})
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # JAX decides once whether its cache is used
  yield tmp_path / "programs"
  jax.config.update("jax_enable_compilation_cache", enabled)
  compilation_cache.reset_cache()


def _counting(traces):
  def fn(x, y):
    traces.append(x.shape)  # runs once per trace
    return jnp.tanh(x) * 2 + y.sum()
  return fn


def test_one_future_per_program_and_shape(store):
  traces = []
  fn = _counting(traces)
  x, y = np.ones((3, 4), np.float32), np.ones((2,), np.float32)
  a = programs.compile_async("t.fn", fn, (x, y))
  assert programs.compile_async("t.fn", fn, (x, y)) is a
  assert programs.compile_async("t.fn", fn, (jax.ShapeDtypeStruct((3, 4), jnp.float32), y)) is a
  b = programs.compile_async("t.fn", fn, (np.ones((5, 4), np.float32), y))
  c = programs.compile_async("t.fn", fn, (x, y), static=("other",))
  assert len({id(a), id(b), id(c)}) == 3
  np.testing.assert_allclose(a.result()(x, y), np.tanh(1) * 2 + 2, rtol=1e-6)
  assert b.result()(np.ones((5, 4), np.float32), y).shape == (5, 4)
  np.testing.assert_allclose(c.result()(x, y), np.tanh(1) * 2 + 2, rtol=1e-6)


def test_store_replaces_tracing_and_compiling_and_recovers_from_damage(store, monkeypatch):
  traces = []
  fn = _counting(traces)
  x, y = np.full((2, 3), 0.5, np.float32), np.arange(4, dtype=np.float32)
  want = np.tanh(0.5) * 2 + 6

  def run():  # as a new process: a fresh program table and function object
    monkeypatch.setattr(programs, "_PROGRAMS", {})
    return programs.compile_async("t.store", _counting(traces), (x, y)).result()(x, y)

  np.testing.assert_allclose(programs.compile_async("t.store", fn, (x, y)).result()(x, y), want, rtol=1e-6)
  [export] = store.glob("*.jaxexport")
  [executable] = store.glob("*.jaxexec")
  assert len(traces) == 1
  np.testing.assert_allclose(run(), want, rtol=1e-6)
  assert len(traces) == 1  # loaded compiled: not traced
  export.write_bytes(b"not an exported program")
  np.testing.assert_allclose(run(), want, rtol=1e-6)
  assert len(traces) == 1  # the executable does not need the trace
  executable.write_bytes(b"not an executable")
  np.testing.assert_allclose(run(), want, rtol=1e-6)
  assert len(traces) == 2  # both damaged: traced and compiled again, both rewritten
  assert export.stat().st_size > 100 and executable.stat().st_size > 100
  np.testing.assert_allclose(run(), want, rtol=1e-6)
  assert len(traces) == 2


def test_executables_are_keyed_by_the_machine(store, monkeypatch):
  traces = []
  x = np.ones((3,), np.float32)
  programs.compile_async("t.machine", _counting(traces), (x, x)).result()
  monkeypatch.setattr(programs, "_PROGRAMS", {})
  monkeypatch.setitem(programs._STATE, "machine", "another CPU or XLA flag")
  np.testing.assert_allclose(
      programs.compile_async("t.machine", _counting(traces), (x, x)).result()(x, x),
      np.tanh(1) * 2 + 3, rtol=1e-6)
  assert len(traces) == 1  # lowered from the stored trace, compiled for this "machine"
  assert len(list(store.glob("*.jaxexec"))) == 2 and len(list(store.glob("*.jaxexport"))) == 1


def test_programs_in_memory_are_bounded(store, monkeypatch):
  monkeypatch.setattr(programs, "MAX_PROGRAMS", 3)
  fn = lambda x: x + 1  # noqa: E731
  futures = [programs.compile_async("t.bound", fn, (np.zeros((n,), np.float32),))
             for n in range(1, 6)]
  for f in futures:
    f.result()
  programs.compile_async("t.bound", fn, (np.zeros((9,), np.float32),)).result()
  assert len(programs._PROGRAMS) <= 3
