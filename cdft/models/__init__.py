"""Model registry: name -> Flax module constructor.

``get_model(name, stage=k, preset=...)`` builds the stage-k module; the names are
the ones configs and checkpoints refer to. ``get_classifier(name, num_classes)``
builds the CIFAR classifiers of the Factor Transfer experiments.
"""
from cdft.models import resnet, vgg

_REGISTRY = {
    "encoder": vgg.Encoder,
    "decoder": vgg.Decoder,
    "embedding": vgg.Embedding,
}

_CLASSIFIERS = {
    "resnet20": resnet.resnet20,
    "resnet32": resnet.resnet32,
    "resnet56": resnet.resnet56,
    "resnet110": resnet.resnet110,
    "wrn_16_2": resnet.wrn_16_2,
    "wrn_40_1": resnet.wrn_40_1,
    "wrn_40_2": resnet.wrn_40_2,
}


def get_model(name, stage, preset="vgg19", **kwargs):
  """Builds registry model ``name`` for ``stage`` with the widths of ``preset``."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; choose from {sorted(_REGISTRY)}")
  return _REGISTRY[name](stage=stage, widths=vgg.stage_widths(preset, stage), **kwargs)


def get_classifier(name, num_classes, **kwargs):
  """Builds CIFAR classifier ``name`` (``resnet20`` ... ``wrn_40_2``) with ``num_classes`` outputs.

  The module's ``__call__(x, train)`` returns ``(logits, feats)``; see
  :mod:`cdft.models.resnet`.
  """
  if name not in _CLASSIFIERS:
    raise ValueError(f"unknown classifier {name!r}; choose from {sorted(_CLASSIFIERS)}")
  return _CLASSIFIERS[name](num_classes=num_classes, **kwargs)
