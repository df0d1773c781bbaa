"""Weights: reading and writing the official formats, the model zoo, and :func:`resolve`.

:func:`resolve` (in :mod:`cdft.weights.resolver`) turns every way a network's
weights are named (zoo entry, file of each format, training workdir,
``'random'``, ``'pruned'``) into parameters; tasks and ``launch/evaluate.py``
use it. It is imported on first use, so reading one file format does not load
the model families.
"""


def resolve(spec, kind, **kwargs):
  """The weights named ``spec`` for a network of ``kind``: :func:`cdft.weights.resolver.resolve`."""
  from cdft.weights import resolver  # pylint: disable=import-outside-toplevel
  return resolver.resolve(spec, kind, **kwargs)


def classifier_module(name, num_classes, widths=()):
  """A CIFAR classifier: :func:`cdft.weights.resolver.classifier_module`."""
  from cdft.weights import resolver  # pylint: disable=import-outside-toplevel
  return resolver.classifier_module(name, num_classes, widths)
