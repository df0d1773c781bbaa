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
    seed and the position: not on P, the threads or what was read before.
  * ``start_step=k`` starts at position k * G without reading what is before.
  * An example that fails to load or preprocess (any exception but
    ``KeyboardInterrupt``-like ones) is replaced: attempt a = 1, 2, ... uses
    ``rng = example_rng(seed, e, i, a)``, takes source index
    ``rng.integers(N)`` and then augments with the same ``rng``. Each failure
    counts in ``skipped`` and each bad source index is warned about once. After
    ``MAX_ATTEMPTS`` failures in a row for one position the iterator raises
    ``CdftError``.
Examples are loaded and preprocessed in a thread pool; batches come out in
order, ``prefetch`` batches are prepared ahead. Without a preprocessing
function an in-memory source gives each batch as one gather by index.

Evaluation (``make_eval_iterator``): one pass over the split in source order,
the last global batch padded to the batch size; each batch has 'mask' (1.0 for
real examples, 0.0 for padding and for examples that could not be read, which
are counted in ``skipped``). Sharded across processes the same contiguous way.
"""

import collections
import concurrent.futures
import functools
import logging
import math
import os

import numpy as np

from cdft import errors
from cdft.errors import CdftError

# Failures in a row for one position before the training iterator gives up.
MAX_ATTEMPTS = 100
# Default size of the decoding thread pool.
DEFAULT_THREADS = min(8, os.cpu_count() or 1)

logger = logging.getLogger(__name__)


def epoch_permutation(seed, epoch, num_examples):
  """The order of the examples in ``epoch``."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


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


class _BatchIterator:
  """Shared machinery: a thread pool, in-order batches, prefetch, warnings."""

  def __init__(self, source, preprocess_fn, num_threads, prefetch):
    self.source = source
    self.preprocess_fn = preprocess_fn
    self.num_examples = len(source)
    if self.num_examples == 0:
      raise CdftError(f"{getattr(source, 'name', source)!s}: the data source is empty")
    self.skipped = 0
    self._warned = set()
    num_threads = _check_int("num_threads", num_threads, 0)
    self._prefetch = _check_int("prefetch", prefetch, 0)
    self._executor = (concurrent.futures.ThreadPoolExecutor(
        num_threads, thread_name_prefix="cdft-data") if num_threads else None)
    self._pending = collections.deque()

  @property
  def _name(self):
    return getattr(self.source, "name", type(self.source).__name__)

  def _process(self, index, rng):
    """Loads and preprocesses source example ``index``; raises on failure."""
    return self.preprocess_fn(self.source[index], rng)

  def _submit(self, tasks):
    if self._executor is None:
      return list(tasks)  # Run at gather time.
    return [self._executor.submit(task) for task in tasks]

  def _gather(self, handles):
    if self._executor is None:
      return [handle() for handle in handles]
    return [handle.result() for handle in handles]

  def _note_failures(self, failures):
    for index, message in failures:
      self.skipped += 1
      if index not in self._warned:
        self._warned.add(index)
        logger.warning("data: skipping unreadable example %d of %s (%s)", index,
                       self._name, message)

  def close(self):
    """Stops the worker threads (pending work is dropped)."""
    if self._executor is not None:
      self._executor.shutdown(wait=False, cancel_futures=True)
      self._executor = None
    self._pending.clear()

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


class TrainIterator(_BatchIterator):
  """Endless iterator over this process's part of the global training batches.

  Attributes:
    skipped: examples that failed to load/preprocess so far (each replaced).
    num_examples: N, the size of the source.
    steps_per_epoch: ``max(1, N // global_batch_size)``.
    step: the global step of the next batch.
    global_batch_size, local_batch_size, process_index, process_count, seed.
  """

  def __init__(self, source, preprocess_fn, *, global_batch_size, seed, start_step=0,
               process_index=None, process_count=None, num_threads=DEFAULT_THREADS,
               prefetch=2):
    self.global_batch_size = _check_int("global_batch_size", global_batch_size, 1)
    self.seed = _check_int("seed", seed, 0)
    self.step = _check_int("start_step", start_step, 0)
    self.process_index, self.process_count = _process_layout(process_index, process_count)
    self.local_batch_size = _local_batch(self.global_batch_size, self.process_count,
                                         "global batch size")
    if preprocess_fn is None:
      if not hasattr(source, "get_batch"):
        raise CdftError(f"{getattr(source, 'name', source)!s}: no preprocessing needs a source "
                        "with get_batch (an in-memory ArraySource)")
      num_threads = 0
    super().__init__(source, preprocess_fn, num_threads, prefetch)
    self.steps_per_epoch = max(1, self.num_examples // self.global_batch_size)
    self._next_submit = self.step
    self._permutations = collections.OrderedDict()

  def _permutation(self, epoch):
    if epoch not in self._permutations:
      self._permutations[epoch] = epoch_permutation(self.seed, epoch, self.num_examples)
      while len(self._permutations) > 2:
        self._permutations.popitem(last=False)
    return self._permutations[epoch]

  def positions(self, step):
    """The global positions this process reads at ``step``."""
    start = step * self.global_batch_size + self.process_index * self.local_batch_size
    return range(start, start + self.local_batch_size)

  def source_indices(self, step):
    """The source indices of this process's batch at ``step`` (before any
    replacement of unreadable examples)."""
    return [int(self._permutation(q // self.num_examples)[q % self.num_examples])
            for q in self.positions(step)]

  def _load(self, epoch, index_in_epoch, index):
    """One position: (example, [(bad index, message), ...])."""
    failures = []
    for attempt in range(MAX_ATTEMPTS):
      rng = example_rng(self.seed, epoch, index_in_epoch, attempt)
      if attempt:
        index = int(rng.integers(self.num_examples))
      try:
        return self._process(index, rng), failures
      except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
      except Exception as e:  # pylint: disable=broad-except
        failures.append((index, errors.one_line(e, with_type=True)))
    position = epoch * self.num_examples + index_in_epoch
    bad = "; ".join(f"example {i}: {m}" for i, m in failures[:3])
    raise CdftError(f"{self._name}: none of the {MAX_ATTEMPTS} examples tried for "
                    f"position {position} could be read or preprocessed ({bad})")

  def _submit_step(self, step):
    tasks = []
    for q in self.positions(step):
      epoch, i = divmod(q, self.num_examples)
      tasks.append(functools.partial(self._load, epoch, i,
                                     int(self._permutation(epoch)[i])))
    self._pending.append(self._submit(tasks))

  def __next__(self):
    if self.preprocess_fn is None:  # As stored: one gather, no threads.
      batch = self.source.get_batch(self.source_indices(self.step))
      self.step += 1
      return batch
    while len(self._pending) < self._prefetch + 1:
      self._submit_step(self._next_submit)
      self._next_submit += 1
    results = self._gather(self._pending.popleft())
    for _, failures in results:
      self._note_failures(failures)
    batch = _stack([example for example, _ in results], self._name)
    self.step += 1
    return batch


class EvalIterator(_BatchIterator):
  """One pass over the source in order: padded batches with a 'mask'.

  Attributes:
    skipped: examples that could not be read (masked out) so far.
    num_examples: N.
    num_batches: ``ceil(N / batch_size)`` (also ``len()``).
    batch_size (global), local_batch_size, process_index, process_count.
  """

  def __init__(self, source, preprocess_fn, *, batch_size, process_index=None,
               process_count=None, num_threads=DEFAULT_THREADS, prefetch=2):
    self.batch_size = _check_int("batch_size", batch_size, 1)
    self.process_index, self.process_count = _process_layout(process_index, process_count)
    self.local_batch_size = _local_batch(self.batch_size, self.process_count, "eval batch size")
    super().__init__(source, preprocess_fn, num_threads, prefetch)
    self.num_batches = math.ceil(self.num_examples / self.batch_size)
    self._next_batch = 0
    self._next_submit = 0
    self._template = None

  def __len__(self):
    return self.num_batches

  def _load(self, position):
    """(example or None, failures) for a real position; None for padding."""
    if position >= self.num_examples:
      return None, []
    try:
      # Eval ops ignore the rng; a fixed one keeps any op deterministic.
      return self._process(position, np.random.default_rng(position)), []
    except (KeyboardInterrupt, SystemExit, MemoryError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      return None, [(position, errors.one_line(e, with_type=True))]

  def _padding_template(self):
    """Zeros shaped like a preprocessed example (the first readable one)."""
    if self._template is None:
      for position in range(self.num_examples):
        example, _ = self._load(position)
        if example is not None:
          self._template = {k: np.zeros_like(np.asarray(v)) for k, v in example.items()}
          break
      else:
        raise CdftError(f"{self._name}: none of the {self.num_examples} examples "
                        "could be read or preprocessed")
    return self._template

  def _submit_batch(self, batch):
    start = batch * self.batch_size + self.process_index * self.local_batch_size
    tasks = [functools.partial(self._load, q) for q in range(start, start + self.local_batch_size)]
    self._pending.append(self._submit(tasks))

  def __next__(self):
    if self._next_batch >= self.num_batches:
      self.close()
      raise StopIteration
    while self._next_submit < self.num_batches and len(self._pending) < self._prefetch + 1:
      self._submit_batch(self._next_submit)
      self._next_submit += 1
    results = self._gather(self._pending.popleft())
    for _, failures in results:
      self._note_failures(failures)
    self._next_batch += 1
    mask = np.array([example is not None for example, _ in results], np.float32)
    template = None
    examples = []
    for example, _ in results:
      if example is None:
        if template is None:
          template = self._padding_template()
        example = template
      examples.append(example)
    batch = _stack(examples, self._name)
    batch["mask"] = mask
    return batch


def make_train_iterator(source, preprocess_fn, *, global_batch_size, seed, start_step=0,
                        process_index=None, process_count=None, num_threads=DEFAULT_THREADS,
                        prefetch=2):
  """This process's endless iterator of training batches (see the module doc).

  Args:
    source: random-access source (``len``, ``[i]`` -> dict), e.g. from
      ``cdft.data.sources.get_source``.
    preprocess_fn: ``fn(example, rng) -> dict`` of fixed-shape arrays, e.g.
      from ``cdft.data.preprocess.get_preprocess``; None: the examples as
      stored, gathered a batch at a time by ``source.get_batch(indices)`` (the
      in-memory sources; the step does the preprocessing, ``cdft.data.augment``).
    global_batch_size: G, the batch over all processes.
    seed: non-negative integer; fixes the order and the augmentation.
    start_step: the global step of the first batch (resuming).
    process_index: this process (None: ``jax.process_index()``).
    process_count: number of processes (None: ``jax.process_count()``).
    num_threads: decoding threads (0: decode in the calling thread).
    prefetch: batches prepared ahead of the one returned.

  Returns:
    A ``TrainIterator`` yielding dicts of numpy arrays with leading dimension
    G / P; attributes ``skipped``, ``num_examples``, ``steps_per_epoch``.

  Raises:
    CdftError: empty source, bad sizes, G not divisible by P.
  """
  return TrainIterator(source, preprocess_fn, global_batch_size=global_batch_size, seed=seed,
                       start_step=start_step, process_index=process_index,
                       process_count=process_count, num_threads=num_threads,
                       prefetch=prefetch)


def make_eval_iterator(source, preprocess_fn, *, batch_size, process_index=None,
                       process_count=None, num_threads=DEFAULT_THREADS, prefetch=2):
  """One pass over ``source`` in padded, masked batches (see the module doc).

  Args:
    source: random-access source.
    preprocess_fn: ``fn(example, rng) -> dict`` (an eval op ignores ``rng``).
    batch_size: the global batch size (over all processes).
    process_index: this process (None: ``jax.process_index()``).
    process_count: number of processes (None: ``jax.process_count()``).
    num_threads: decoding threads (0: decode in the calling thread).
    prefetch: batches prepared ahead.

  Returns:
    An ``EvalIterator`` (``len()`` batches) yielding dicts with a float32
    'mask' of shape (batch_size / P,).
  """
  return EvalIterator(source, preprocess_fn, batch_size=batch_size,
                      process_index=process_index, process_count=process_count,
                      num_threads=num_threads, prefetch=prefetch)
