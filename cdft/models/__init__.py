"""Model registry: name -> Flax module constructor.

``get_model(name, stage=k, preset=...)`` builds the stage-k module; the names are
the ones configs and checkpoints refer to.
"""
from cdft.models import vgg

_REGISTRY = {
    "encoder": vgg.Encoder,
    "decoder": vgg.Decoder,
    "embedding": vgg.Embedding,
}


def get_model(name, stage, preset="vgg19", **kwargs):
  """Builds registry model ``name`` for ``stage`` with the widths of ``preset``."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; choose from {sorted(_REGISTRY)}")
  return _REGISTRY[name](stage=stage, widths=vgg.stage_widths(preset, stage), **kwargs)
