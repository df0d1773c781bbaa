"""Training tasks of the one trainer (:mod:`cdft.train`), by ``config.task`` name.

A task says *what* is trained; the trainer says *how* (sharding, optimizer,
checkpoints, logging). A task object has:

- ``frozen``: a pytree of fixed weights (teachers), passed to the step as an
  argument (never baked into the compiled program, never checkpointed: they are
  reloaded from their source on resume).
- ``init(rng, batch) -> {'params': ..., 'model_state': ...}``: trainable
  parameters and mutable non-trainable state (e.g. BatchNorm statistics; ``{}``
  when there is none). ``batch`` is a host numpy batch (shapes only matter).
- ``loss(params, model_state, frozen, batch, rng) -> (loss, (metrics, model_state))``:
  the training objective on a global batch, pure and jittable; ``metrics`` a
  flat dict of scalars.
- optionally ``evaluate(params, model_state, frozen, batch) -> dict of sums``
  (with a ``count`` entry) for held-out evaluation, and ``eval_input`` (an input
  config) naming the split to evaluate on.
"""
import importlib

from cdft.errors import CdftError

# name -> "module:callable" (a task class, or a function building one); modules
# are imported on use.
_REGISTRY = {
    "cd_decoder": "cdft.tasks.style:DecoderTask",
    "cd_student": "cdft.tasks.style:StudentEncoderTask",
    "cd_small_decoder": "cdft.tasks.style:SmallDecoderTask",
    "cd_paraphraser": "cdft.tasks.style:paraphraser_task",
    "adain_decoder": "cdft.tasks.adain:DecoderTask",
    "adain_student": "cdft.tasks.adain:StudentTask",
    "adain_small_decoder": "cdft.tasks.adain:SmallDecoderTask",
    "classifier": "cdft.tasks.classification:ClassifierTask",
    "ft_paraphraser": "cdft.tasks.classification:paraphraser_task",
    "ft_student": "cdft.tasks.classification:StudentTask",
}


def register(name, target):
  """Adds ``name -> 'module:callable'`` to the registry."""
  _REGISTRY[name] = target


def get_task(config):
  """Builds the task ``config.task`` from the config."""
  name = config.task
  if name not in _REGISTRY:
    raise CdftError(f"config.task: unknown task {name!r}; choose from {sorted(_REGISTRY)}")
  module, cls = _REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), cls)(config)
