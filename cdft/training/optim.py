"""Optimizers and learning-rate schedules from the config (optax).

``config.optimizer``: ``name`` ('adam' | 'sgd'), ``learning_rate``, Adam's
``b1``/``b2``/``eps``, SGD's ``momentum``/``nesterov``, and ``weight_decay``
(coupled L2 as PyTorch's ``weight_decay``: ``wd * param`` is added to the
gradient before the optimizer, on all parameters).
``config.schedule``: ``name`` 'constant' or 'piecewise' (``boundaries`` in
epochs, each multiplying the rate by ``decay``), or 'cosine'.
"""
import optax

from cdft.errors import CdftError


def make_schedule(schedule_cfg, base_lr, steps_per_epoch, total_steps):
  """The learning-rate schedule: step -> rate."""
  name = schedule_cfg.name
  if name == "constant":
    return optax.constant_schedule(base_lr)
  if name == "piecewise":
    boundaries = {int(round(b * steps_per_epoch)): schedule_cfg.decay
                  for b in schedule_cfg.boundaries}
    return optax.piecewise_constant_schedule(base_lr, boundaries)
  if name == "cosine":
    return optax.cosine_decay_schedule(base_lr, max(total_steps, 1))
  if name == "inverse_time":  # pytorch-AdaIN: lr / (1 + decay * step), per iteration
    decay = float(schedule_cfg.decay)
    return lambda step: base_lr / (1.0 + decay * step)
  raise CdftError(f"config.schedule.name: unknown schedule {name!r} "
                  "(constant | piecewise | cosine | inverse_time)")


def make_optimizer(opt_cfg, schedule):
  """The optax transformation of ``config.optimizer`` with learning rate ``schedule``."""
  name = opt_cfg.name
  if name == "adam":
    base = optax.adam(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)
  elif name == "sgd":
    base = optax.sgd(schedule, momentum=opt_cfg.momentum or None, nesterov=opt_cfg.nesterov)
  else:
    raise CdftError(f"config.optimizer.name: unknown optimizer {name!r} (adam | sgd)")
  if opt_cfg.weight_decay:
    return optax.chain(optax.add_decayed_weights(opt_cfg.weight_decay), base)
  return base
