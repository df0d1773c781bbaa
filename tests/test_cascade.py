"""The cascade: equal to chaining the levels, style statistics reused, progress per level,
its programs kept on disk (a second process compiles nothing); and the XLA:CPU tuning of
the stylization entry points."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cdft import models
from cdft.stylize import cascade
from cdft.stylize import cpu_tuning


def _gain(params, gain=2.0):
  return jax.tree_util.tree_map_with_path(
      lambda path, v: v * gain if "kernel" in str(path[-1]) else v, params)


@pytest.fixture(scope="module")
def stylizer():
  """Random 16x encoder/decoder pairs for levels 1 and 2.

  PyTorch's default init shrinks a ReLU map's variance ~6x per layer: the
  random level-2 decoder would output an almost constant image, whose level-1
  covariance is so ill-conditioned (WCT matrix entries ~1e7) that float64
  rounding of its statistics decides the result. Kernels x2 keep the maps alive.
  """
  levels = {}
  for k in (1, 2):
    enc = models.get_model("encoder", k, "16x")
    dec = models.get_model("decoder", k, "16x")
    x = np.zeros((1, 8, 8, 3), np.float32)
    ep = _gain(enc.init(jax.random.key(k), x))
    dp = _gain(dec.init(jax.random.key(10 + k), enc.apply(ep, x)))
    levels[k] = cascade.LevelModel(enc, dec, ep, dp)
  return cascade.Stylizer(levels)


@pytest.mark.parametrize("shape,orders", [
    ((36, 45, 3), (((2, 1), 1.0, None), ((1, 2), 0.6, [0.7, 0.3]))),
    # A portrait runs transposed through the landscape programs (level() does
    # not): equal to float rounding.
    ((45, 36, 3), (((2, 1), 1.0, None), ((1, 2), 0.6, [0.7, 0.3])))], ids=["landscape", "portrait"])
def test_cascade_equals_the_levels_chained(stylizer, shape, orders):
  rng = np.random.default_rng(0)
  content = rng.random(shape, dtype=np.float32)  # level 2 drops the odd row or column
  styles = [rng.random((24, 20, 3), dtype=np.float32), rng.random((28, 28, 3), dtype=np.float32)]
  for order, alpha, weights in orders:
    got = stylizer.stylize(content, styles, alpha=alpha, levels=order, style_weights=weights)
    img = content[None]
    for k in order:
      img = stylizer.level(k, img, [s[None] for s in styles], alpha, weights)
    want = np.asarray(img[0])
    assert got.shape == want.shape == cascade.output_size(*shape[:2], order) + (3,)
    tol = 1e-5 if shape[0] <= shape[1] else 1e-4  # transposed: other rounding
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


def test_bucket_shapes():
  b = cascade.bucket_shape
  assert b((1, 512, 512, 3)) == (1, 512, 512, 3)
  assert b((1, 512, 672, 3)) == b((1, 512, 752, 3)) == (1, 512, 768, 3)
  assert b((1, 512, 800, 3)) == b((1, 512, 1024, 3)) == (1, 512, 1024, 3)
  assert b((1, 512, 1200, 3)) == (1, 512, 1280, 3)
  assert b((1, 1024, 1024, 3)) == (1, 1024, 1024, 3)  # at the pixel bound
  assert b((1, 1024, 1100, 3)) is None  # above it: its own shape (compute dwarfs a compile)
  assert b((1, 2048, 2048, 3)) is None and b((1, 64, 4000, 3)) is None
  assert b((1, 31, 300, 3)) is None  # level 5 needs 2 pixels: 32 px
  assert b((1, 31, 300, 3), levels=(2, 1)) == (1, 64, 320, 3)
  assert all(s % 16 == 0 for s in cascade.BUCKET_SIDES)


@pytest.mark.parametrize("shape", [(36, 45, 3), (61, 33, 3), (64, 70, 3), (17, 100, 3)])
def test_a_bucketed_cascade_equals_its_own_shape(stylizer, shape, monkeypatch):
  # The image inside its bucket's canvas (the region's border, pooled extents
  # and masked statistics) against the programs of its exact shape; 64x70 fills
  # its 64x96 canvas in height.
  rng = np.random.default_rng(3)
  content = rng.random(shape, dtype=np.float32)
  style = rng.random((30, 26, 3), dtype=np.float32)
  assert cascade.bucket_shape(cascade._landscape((1,) + shape), (2, 1)) not in (
      None, cascade._landscape((1,) + shape))
  got = stylizer.stylize(content, style, alpha=0.9, levels=(2, 1))
  monkeypatch.setattr(cascade, "BUCKET_MAX_PIXELS", 0)  # every shape its own programs
  want = stylizer.stylize(content, style, alpha=0.9, levels=(2, 1))
  assert got.shape == want.shape == cascade.output_size(*shape[:2], (2, 1)) + (3,)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_style_stats_computed_once_serve_every_content(stylizer):
  rng = np.random.default_rng(2)
  styles = [rng.random((24, 20, 3), dtype=np.float32), rng.random((28, 28, 3), dtype=np.float32)]
  stats = stylizer.style_stats(styles, (2, 1), [0.7, 0.3])
  for shape in ((32, 40, 3), (20, 36, 3)):
    content = rng.random(shape, dtype=np.float32)
    want = stylizer.stylize(content, styles, alpha=0.8, levels=(2, 1), style_weights=[0.7, 0.3])
    got = stylizer.stylize(content, stats, alpha=0.8, levels=(2, 1))
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="lack level 2"):
    stylizer.stylize(content, stylizer.style_stats(styles, (1,)), levels=(2, 1))


# One process stylizes (JAX's compile events of the stylization counted), printed as JSON.
# Its random 16x levels 1 and 2 are read from the .npz of ``level_params``: no initialiser
# is compiled in the child.
_CACHE_CHILD = """
import json, sys
from jax import monitoring
from cdft.stylize import programs
programs.enable_compile_cache(sys.argv[1])
import numpy as np
from flax import traverse_util
from cdft import models
from cdft.stylize import cascade
stored = np.load(sys.argv[2])
levels = {}
for k in (1, 2):
  def tree(role):
    flat = {tuple(key.split("/")[2:]): stored[key] for key in stored.files
            if key.startswith(f"{k}/{role}/")}
    return traverse_util.unflatten_dict(flat)
  levels[k] = cascade.LevelModel(models.get_model("encoder", k, "16x"),
                                 models.get_model("decoder", k, "16x"), tree("enc"), tree("dec"))
st = cascade.Stylizer(levels)
rng = np.random.default_rng(0)
h, w = int(sys.argv[3]), int(sys.argv[4])
content, style = rng.random((h, w, 3), dtype=np.float32), rng.random((24, 24, 3), dtype=np.float32)
# JAX's compile events of the stylization alone.
events = {}
monitoring.register_event_listener(lambda name, **kw: events.__setitem__(name, events.get(name, 0) + 1))
monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: events.__setitem__(name, events.get(name, 0) + 1))
if len(sys.argv) > 5:  # exact tiles of this size (the tiled level programs)
  from cdft.stylize import tiled
  out = tiled.TiledStylizer(st, tile=int(sys.argv[5])).stylize(content, style, levels=(2, 1))
  out = out.to_array()
else:
  out = st.stylize(content, style, levels=(2, 1))
print(json.dumps({"events": events, "sum": float(np.abs(out).sum())}))
"""


@pytest.fixture(scope="module")
def level_params(tmp_path_factory):
  """Random 16x levels 1 and 2 as one .npz (keys ``<level>/<enc|dec>/<param path>``)."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  arrays = {}
  for k in (1, 2):
    enc, dec = models.get_model("encoder", k, "16x"), models.get_model("decoder", k, "16x")
    x = np.zeros((1, 8, 8, 3), np.float32)
    ep = jax.device_get(models.init(enc, jax.random.key(k), x))
    dp = jax.device_get(models.init(dec, jax.random.key(10 + k), enc.apply(ep, x)))
    for role, params in (("enc", ep), ("dec", dp)):
      for path, value in traverse_util.flatten_dict(params).items():
        arrays["/".join((str(k), role) + path)] = np.asarray(value)
  path = tmp_path_factory.mktemp("levels") / "levels.npz"
  np.savez(path, **arrays)
  return path


def _cached_run(cache, params, *args):
  env = dict(os.environ)
  env.pop("CDFT_NO_COMPILE_CACHE", None)
  out = subprocess.run([sys.executable, "-c", _CACHE_CHILD, str(cache), str(params)] +
                       [str(a) for a in args], env=env, capture_output=True, text=True,
                       check=True).stdout
  return json.loads(out.splitlines()[-1])


def _assert_every_program_from_the_cache(events):
  # Every program lowered was a persistent-cache hit. A program JAX will not
  # cache (one holding a host callback) is lowered and compiled without even
  # asking the cache: it counts among the lowerings, not the requests or hits.
  hits = events["/jax/compilation_cache/cache_hits"]
  assert events["/jax/compilation_cache/compile_requests_use_cache"] == hits
  assert events["/jax/core/compile/jaxpr_to_mlir_module_duration"] == hits


def _assert_nothing_traced_or_compiled(events):
  # JAX's own events: no trace, no lowering, no compile, not even a cache lookup.
  for name in ("/jax/core/compile/jaxpr_trace_duration",
               "/jax/core/compile/jaxpr_to_mlir_module_duration",
               "/jax/core/compile/backend_compile_duration",
               "/jax/compilation_cache/compile_requests_use_cache",
               "/jax/compilation_cache/cache_misses"):
    assert events.get(name, 0) == 0, (name, events)


def _stored(cache, suffix):
  return sorted(p.name for p in (cache / "programs").iterdir() if p.name.endswith(suffix))


def test_second_process_compiles_nothing(tmp_path, level_params):
  """The programs of a seen shape are loaded compiled from the store: nothing is traced or compiled."""
  cache = tmp_path / "cache"

  def run(h, w):
    return _cached_run(cache, level_params, h, w)

  first = run(24, 32)
  ev = first["events"]
  # The encoders of levels 2 and 1 (the style's statistics, in the same 64x64
  # bucket as the content, whose first encoder is level 2's), and the
  # decode(+encode) link of each of the 2 levels: 4 programs compiled and
  # kept, each as its trace and its executable (the WCT matrices are numpy
  # on the host).
  assert ev.get("/jax/compilation_cache/cache_misses", 0) == 4
  assert ev.get("/jax/core/compile/backend_compile_duration", 0) == 4
  traces, executables = _stored(cache, ".jaxexport"), _stored(cache, ".jaxexec")
  assert len(traces) == 4 and len(executables) == 4
  assert len(list((cache / "styles").iterdir())) == 1  # the style's statistics, kept
  second = run(24, 32)
  _assert_nothing_traced_or_compiled(second["events"])
  assert second["sum"] == first["sum"]  # the same result from the stored programs
  assert _stored(cache, "") == sorted(traces + executables)  # nothing new
  # A new shape of the same bucket (a 64x64 canvas; a portrait runs transposed)
  # compiles nothing either.
  _assert_nothing_traced_or_compiled(run(50, 30)["events"])
  # A new bucket (64x96) compiles its shape-dependent programs only (the first
  # encoder and the 2 links): the style statistics come from the cache.
  fourth = run(24, 72)["events"]
  assert fourth.get("/jax/compilation_cache/cache_misses", 0) == 3
  assert fourth.get("/jax/core/compile/backend_compile_duration", 0) == 3
  assert len(_stored(cache, ".jaxexec")) == len(_stored(cache, ".jaxexport")) == 7
  # Without its executables (another CPU or XLA flag would miss them the same
  # way) a process lowers the stored traces and finds them in JAX's cache:
  # executables read back from it are not kept (they would serialize broken).
  for name in _stored(cache, ".jaxexec"):
    (cache / "programs" / name).unlink()
  fifth = run(24, 32)
  _assert_every_program_from_the_cache(fifth["events"])
  assert len(_stored(cache, ".jaxexport")) == 7  # lowered from the stored traces
  assert fifth["sum"] == first["sum"]
  assert _stored(cache, ".jaxexec") == []
  # A damaged executable is compiled again, never run.
  (cache / "programs" / executables[0]).write_bytes(b"not an executable")
  assert run(24, 32)["sum"] == first["sum"]


def test_tiled_levels_are_cached_too(tmp_path, level_params):
  first = _cached_run(tmp_path, level_params, 80, 144, 64)
  assert first["events"].get("/jax/compilation_cache/cache_misses", 0) > 0
  second = _cached_run(tmp_path, level_params, 80, 144, 64)
  assert second["events"].get("/jax/compilation_cache/cache_misses", 0) == 0
  assert second["events"].get("/jax/compilation_cache/cache_hits", 0) > 0
  _assert_every_program_from_the_cache(second["events"])
  assert second["sum"] == first["sum"]


def test_progress_once_per_level_in_order(stylizer):
  seen = []
  content = np.random.default_rng(1).random((16, 16, 3), dtype=np.float32)
  stylizer.stylize(content, content, levels=(1, 2, 1), callback=lambda k, s: seen.append((k, s)))
  assert [k for k, _ in seen] == [1, 2, 1]
  assert all(s >= 0 for _, s in seen)
  # No callback left behind for the next run.
  stylizer.stylize(content, content, levels=(1,))
  assert len(seen) == 3


def test_bad_levels_and_weights_are_clear_errors(stylizer):
  img = np.zeros((16, 16, 3), np.float32)
  with pytest.raises(ValueError, match="level 3 is not loaded"):
    stylizer.stylize(img, img, levels=(3, 1))
  with pytest.raises(ValueError, match="2 style weights for 1 styles"):
    stylizer.stylize(img, img, style_weights=[0.5, 0.5], levels=(1,))


_TUNED = "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_fusion_emitters=false"


@pytest.mark.parametrize("extra,added,flags", [
    ({}, True, _TUNED),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, True,
     "--xla_force_host_platform_device_count=2 " + _TUNED),
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
     True, "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT "
     "--xla_cpu_use_fusion_emitters=false"),
    ({"XLA_FLAGS": _TUNED.replace("false", "true")}, False, _TUNED.replace("false", "true")),
    ({"CDFT_KEEP_XLA_FLAGS": "1"}, False, ""),
])
def test_xla_cpu_flags(extra, added, flags):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CDFT_KEEP_XLA_FLAGS")}
  env.update(extra)
  code = ("import os; from cdft.stylize import cpu_tuning; "
          "print(cpu_tuning.tune_xla_cpu()); print(os.environ.get('XLA_FLAGS', ''))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.splitlines()
  assert out == [str(added), flags]


def test_flag_is_not_touched_once_jax_runs():
  jax.numpy.zeros(1).block_until_ready()  # the backend is up in this process
  before = os.environ.get("XLA_FLAGS")
  assert cpu_tuning.tune_xla_cpu() is False
  assert os.environ.get("XLA_FLAGS") == before
