"""L1-norm filter pruning of a VGG-19 encoder/decoder into a small student (CD §3.3).

The 16x students of Collaborative Distillation start from the big network's
largest filters ("Initialisation", ``tools/prune.py`` of the official code):

* every 3x3 conv keeps the ``n_small`` output filters with the largest L1 norm
  ``sum |w|`` over (kh, kw, cin) of the *original* (big) conv;
* its input channels follow the filters kept in the previous conv (in the same
  order);
* a conv whose width does not shrink is copied whole, in its original order
  (``conv0``, and the decoder's last conv, which outputs RGB);
* the embedding (aux) heads are not pruned from anything: they are fresh random
  initialisations, PyTorch's default conv init (see :func:`init_embedding`).

**Order of the kept filters.** The official tool takes the tail of an ascending
``argsort`` of the L1 norms, so the kept filters come in *ascending L1 order*,
not in their original index order. The released files show it: the 24 conv1_1
filters of ``e1_base.pth`` are sorted by L1 norm, and the 16 of ``e5_base.pth``
are exactly its last 16, in the same order (``tests/test_prune.py`` checks
both). The default ``order='l1'`` reproduces this (ties broken by original
index); ``order='index'`` keeps the same filters in original index order. The
network function does not depend on the order, only the layout of the tree.

**Decoders.** The mirrored decoder is pruned in forward order (deepest conv
first) with the same rule. Its first conv has no previous layer to follow, so
the official tool selects its *input* channels by their own L1 norm over
(out, kh, kw) of that conv (``filter_prune(..., use_channel=True)``, again in
ascending L1 order; ``d1_base.pth``'s conv11 columns are sorted that way). That
choice ignores which relu{k}_1 channels the pruned encoder kept; pass
``input_keep`` (e.g. from :func:`kept_filters` of the encoder) to follow the
encoder's filters instead. The last conv (conv11, -> 3 RGB channels) keeps all
its outputs; only its inputs follow the previous layer.

Trees are cdft's Flax parameter trees (HWIO kernels, numpy or jax arrays), with
or without the ``{'params': ...}`` wrapper; the output has the same wrapping
and exactly the structure and shapes of ``vgg.Encoder`` / ``vgg.Decoder`` at
the target widths (``models.get_model(..., stage, '16x')`` by default).
"""
import jax
import jax.numpy as jnp
import numpy as np

from cdft import models
from cdft.errors import WeightError
from cdft.models import vgg
from cdft.weights import convert

__all__ = ["ORDERS", "l1_keep", "kept_filters", "prune_encoder", "prune_decoder",
           "init_embedding", "prune_student"]

ORDERS = ("l1", "index")


def l1_keep(kernel, n, axis="out", order="l1"):
  """Indices of the ``n`` output filters (or input channels) with the largest L1 norm.

  Args:
    kernel: (kh, kw, cin, cout) HWIO conv kernel.
    n: how many to keep (at most the number available).
    axis: ``'out'`` ranks output filters by ``sum |w|`` over (kh, kw, cin);
      ``'in'`` ranks input channels by ``sum |w|`` over (kh, kw, cout).
    order: ``'l1'`` returns them in ascending L1 norm (the official tool's
      order; ties by index); ``'index'`` in increasing index.

  Returns:
    int64 array of ``n`` indices. When ``n`` equals the number available the
    identity ``0..n-1`` is returned (a layer that is not pruned is not
    reordered, as in the official tool).

  Raises:
    WeightError: ``n`` is larger than the number available or not positive.
    ValueError: bad ``axis`` or ``order``.
  """
  if axis not in ("out", "in"):
    raise ValueError(f"axis must be 'out' or 'in', got {axis!r}")
  if order not in ORDERS:
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
  kernel = np.asarray(kernel)
  if kernel.ndim != 4:
    raise WeightError(f"expected an HWIO conv kernel, got shape {kernel.shape}")
  reduce = (0, 1, 2) if axis == "out" else (0, 1, 3)
  norms = np.abs(kernel.astype(np.float64)).sum(axis=reduce)
  total = norms.shape[0]
  if not 0 < n <= total:
    what = "filters" if axis == "out" else "input channels"
    raise WeightError(f"cannot keep {n} of {total} {what}")
  if n == total:
    return np.arange(n, dtype=np.int64)
  keep = np.argsort(norms, kind="stable")[total - n:]
  if order == "index":
    keep = np.sort(keep)
  return keep.astype(np.int64)


def _unwrap(tree, what):
  if not isinstance(tree, dict):
    raise WeightError(f"{what}: expected a parameter dict, got {type(tree).__name__}")
  if "params" in tree and isinstance(tree["params"], dict):
    return tree["params"], True
  return tree, False


def _target(module, probe):
  return convert.abstract_params(module, probe)


def _prune(big, target, names, what, order, input_keep=None):
  """Prunes the convs ``names`` (forward order) of ``big`` to ``target``'s shapes.

  Returns:
    ``(params, kept)``: the small numpy tree and ``{name: kept output indices}``.
  """
  params, kept = {}, {}
  prev, prev_width = None, None
  for name in names:
    if name not in big or not isinstance(big[name], dict):
      raise WeightError(f"{what}: layer {name!r} is missing (have {', '.join(sorted(big))})")
    layer = big[name]
    if "kernel" not in layer or "bias" not in layer:
      raise WeightError(f"{what}: layer {name!r} needs 'kernel' and 'bias'")
    kernel = np.asarray(layer["kernel"], np.float32)
    bias = np.asarray(layer["bias"], np.float32)
    want = tuple(target[name]["kernel"].shape)
    if kernel.ndim != 4 or kernel.shape[:2] != want[:2] or bias.shape != kernel.shape[-1:]:
      raise WeightError(f"{what}: layer {name!r} has kernel {kernel.shape} and bias "
                        f"{bias.shape}, expected a ({want[0]}, {want[1]}, cin, cout) kernel")
    cin, cout = kernel.shape[2:]
    try:
      out_keep = l1_keep(kernel, want[3], "out", order)
      if prev is not None:
        in_keep = prev
        if cin != prev_width:
          raise WeightError(f"has {cin} input channels, the previous layer has "
                            f"{prev_width} outputs")
      elif input_keep is not None:
        in_keep = np.asarray(input_keep, np.int64).reshape(-1)
        if in_keep.size != want[2] or len(set(in_keep.tolist())) != in_keep.size or (
            in_keep.size and (in_keep.min() < 0 or in_keep.max() >= cin)):
          raise WeightError(f"input_keep must be {want[2]} distinct indices in 0..{cin - 1}")
      else:
        in_keep = l1_keep(kernel, want[2], "in", order)
    except WeightError as e:
      raise WeightError(f"{what}: layer {name!r}: {e}") from None
    params[name] = {"kernel": np.ascontiguousarray(kernel[:, :, in_keep][..., out_keep]),
                    "bias": bias[out_keep].copy()}
    kept[name] = out_keep
    prev, prev_width = out_keep, cout
  return params, kept


def _encoder_names(stage):
  return ["conv0"] + vgg.encoder_layer_names(stage)


def _widths(stage, widths):
  vgg._check_stage(stage)  # pylint: disable=protected-access
  if widths is None:
    return vgg.stage_widths("16x", stage)
  widths = tuple(int(w) for w in widths)
  if len(widths) < stage or any(w <= 0 for w in widths[:stage]):
    raise ValueError(f"widths must give {stage} positive block widths, got {widths}")
  return widths + (1,) * (5 - len(widths))


def _encoder_target(stage, widths):
  probe = jnp.zeros((1, 2 ** stage, 2 ** stage, 3), jnp.float32)
  return _target(vgg.Encoder(stage=stage, widths=widths), probe)


def _decoder_target(stage, widths):
  probe = jnp.zeros((1, 2, 2, widths[stage - 1]), jnp.float32)
  return _target(vgg.Decoder(stage=stage, widths=widths), probe)


def kept_filters(vgg_params, stage, widths=None, order="l1"):
  """Which filters :func:`prune_encoder` keeps: ``{conv name: original indices}``.

  ``kept_filters(...)[f'conv{stage}1']`` are the relu{stage}_1 channels of the
  big encoder the student keeps (e.g. ``input_keep`` of :func:`prune_decoder`).
  """
  widths = _widths(stage, widths)
  big, _ = _unwrap(vgg_params, "encoder")
  return _prune(big, _encoder_target(stage, widths), _encoder_names(stage),
                "encoder", order)[1]


def prune_encoder(vgg_params, stage, widths=None, order="l1"):
  """The L1-pruned stage-``stage`` small encoder of a big (VGG-19) encoder.

  Args:
    vgg_params: the big encoder's tree (``conv0``, ``conv11``, ... at least up
      to ``conv{stage}1``; deeper layers are ignored), e.g. a stage-5 VGG-19
      encoder; with or without the ``{'params': ...}`` wrapper.
    stage: 1..5.
    widths: the small network's block widths; default the 16x preset of that
      stage (``vgg.stage_widths('16x', stage)``: 24 at conv1_1 for stage 1).
    order: ``'l1'`` (the official order, ascending L1 norm) or ``'index'``.

  Returns:
    The small encoder's tree (numpy float32, same wrapping as the input), with
    the structure and shapes of ``vgg.Encoder(stage, widths)``; ``conv0`` is
    copied whole.

  Raises:
    WeightError: a layer is missing, misshapen, or narrower than its target.
  """
  widths = _widths(stage, widths)
  big, wrapped = _unwrap(vgg_params, "encoder")
  params, _ = _prune(big, _encoder_target(stage, widths), _encoder_names(stage),
                     "encoder", order)
  return {"params": params} if wrapped else params


def prune_decoder(vgg_params, stage, widths=None, order="l1", input_keep=None):
  """The L1-pruned stage-``stage`` small decoder of a big (mirrored VGG-19) decoder.

  Args:
    vgg_params: the big stage-``stage`` decoder's tree (``conv{stage}1``, ...,
      ``conv11``), with or without the ``{'params': ...}`` wrapper.
    stage: 1..5.
    widths: the small network's block widths; default the 16x preset.
    order: ``'l1'`` (official, ascending L1 norm) or ``'index'``.
    input_keep: optional indices of the big decoder's input channels to keep
      (e.g. the relu{stage}_1 filters the pruned encoder kept, from
      :func:`kept_filters`); default the official rule, the first conv's
      input channels with the largest L1 norm.

  Returns:
    The small decoder's tree (numpy float32, same wrapping as the input), with
    the structure and shapes of ``vgg.Decoder(stage, widths)``.

  Raises:
    WeightError: a layer is missing, misshapen, or narrower than its target,
      or bad ``input_keep``.
  """
  widths = _widths(stage, widths)
  big, wrapped = _unwrap(vgg_params, "decoder")
  params, _ = _prune(big, _decoder_target(stage, widths), vgg.decoder_layer_names(stage),
                     "decoder", order, input_keep)
  return {"params": params} if wrapped else params


def init_embedding(key, stage, widths=None, teacher_widths=vgg.VGG19_WIDTHS):
  """Fresh embedding (aux) heads ``conv11_aux`` ... ``conv{stage}1_aux`` of a student.

  The Flax module's own initialisation, which is PyTorch's default ``Conv2d``
  init (:mod:`cdft.models.initializers`): kernel and bias uniform in
  ``+-1/sqrt(fan_in)``, ``fan_in = cin`` for these 1x1 convs -- what the
  official ``e*_base.pth`` files hold (the tool leaves the aux layers at their
  default init).

  Args:
    key: a ``jax.random`` key.
    stage: 1..5.
    widths: the student's block widths (default the 16x preset).
    teacher_widths: the teacher's widths (the heads' outputs).

  Returns:
    ``{'params': {...}}`` (numpy float32) for ``vgg.Embedding(stage, widths,
    teacher_widths)``.
  """
  widths = _widths(stage, widths)
  module = vgg.Embedding(stage=stage, widths=widths, teacher_widths=tuple(teacher_widths))
  feats = tuple(jnp.zeros((1, 1, 1, widths[i]), jnp.float32) for i in range(stage))
  return jax.tree.map(np.asarray, {"params": models.init(module, key, feats)["params"]})


def prune_student(key, stage, encoder_params, decoder_params=None, preset="16x", order="l1"):
  """The pruned initialisation of a stage-``stage`` student, as ``load_cd16x_base`` returns it.

  Args:
    key: ``jax.random`` key of the embedding heads.
    stage: 1..5.
    encoder_params: the big encoder's tree (e.g. a normalized VGG-19).
    decoder_params: the big stage-``stage`` decoder's tree, or None.
    preset: the student's width preset (``models.get_model`` presets).
    order: see :func:`prune_encoder`.

  Returns:
    ``{'encoder', 'embedding'[, 'decoder']}``, each ``{'params': ...}`` (numpy).
  """
  widths = tuple(models.get_model("encoder", stage, preset).widths)
  wrap = lambda t: t if "params" in t else {"params": t}  # noqa: E731
  out = {
      "encoder": wrap(prune_encoder(encoder_params, stage, widths, order)),
      "embedding": init_embedding(key, stage, widths),
  }
  if decoder_params is not None:
    out["decoder"] = wrap(prune_decoder(decoder_params, stage, widths, order))
  return out
