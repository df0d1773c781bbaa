"""Checkpoints of a training run (orbax ``CheckpointManager``).

A run's workdir holds ``checkpoints/<step>/`` with three items: ``state`` (the
train state pytree: step, params, optimizer and model state), ``config`` (the
run's config as JSON, so every checkpoint says how it was made) and ``data``
(the input iterator's state as JSON: the step of its next batch and what fixes
the order, ``cdft.data.pipeline.TrainIterator.state``).
Saves are asynchronous; ``close()`` waits for them. A restart restores the
latest checkpoint into the sharding of the freshly built state.
"""
import json
import os

import jax
from etils import epath
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
from orbax.checkpoint.checkpoint_managers import save_decision_policy as sdp

from cdft.errors import CdftError

SUBDIR = "checkpoints"


def workdir_path(workdir):
  """The workdir as an ``epath.Path``: local folders (``~`` expanded, absolute) or
  cloud buckets such as ``gs://...``."""
  text = str(workdir)
  if "://" in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def make_manager(workdir, every_steps, keep_last, keep_every_steps=0, read_only=False):
  """A ``CheckpointManager`` over ``workdir/checkpoints``.

  Args:
    workdir: the run's directory.
    every_steps: save when ``step % every_steps == 0`` (the trainer also saves at
      the end and on preemption).
    keep_last: keep the newest ``keep_last`` checkpoints ...
    keep_every_steps: ... and also every checkpoint at a multiple of this (0: none).
    read_only: open an existing run without writing (to read its parameters).
  """
  policies = [pp.LatestN(max(int(keep_last), 1))]
  if keep_every_steps:
    policies.append(pp.EveryNSteps(int(keep_every_steps)))
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=sdp.FixedIntervalPolicy(max(int(every_steps), 1)),
      preservation_policy=pp.AnyPreservationPolicy(policies),
      read_only=read_only,
      create=not read_only,
      cleanup_tmp_directories=not read_only)
  directory = workdir_path(workdir) / SUBDIR
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "config": ocp.JsonCheckpointHandler(),
                     "data": ocp.JsonCheckpointHandler()})


def latest_step(workdir):
  """The newest finalized checkpoint step of ``workdir``, or None (no checkpoint yet).

  A listing of the folder, with no ``CheckpointManager``: building one runs
  collectives across processes, and before the run's manager exists the processes
  of a multi-host run can find the folder in different states (one has created
  it, the other not yet), then meet in mismatched collectives.
  """
  steps = ocp.utils.checkpoint_steps(workdir_path(workdir) / SUBDIR)
  return max(steps) if steps else None


def save(manager, step, state, config_dict, data_state=None, force=False):
  """Saves ``state``, the config and the input's ``data_state`` at ``step``; returns
  whether it saved."""
  items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config_dict)}
  if data_state is not None:
    items["data"] = ocp.args.JsonSave(data_state)
  return manager.save(int(step), args=ocp.args.Composite(**items), force=force)


def restore_data_state(workdir, step):
  """The input iterator's state saved with checkpoint ``step``, or None (a checkpoint
  from before it was saved). Read as a file: no manager, no collectives."""
  path = workdir_path(workdir) / SUBDIR / str(int(step)) / "data"
  if not path.exists():
    return None
  return ocp.JsonCheckpointHandler().restore(path, ocp.args.JsonRestore())


def restore_latest(manager, abstract_state):
  """Restores the newest checkpoint into ``abstract_state``'s structure and shardings.

  Returns:
    ``(state, step)``, or ``(None, 0)`` when the run has no checkpoint yet.
  """
  step = manager.latest_step()
  if step is None:
    return None, 0
  restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return restored["state"], int(step)


def restore_params(workdir, step=None):
  """The trained parameters of a finished (or running) run, as host numpy arrays.

  Used to chain the paper's steps: a student-encoder run reads the teacher
  decoder of a decoder run, a small-decoder run reads the student encoder.

  Args:
    workdir: the run's workdir (the one given to ``launch/train.py``).
    step: which checkpoint (default: the latest).

  Returns:
    ``(params, config_dict)``.

  Raises:
    CdftError: no such run or no checkpoint in it.
  """
  variables, config = restore_variables(workdir, step)
  return variables["params"], config


def restore_variables(workdir, step=None):
  """Like :func:`restore_params`, with the model state (e.g. BatchNorm statistics).

  Restores onto this process's first device whatever mesh saved the run, so a
  run trained on 8 devices or 2 hosts is read back anywhere.

  Returns:
    ``({'params': ..., 'model_state': ...}, config_dict)`` (host numpy).
  """
  directory = workdir_path(workdir) / SUBDIR
  if not directory.is_dir():
    raise CdftError(f"{workdir}: not a cdft training workdir (no {SUBDIR}/ folder)")
  manager = make_manager(workdir, every_steps=1, keep_last=1, read_only=True)
  try:
    step = manager.latest_step() if step is None else int(step)
    if step is None:
      raise CdftError(f"{workdir}: the run has no checkpoint yet")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = manager.item_metadata(step)["state"]
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                      config=ocp.args.JsonRestore()))
  finally:
    manager.close()
  state = jax.device_get(restored["state"])
  return {"params": state["params"], "model_state": state.get("model_state", {})}, \
      restored["config"]


def write_config(workdir, config_dict):
  """Writes ``config.json`` into the workdir (process 0 only)."""
  if jax.process_index() != 0:
    return
  path = workdir_path(workdir) / "config.json"
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
  tmp.replace(path)
