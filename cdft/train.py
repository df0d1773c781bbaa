"""The one training loop of cdft.

``run(config, workdir)`` trains ``config.task`` (see :mod:`cdft.tasks`) with
data parallelism over a device mesh: a ``jax.jit`` step whose state is
replicated and whose batch is sharded along ``'data'`` (``NamedSharding``); on
several hosts every process feeds its own part of each global batch. The
per-step randomness is ``fold_in(key, step)``, and the data order depends only
on (seed, step), so a restarted run continues exactly where it stopped.

Around the step: orbax checkpoints (resume, keep policy, config beside each),
``config.json`` in the workdir, metrics as JSONL on process 0 with console
progress and throughput, a NaN/Inf guard that stops before a bad state is ever
saved, and SIGTERM/SIGINT handling that saves and exits cleanly.
"""
import itertools
import os
import signal
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cdft import cachedir
from cdft import tasks
from cdft.errors import CdftError
from cdft.kernels import conv as kernel_conv
from cdft.training import checkpointing
from cdft.training import metrics as metrics_lib
from cdft.training import optim
from cdft.training import sharding


def enable_compile_cache(cache_dir=None):
  """Turns JAX's persistent compilation cache on for this training process.

  A training process compiles its train and eval steps and, initialising random
  networks eagerly, dozens of small programs (a random ResNet-56 alone: 65
  compiles, ~10 s on 2 cores). Kept in ``<cdft cache>/xla-train``, they load in
  the next process of the run (a resume after a kill, a rerun, another seed):
  ``launch/train.py`` of ``ft_teacher.py:runlocal`` for 5 steps took 34.4 s as a
  first process and 11.1 s as the second on a 2-core CPU. A cache folder
  configured already (``JAX_COMPILATION_CACHE_DIR``, ``jax.config``) is kept;
  ``CDFT_NO_COMPILE_CACHE=1`` turns it off.

  Args:
    cache_dir: the cdft cache (default ``$CDFT_CACHE_DIR`` or ~/.cache/cdft).

  Returns:
    The cache folder, or None when off.
  """
  if os.environ.get("CDFT_NO_COMPILE_CACHE"):
    return None
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  folder = str(cachedir.resolve(cache_dir) / "xla-train")
  jax.config.update("jax_compilation_cache_dir", folder)
  # The eager initialisers' programs compile in ~0.1-0.2 s each, under JAX's 1 s default.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return folder


class _StopFlag:
  """Set by SIGTERM/SIGINT (preemption, Ctrl-C); the loop saves and exits."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def should_stop(self, step, every):
    """Whether to stop after ``step``.

    One process: as soon as it is signalled. Several: all agree, checked every
    ``every`` steps with a collective, so they save the same step together.
    """
    mine = self.signal is not None
    if jax.process_count() == 1:
      return mine
    if step % every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return bool(np.any(multihost_utils.process_allgather(np.array(mine))))


def make_input(input_cfg, *, global_batch_size, seed, start_step, train=True):
  """This process's data iterator for ``config.input`` (see :mod:`cdft.data`)."""
  # pylint: disable-next=import-outside-toplevel
  from cdft.data import augment, pipeline, preprocess, sources
  source = sources.get_source(input_cfg.dataset, input_cfg.split,
                              data_dir=input_cfg.data_dir or None,
                              manual_dir=input_cfg.manual_dir or None)
  in_memory = hasattr(source, "get_batch")  # CIFAR, the digits: one uint8 array
  if input_cfg.get("on_device", False):  # The task preprocesses (or scales) in its step.
    augment.device_op(input_cfg)  # A bad op or argument fails here, before any batch.
    fn = augment.host_fn(input_cfg, in_memory=train and in_memory)
  else:
    fn = preprocess.get_preprocess(input_cfg.preprocess, **input_cfg.pp.to_dict())
  # Worker processes decode files; a source held in memory (CIFAR, the digits) would be
  # pickled into each of them, and its per-example work is small: threads.
  workers = int(input_cfg.get("num_workers", -1))
  workers = pipeline.default_workers() if workers < 0 else workers
  workers = 0 if in_memory else workers
  if train:
    return pipeline.make_train_iterator(
        source, fn, global_batch_size=global_batch_size, seed=seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_workers=workers)
  return pipeline.make_eval_iterator(
      source, fn, batch_size=global_batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), num_workers=workers)


class _WithStyles:
  """The content batches with a style batch beside each (``batch['style']``).

  Both iterators are deterministic in the step (so a resumed run sees the same
  pairs); epochs and example counts are the content's, the style folder simply
  cycles at its own length.
  """

  def __init__(self, content, styles):
    self.content, self.styles = content, styles
    self.steps_per_epoch = content.steps_per_epoch
    self.num_examples = content.num_examples

  @property
  def skipped(self):
    return self.content.skipped + self.styles.skipped

  def state(self):
    return {"content": self.content.state(), "style": self.styles.state()}

  def close(self):
    self.content.close()
    self.styles.close()

  def __iter__(self):
    return self

  def __next__(self):
    return dict(next(self.content), style=next(self.styles)["image"])


def total_steps(config, steps_per_epoch):
  """``config.total_steps`` if positive, else ``config.num_epochs`` epochs."""
  if config.total_steps > 0:
    return int(config.total_steps)
  if config.num_epochs <= 0:
    raise CdftError("set config.total_steps or config.num_epochs to a positive value")
  return int(round(config.num_epochs * steps_per_epoch))


def step_compiler_options(task, mesh):
  """XLA compile options of ``task``'s train step on ``mesh``'s backend (None: XLA's defaults).

  Tasks name CPU options measured to speed their step up
  (``task.cpu_compiler_options``, e.g. the VGG family's); GPU and TPU keep
  XLA's defaults.
  """
  if mesh.devices.flat[0].platform != "cpu":
    return None
  return dict(getattr(task, "cpu_compiler_options", None) or {}) or None


def make_train_step(task, tx, schedule, seed):
  def train_step(state, frozen, batch):
    step = state["step"]
    # Built inside the program, so every host has it without a transfer.
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), step)

    def loss_fn(params):
      return task.loss(params, state["model_state"], frozen, batch, rng)

    (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(step),
                   # For the NaN guard before a save, not logged: an update can overflow
                   # a finite gradient. In the step, it costs no program of its own.
                   params_finite=_all_finite(params))
    new_state = {"step": step + 1, "params": params, "opt_state": opt_state,
                 "model_state": model_state}
    return new_state, metrics
  return train_step


def _evaluate(task, eval_fn, state, frozen, config, mesh):
  """Sums of ``task.evaluate`` over one pass of the eval split, divided by the count."""
  it = make_input(task.eval_input, global_batch_size=config.eval_batch_size or config.batch_size,
                  seed=config.seed, start_step=0, train=False)
  totals = None
  for local in it:
    out = eval_fn(state["params"], state["model_state"], frozen,
                  sharding.global_batch(local, mesh))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  return {f"eval/{k}": float(v) / max(count, 1.0) for k, v in totals.items()}


def run(config, workdir, stream=None):
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint).

  Args:
    config: an ``ml_collections.ConfigDict`` (see ``configs/``).
    workdir: the run's directory: ``config.json``, ``metrics.jsonl``, ``checkpoints/``.
    stream: where progress goes (default stdout).

  Returns:
    dict with ``step`` (the last step done), ``params`` and ``model_state``
    (host numpy) and ``metrics`` (the last logged ones), ``preempted`` (bool).

  Raises:
    metrics.DivergenceError: a non-finite loss or gradient (nothing is saved).
    CdftError: bad configuration or input.
  """
  workdir = checkpointing.workdir_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config_dict = config.to_dict()
  checkpointing.write_config(workdir, config_dict)

  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  repl = sharding.replicated(mesh)
  task = tasks.get_task(config)

  start_step = checkpointing.latest_step(workdir) or 0
  data = make_input(config.input, global_batch_size=config.batch_size, seed=config.seed,
                    start_step=start_step)
  if config.get("style_input"):  # AdaIN: a batch of style images beside each content batch
    data = _WithStyles(data, make_input(config.style_input, global_batch_size=config.batch_size,
                                        seed=config.seed + 1, start_step=start_step))
  data_state = data.state()  # Saved with each checkpoint, moved on to its step.
  saved_data = checkpointing.restore_data_state(workdir, start_step) if start_step else None
  steps_per_epoch = max(data.steps_per_epoch, 1)
  checkpoint_every = interval_steps(config, "checkpoint_every", steps_per_epoch)
  eval_every = interval_steps(config, "eval_every", steps_per_epoch)
  manager = checkpointing.make_manager(workdir, checkpoint_every, config.keep_checkpoints,
                                       config.keep_every)
  n_steps = total_steps(config, steps_per_epoch)
  schedule = optim.make_schedule(config.schedule, config.optimizer.learning_rate,
                                 steps_per_epoch, n_steps)
  tx = optim.make_optimizer(config.optimizer, schedule)

  first = next(data)
  # Host values, identical on every process, placed straight into the global sharding.
  init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
  host_state = jax.device_get(task.init(init_key, first))
  params = jax.device_put(host_state["params"], repl)
  if hasattr(task, "trainable"):  # parameters the task keeps fixed get zero updates
    labels = task.trainable(host_state["params"])
    if "frozen" in jax.tree.leaves(labels):
      tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  state = {
      "step": jax.device_put(np.zeros((), np.int32), repl),
      "params": params,
      "opt_state": jax.jit(tx.init, out_shardings=repl)(params),
      "model_state": jax.device_put(host_state["model_state"], repl),
  }
  if start_step:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    state, start_step = checkpointing.restore_latest(manager, abstract)
  frozen = jax.device_put(jax.device_get(task.frozen), repl)

  state_sh = jax.tree.map(lambda x: x.sharding, state)
  train_step = jax.jit(make_train_step(task, tx, schedule, config.seed),
                       in_shardings=(state_sh, repl, sharding.batch_sharding(mesh)),
                       out_shardings=(state_sh, repl), donate_argnums=(0,),
                       compiler_options=step_compiler_options(task, mesh))
  eval_fn = None
  if getattr(task, "evaluate", None) and eval_every:
    eval_fn = jax.jit(task.evaluate)

  writer = metrics_lib.MetricWriter(workdir, n_steps, config.batch_size, stream)
  writer.info(f"{config.task}: steps {start_step}->{n_steps} ({steps_per_epoch} per epoch, "
              f"{data.num_examples} examples), batch {config.batch_size} over "
              f"{sharding.data_size(mesh)} devices / {jax.process_count()} processes, "
              f"workdir {workdir}")
  if saved_data is not None and saved_data != data_state:
    writer.info(f"warning: the input differs from the one checkpoint {start_step} was saved "
                f"with (saved {saved_data}, now {data_state}): the run goes on from step "
                f"{start_step}, but not on the batches the uninterrupted run would have seen")
  last_good = start_step
  logged = {}
  pending = None
  preempted = False
  step = start_step
  # The batches of steps start_step, start_step + 1, ...: a batch is a function of its step,
  # so the input's state at `step` is that of a fresh iterator started there.
  feed = sharding.prefetch_to_mesh(itertools.chain([first], data), mesh,
                                   config.get("device_prefetch", 2))
  try:
    with _StopFlag() as stop, kernel_conv.cpu_convolutions(config.get("cpu_conv", "xla"),
                                                          mesh, stream) as onednn:
      if onednn:
        writer.info("convolutions: oneDNN (config.cpu_conv; cdft.kernels)")
      while step < n_steps:
        state, metrics = train_step(state, frozen, next(feed))
        step += 1
        if pending is not None:  # fetched one step late: the device stays busy
          logged = _logged(pending[1], data)
          metrics_lib.check_finite(logged, pending[0], last_good)
          writer.write(pending[0], logged)
          pending = None
        if step == start_step + 1:
          writer.start_timer(step)  # throughput excludes compilation
        if step % config.log_every == 0 or step == n_steps:
          pending = (step, metrics)
        stopping = stop.should_stop(step, config.log_every)
        if eval_fn is not None and (step % eval_every == 0 or step == n_steps):
          writer.write(step, _evaluate(task, eval_fn, state, frozen, config, mesh), timing=False)
        must_save = step == n_steps or stopping  # the end, or a signal: saved whatever the interval
        if step % checkpoint_every == 0 or must_save:
          # Nothing non-finite is saved: the step's loss and gradient norm, and
          # the parameters it produced (an update can overflow a finite gradient).
          now = jax.device_get({k: metrics[k] for k in ("loss", "grad_norm", "params_finite")})
          metrics_lib.check_finite(now, step, last_good,
                                   params_finite=bool(now.pop("params_finite")))
          # Interval saves are the manager's decision (its FixedIntervalPolicy);
          # only the last and the preemption save are forced.
          if checkpointing.save(manager, step, state, config_dict,
                                data_state=_advance(data_state, step - start_step),
                                force=must_save):
            last_good = step
          writer.start_timer(step)  # throughput excludes checkpointing
        if stopping:
          preempted = True
          writer.info(f"signal received: saved step {step} in {workdir}; exiting (rerun the "
                      "same command to resume)")
          break
    if pending is not None:
      logged = _logged(pending[1], data)
      metrics_lib.check_finite(logged, pending[0], last_good)
      writer.write(pending[0], logged)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
    close = getattr(data, "close", None)
    if close is not None:
      close()
  return {"step": step, "params": jax.device_get(state["params"]),
          "model_state": jax.device_get(state["model_state"]), "metrics": logged,
          "preempted": preempted}


def _logged(metrics, data):
  """A step's metrics as logged: on the host, the input's skip count added, the guard's
  ``params_finite`` left out."""
  logged = jax.device_get(metrics)
  del logged["params_finite"]
  return dict(logged, data_skipped=data.skipped)


def _advance(data_state, steps):
  """An input state ``steps`` batches later (its "step" fields moved on)."""
  if "step" in data_state:
    return dict(data_state, step=data_state["step"] + steps)
  return {key: _advance(value, steps) for key, value in data_state.items()}


def interval_steps(config, name, steps_per_epoch):
  """The steps between two checkpoints or evaluations: ``config.<name>_epochs`` epochs
  (rounded, at least 1) when it is set, else ``config.<name>`` steps (0: never)."""
  epochs = float(config.get(f"{name}_epochs", 0.0) or 0.0)
  if epochs < 0:
    raise CdftError(f"config.{name}_epochs must be >= 0, got {epochs}")
  if epochs:
    return max(1, round(epochs * steps_per_epoch))
  return int(config.get(name, 0) or 0)


def _all_finite(tree):
  """Whether every floating leaf of ``tree`` is finite (one boolean, on the device)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def load_config_json(workdir):
  """The ``config.json`` of a run as a ConfigDict."""
  import json  # pylint: disable=import-outside-toplevel
  path = checkpointing.workdir_path(workdir) / "config.json"
  return ml_collections.ConfigDict(json.loads(path.read_text()))

