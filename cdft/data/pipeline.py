"""Deterministic, multi-process batch iterators over a random-access source.

Training (``make_train_iterator``), with N examples, global batch G, P
processes:
  * Epoch e visits the examples in the order
    ``np.random.default_rng([seed, e]).permutation(N)``; global step s covers
    positions [s * G, (s + 1) * G) of the endless concatenation of the epoch
    orders (position q is index ``perm_e[q % N]`` with e = q // N).
  * Process p takes the contiguous slice [p * G / P, (p + 1) * G / P) of every
    global batch, so the union over processes does not depend on P.
  * The augmentation of position q = e * N + i uses
    ``example_rng(seed, e, i, 0) = np.random.default_rng([seed, e, i, 0, 1])``
    (the trailing 1 keeps it apart from the epoch permutation's [seed, e]:
    numpy's SeedSequence pads short seeds with zeros). It depends only on the
    seed and the position: not on P, the threads, the workers or what was read
    before.
  * ``start_step=k`` starts at position k * G without reading what is before.
  * An example that fails to load or preprocess (any exception but
    ``KeyboardInterrupt``-like ones) is replaced: attempt a = 1, 2, ... uses
    ``rng = example_rng(seed, e, i, a)``, takes source index
    ``rng.integers(N)`` and then augments with the same ``rng``. Each failure
    counts in ``skipped`` and each bad source index is warned about once. After
    ``MAX_ATTEMPTS`` failures in a row for one position the iterator raises
    ``CdftError``.
So a batch is a pure function of (seed, step): the iterator's whole state is
the step of its next batch (``state()``, saved in every checkpoint).

Execution is grain's (``grain.MapDataset`` over the steps, one element per
batch): ``num_workers`` worker processes (``mp_prefetch``; each decodes whole
batches, round robin, so the output does not depend on their number) or, with
0 workers, ``num_threads`` threads of this process; ``prefetch`` batches are
prepared ahead. Without a preprocessing function an in-memory source gives
each batch as one gather by index, in the calling thread (no grain).

Evaluation (``make_eval_iterator``): one pass over the split in source order,
the last global batch padded to the batch size; each batch has 'mask' (1.0 for
real examples, 0.0 for padding and for examples that could not be read, which
are counted in ``skipped``). Sharded across processes the same contiguous way.
"""

import functools
import logging
import os
import signal
import sys
import threading
import time

import numpy as np

from cdft import errors
from cdft.errors import CdftError

# Failures in a row for one position before the training iterator gives up.
MAX_ATTEMPTS = 100
# Default number of decoding threads (with no worker processes).
DEFAULT_THREADS = min(8, os.cpu_count() or 1)

logger = logging.getLogger(__name__)


def default_workers():
  """Worker processes when a config says -1: one per two cores, 1 to 8 (the
  training step has the rest of the cores)."""
  return max(1, min(8, (os.cpu_count() or 1) // 2))


def epoch_permutation(seed, epoch, num_examples):
  """The order of the examples in ``epoch``."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


@functools.lru_cache(maxsize=4)
def _cached_permutation(seed, epoch, num_examples):
  perm = epoch_permutation(seed, epoch, num_examples)
  perm.setflags(write=False)
  return perm


def example_rng(seed, epoch, index_in_epoch, attempt=0):
  """The generator of one example's augmentation (and replacement choice)."""
  return np.random.default_rng([seed, epoch, index_in_epoch, attempt, 1])


def _process_layout(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise CdftError(f"process_index {process_index} is not in [0, {process_count})")
  return int(process_index), int(process_count)


def _local_batch(batch_size, process_count, what):
  """This process's share of a global batch of ``batch_size`` (``what``: its name)."""
  if batch_size % process_count:
    raise CdftError(f"{what} {batch_size} is not divisible by the number of processes "
                    f"{process_count}")
  return batch_size // process_count


def _check_int(name, value, low):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise CdftError(f"{name} must be an integer >= {low}, got {value!r}")
  return int(value)


def _stack(examples, what):
  try:
    return {key: np.stack([np.asarray(e[key]) for e in examples]) for key in examples[0]}
  except (KeyError, ValueError) as e:
    raise CdftError(f"{what}: examples do not stack into a batch (different keys or "
                    f"shapes; a preprocessing with a fixed output size is needed): "
                    f"{errors.one_line(e, with_type=True)}") from e


def _name(source):
  return getattr(source, "name", type(source).__name__)


def _grain_flags():
  """grain reads its absl flags (``--grain_*``) at run time; in a process that
  never parsed absl flags (a notebook, pytest, a worker) they keep their defaults."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    for name in list(flags.FLAGS):
      if name.startswith("grain_") and not flags.FLAGS[name].present:
        flags.FLAGS[name].present = 1


def _exit_with_parent(parent_pid, every_s=1.0):
  """Ends this process once ``parent_pid`` is gone (re-parented: ``os.getppid`` changes)."""
  while True:
    if os.getppid() != parent_pid:
      os._exit(1)  # pylint: disable=protected-access
    time.sleep(every_s)


def _worker_init(*_):
  """Runs first in each grain worker process: grain's flags, signals and no orphans.

  Ctrl-C in a terminal (SIGINT) and a scheduler's stop (SIGTERM to the job's processes)
  reach the workers too; the trainer handles them (it saves its step and exits, closing
  the input), so the workers ignore them: one that died first would fail the batch the
  trainer waits for before it can save. A trainer killed with SIGKILL runs no cleanup;
  its workers would go on decoding (and hold its stdout open), so each watches its parent.
  """
  _grain_flags()
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN)
  threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True,
                   name="cdft-exit-with-parent").start()


def _grain():
  try:
    import grain  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CdftError("reading files for training needs grain: pip install 'cdft[data]' "
                    "(or pip install grain)") from e
  _grain_flags()
  return grain


def _grain_iterator(dataset, *, num_workers, num_threads, prefetch):
  """An iterator over a ``grain.MapDataset`` of batches, in order."""
  grain = _grain()
  buffer = max(prefetch, 1)
  threads = min(num_threads, buffer)
  if num_workers:
    threads = 1  # Each worker decodes one batch at a time; the workers run in parallel.
  it = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                 prefetch_buffer_size=buffer if threads else 0))
  if num_workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=buffer),
                        worker_init_fn=_worker_init)
  return iter(it)


def _next(it, name):
  """``next(it)``, a dead grain worker explained."""
  try:
    return next(it)
  except RuntimeError as e:
    if "terminated unexpectedly" not in str(e):
      raise
    raise CdftError(
        f"{name}: a data worker process died ({errors.one_line(e)}); its own error is "
        "printed above. Workers are spawned and import the main module again: a script "
        "that trains must do so under `if __name__ == '__main__':`; or set "
        "config.input.num_workers=0 (decoding threads, no processes)") from e


def _own(tree):
  """A batch from grain's workers as plain numpy arrays (copied out of shared memory)."""
  if isinstance(tree, dict):
    return {k: _own(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [_own(v) for v in tree]
  if isinstance(tree, np.ndarray):
    return np.array(tree, copy=True)
  return tree


class _TrainBatch:
  """Process ``process_index``'s batch at a global step: (batch, failures).

  Picklable (grain ships it to its worker processes); a pure function of the step.
  """

  def __init__(self, source, preprocess_fn, *, seed, global_batch_size, local_batch_size,
               process_index):
    self.source, self.preprocess_fn, self.seed = source, preprocess_fn, seed
    self.global_batch_size, self.local_batch_size = global_batch_size, local_batch_size
    self.process_index = process_index
    self.num_examples = len(source)

  def positions(self, step):
    start = step * self.global_batch_size + self.process_index * self.local_batch_size
    return range(start, start + self.local_batch_size)

  def source_index(self, position):
    epoch, i = divmod(position, self.num_examples)
    return int(_cached_permutation(self.seed, epoch, self.num_examples)[i])

  def _load(self, position):
    """One position: (example, [(bad index, message), ...])."""
    epoch, i = divmod(position, self.num_examples)
    index = self.source_index(position)
    failures = []
    for attempt in range(MAX_ATTEMPTS):
      rng = example_rng(self.seed, epoch, i, attempt)
      if attempt:
        index = int(rng.integers(self.num_examples))
      try:
        return self.preprocess_fn(self.source[index], rng), failures
      except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
      except Exception as e:  # pylint: disable=broad-except
        failures.append((index, errors.one_line(e, with_type=True)))
    bad = "; ".join(f"example {i}: {m}" for i, m in failures[:3])
    raise CdftError(f"{_name(self.source)}: none of the {MAX_ATTEMPTS} examples tried for "
                    f"position {position} could be read or preprocessed ({bad})")

  def __call__(self, step):
    results = [self._load(q) for q in self.positions(step)]
    return {"batch": _stack([example for example, _ in results], _name(self.source)),
            "failures": [f for _, failures in results for f in failures]}


class _Warnings:
  """Counts skipped examples; warns once per bad source index."""

  def __init__(self, name):
    self.name, self.skipped, self._warned = name, 0, set()

  def note(self, failures):
    for index, message in failures:
      self.skipped += 1
      if index not in self._warned:
        self._warned.add(index)
        logger.warning("data: skipping unreadable example %d of %s (%s)", index, self.name,
                       message)


class _Iterator:
  """What the training and evaluation iterators share: the source and its checks, the
  warnings, grain's iterator over the batches, close and the context manager."""
  _it = None

  def __init__(self, source, *, num_workers, num_threads, prefetch):
    self.num_workers = _check_int("num_workers", num_workers, 0)
    self._num_threads = _check_int("num_threads", num_threads, 0)
    self._prefetch = _check_int("prefetch", prefetch, 0)
    self.source, self.num_examples = source, len(source)
    if self.num_examples == 0:
      raise CdftError(f"{_name(source)!s}: the data source is empty")
    self._warnings = _Warnings(_name(source))

  def _start(self, dataset):
    """Iterates ``dataset`` (a ``grain.MapDataset`` of batches) with the workers or threads."""
    self._it = _grain_iterator(dataset, num_workers=self.num_workers,
                               num_threads=self._num_threads, prefetch=self._prefetch)

  def _next_loaded(self):
    """The next element of grain's iterator, its failures counted and warned about."""
    if self._it is None:
      raise CdftError(f"{_name(self.source)}: the iterator is closed")
    out = _next(self._it, _name(self.source))
    if self.num_workers:  # worker output lives in shared memory until copied
      out = _own(out)
    self._warnings.note(out["failures"])
    return out

  def close(self):
    """Stops the worker threads and processes (pending work is dropped)."""
    it, self._it = self._it, None
    close = getattr(it, "close", None)
    if close is not None:
      close()

  def __iter__(self):
    return self

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  @property
  def skipped(self):
    return self._warnings.skipped


class TrainIterator(_Iterator):
  """Endless iterator over this process's part of the global training batches.

  Attributes:
    skipped: examples that failed to load/preprocess so far (each replaced).
    num_examples: N, the size of the source.
    steps_per_epoch: ``max(1, N // global_batch_size)``.
    step: the global step of the next batch.
    global_batch_size, local_batch_size, process_index, process_count, seed, num_workers.
  """

  def __init__(self, source, preprocess_fn, *, global_batch_size, seed, start_step=0,
               process_index=None, process_count=None, num_workers=0,
               num_threads=DEFAULT_THREADS, prefetch=2):
    self.global_batch_size = _check_int("global_batch_size", global_batch_size, 1)
    self.seed = _check_int("seed", seed, 0)
    self.step = _check_int("start_step", start_step, 0)
    self.process_index, self.process_count = _process_layout(process_index, process_count)
    self.local_batch_size = _local_batch(self.global_batch_size, self.process_count,
                                         "global batch size")
    super().__init__(source, num_workers=num_workers, num_threads=num_threads,
                     prefetch=prefetch)
    self.steps_per_epoch = max(1, self.num_examples // self.global_batch_size)
    self._load = _TrainBatch(source, preprocess_fn, seed=self.seed,
                             global_batch_size=self.global_batch_size,
                             local_batch_size=self.local_batch_size,
                             process_index=self.process_index)
    if preprocess_fn is None:
      if not hasattr(source, "get_batch"):
        raise CdftError(f"{_name(source)!s}: no preprocessing needs a source with get_batch "
                        "(an in-memory ArraySource)")
      self.num_workers = 0
      return
    self._start(_grain().MapDataset.range(self.step, sys.maxsize).map(self._load))

  def state(self):
    """What restarts this iterator exactly: the next step and what fixes the order."""
    return {"step": self.step, "seed": self.seed, "global_batch_size": self.global_batch_size,
            "num_examples": self.num_examples}

  def positions(self, step):
    """The global positions this process reads at ``step``."""
    return self._load.positions(step)

  def source_indices(self, step):
    """The source indices of this process's batch at ``step`` (before any
    replacement of unreadable examples)."""
    return [self._load.source_index(q) for q in self.positions(step)]

  def __next__(self):
    if self._load.preprocess_fn is None:  # As stored: one gather, no threads.
      batch = self.source.get_batch(self.source_indices(self.step))
    else:
      batch = self._next_loaded()["batch"]
    self.step += 1
    return batch


class _EvalBatch:
  """Batch b of one pass: ([example or None], failures); picklable."""

  def __init__(self, source, preprocess_fn, *, batch_size, local_batch_size, process_index):
    self.source, self.preprocess_fn = source, preprocess_fn
    self.batch_size, self.local_batch_size = batch_size, local_batch_size
    self.process_index = process_index
    self.num_examples = len(source)

  def load(self, position):
    """(example or None, failures) for a real position; None for padding."""
    if position >= self.num_examples:
      return None, []
    try:
      # Eval ops ignore the rng; a fixed one keeps any op deterministic.
      return self.preprocess_fn(self.source[position], np.random.default_rng(position)), []
    except (KeyboardInterrupt, SystemExit, MemoryError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      return None, [(position, errors.one_line(e, with_type=True))]

  def __call__(self, batch):
    start = batch * self.batch_size + self.process_index * self.local_batch_size
    results = [self.load(q) for q in range(start, start + self.local_batch_size)]
    return {"examples": [example for example, _ in results],
            "failures": [f for _, failures in results for f in failures]}


class EvalIterator(_Iterator):
  """One pass over the source in order: padded batches with a 'mask'.

  Attributes:
    skipped: examples that could not be read (masked out) so far.
    num_examples: N.
    num_batches: ``ceil(N / batch_size)`` (also ``len()``).
    batch_size (global), local_batch_size, process_index, process_count.
  """

  def __init__(self, source, preprocess_fn, *, batch_size, process_index=None,
               process_count=None, num_workers=0, num_threads=DEFAULT_THREADS, prefetch=2):
    self.batch_size = _check_int("batch_size", batch_size, 1)
    self.process_index, self.process_count = _process_layout(process_index, process_count)
    self.local_batch_size = _local_batch(self.batch_size, self.process_count, "eval batch size")
    super().__init__(source, num_workers=num_workers, num_threads=num_threads,
                     prefetch=prefetch)
    self.num_batches = -(-self.num_examples // self.batch_size)
    self._load = _EvalBatch(source, preprocess_fn, batch_size=self.batch_size,
                            local_batch_size=self.local_batch_size,
                            process_index=self.process_index)
    self._next_batch = 0
    self._template = None
    self._start(_grain().MapDataset.range(self.num_batches).map(self._load))

  def __len__(self):
    return self.num_batches

  def _padding_template(self):
    """Zeros shaped like a preprocessed example (the first readable one)."""
    if self._template is None:
      for position in range(self.num_examples):
        example, _ = self._load.load(position)
        if example is not None:
          self._template = {k: np.zeros_like(np.asarray(v)) for k, v in example.items()}
          break
      else:
        raise CdftError(f"{_name(self.source)}: none of the {self.num_examples} examples "
                        "could be read or preprocessed")
    return self._template

  def __next__(self):
    if self._next_batch >= self.num_batches or self._it is None:
      self.close()
      raise StopIteration
    out = self._next_loaded()
    self._next_batch += 1
    mask = np.array([example is not None for example in out["examples"]], np.float32)
    examples = [self._padding_template() if example is None else example
                for example in out["examples"]]
    batch = _stack(examples, _name(self.source))
    batch["mask"] = mask
    return batch


def make_train_iterator(source, preprocess_fn, *, global_batch_size, seed, start_step=0,
                        process_index=None, process_count=None, num_workers=0,
                        num_threads=DEFAULT_THREADS, prefetch=2):
  """This process's endless iterator of training batches (see the module doc).

  Args:
    source: random-access source (``len``, ``[i]`` -> dict), e.g. from
      ``cdft.data.sources.get_source``; picklable when ``num_workers`` > 0.
    preprocess_fn: ``fn(example, rng) -> dict`` of fixed-shape arrays, e.g.
      from ``cdft.data.preprocess.get_preprocess`` (picklable with workers);
      None: the examples as stored, gathered a batch at a time by
      ``source.get_batch(indices)`` (the in-memory sources; the step does the
      preprocessing, ``cdft.data.augment``).
    global_batch_size: G, the batch over all processes.
    seed: non-negative integer; fixes the order and the augmentation.
    start_step: the global step of the first batch (resuming).
    process_index: this process (None: ``jax.process_index()``).
    process_count: number of processes (None: ``jax.process_count()``).
    num_workers: grain worker processes decoding batches (0: threads here).
    num_threads: decoding threads when there are no workers (0: decode in the
      calling thread).
    prefetch: batches prepared ahead of the one returned (per worker).

  Returns:
    A ``TrainIterator`` yielding dicts of numpy arrays with leading dimension
    G / P; attributes ``skipped``, ``num_examples``, ``steps_per_epoch``.

  Raises:
    CdftError: empty source, bad sizes, G not divisible by P, grain missing.
  """
  return TrainIterator(source, preprocess_fn, global_batch_size=global_batch_size, seed=seed,
                       start_step=start_step, process_index=process_index,
                       process_count=process_count, num_workers=num_workers,
                       num_threads=num_threads, prefetch=prefetch)


def make_eval_iterator(source, preprocess_fn, *, batch_size, process_index=None,
                       process_count=None, num_workers=0, num_threads=DEFAULT_THREADS,
                       prefetch=2):
  """One pass over ``source`` in padded, masked batches (see the module doc).

  Args:
    source: random-access source.
    preprocess_fn: ``fn(example, rng) -> dict`` (an eval op ignores ``rng``).
    batch_size: the global batch size (over all processes).
    process_index: this process (None: ``jax.process_index()``).
    process_count: number of processes (None: ``jax.process_count()``).
    num_workers: grain worker processes (0: threads here).
    num_threads: decoding threads without workers (0: decode in the calling thread).
    prefetch: batches prepared ahead.

  Returns:
    An ``EvalIterator`` (``len()`` batches) yielding dicts with a float32
    'mask' of shape (batch_size / P,).
  """
  return EvalIterator(source, preprocess_fn, batch_size=batch_size,
                      process_index=process_index, process_count=process_count,
                      num_workers=num_workers, num_threads=num_threads, prefetch=prefetch)
