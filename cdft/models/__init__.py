"""Model registry: name -> Flax module constructor.

``get_model(name, stage=k, preset=...)`` builds the stage-k module; the names are
the ones configs and checkpoints refer to. ``get_classifier(name, num_classes)``
builds the CIFAR classifiers of the Factor Transfer experiments.

The modules (and Flax) are imported on first use: :mod:`cdft.models.family`,
the family's data, is importable alone (a warm ``cdft-stylize`` needs no more).
"""
import importlib
import pkgutil

_REGISTRY = {"encoder": "Encoder", "decoder": "Decoder", "embedding": "Embedding"}  # in vgg
_CLASSIFIERS = ("resnet20", "resnet32", "resnet56", "resnet110", "wrn_16_2", "wrn_40_1",
                "wrn_40_2")  # functions of cdft.models.resnet


def __getattr__(name):  # ``models.vgg`` etc. after ``from cdft import models``
  if name in {m.name for m in pkgutil.iter_modules(__path__)}:
    return importlib.import_module(f"cdft.models.{name}")
  raise AttributeError(f"module 'cdft.models' has no attribute {name!r}")


def get_model(name, stage, preset="vgg19", **kwargs):
  """Builds registry model ``name`` for ``stage`` with the widths of ``preset``."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; choose from {sorted(_REGISTRY)}")
  from cdft.models import vgg  # pylint: disable=import-outside-toplevel
  module = getattr(vgg, _REGISTRY[name])
  return module(stage=stage, widths=vgg.stage_widths(preset, stage), **kwargs)


def get_classifier(name, num_classes, **kwargs):
  """Builds CIFAR classifier ``name`` (``resnet20`` ... ``wrn_40_2``) with ``num_classes`` outputs.

  The module's ``__call__(x, train)`` returns ``(logits, feats)``; see
  :mod:`cdft.models.resnet`.
  """
  if name not in _CLASSIFIERS:
    raise ValueError(f"unknown classifier {name!r}; choose from {sorted(_CLASSIFIERS)}")
  from cdft.models import resnet  # pylint: disable=import-outside-toplevel
  return getattr(resnet, name)(num_classes=num_classes, **kwargs)


def init(module, key, *inputs):
  """``module.init(key, *inputs)``, as one XLA program compiled at optimisation level 2.

  Run eagerly, a Flax ``init`` compiles every operation on its own: ~65 small
  programs for a narrow ResNet-20, 11-15 s on 2 CPU cores. As one program at
  XLA's default level (3) it is LLVM's optimisation of the unrolled random-number
  code that costs: 8.4 s; at level 2, 2.3 s. The values are the eager ones bit
  for bit (level 0 would be cheaper still but rounds some of them differently;
  ``tests/test_models.py``).
  """
  import jax  # pylint: disable=import-outside-toplevel
  return jax.jit(module.init, compiler_options={"xla_backend_optimization_level": 2})(
      key, *inputs)


# ``config.compute_dtype`` values: the dtype the networks compute in. Parameters,
# optimizer state, BatchNorm statistics, the losses' reductions and the WCT/FT
# statistics stay float32 whatever it is.
COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(config):
  """``config.compute_dtype`` as a jnp dtype, or None for float32 (the modules' default).

  Raises:
    CdftError: a name not in :data:`COMPUTE_DTYPES`.
  """
  from cdft.errors import CdftError  # pylint: disable=import-outside-toplevel
  name = config.get("compute_dtype", "float32") or "float32"
  if name not in COMPUTE_DTYPES:
    raise CdftError(f"config.compute_dtype: {name!r} is not one of {', '.join(COMPUTE_DTYPES)}")
  if name == "float32":
    return None
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return jnp.dtype(name)
