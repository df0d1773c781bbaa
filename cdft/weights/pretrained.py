"""Loading pretrained models: the released CD 16x students, their pruned initialisations,
the original WCT VGG-19 (Torch7) models and AdaIN pairs, as Flax parameter trees.

Converted trees are cached as ``.npz`` files (no pickle) next to the zoo cache,
keyed by the source file's SHA-256, so a second load does not parse the PyTorch
pickle again. Loading from that cache imports neither Flax nor the modules: the
levels' networks are :class:`~cdft.models.family.ModuleSpec`, built only if a
program has to be traced.
"""
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from cdft.errors import WeightError
from cdft.io import files
from cdft.models import family
from cdft.weights import convert, zoo

# Bump when the conversion changes, so stale converted caches are not reused.
CONVERSION_VERSION = 2  # 2: .npz files (1: Flax msgpack)
# Spatial size of the dummy input used to derive parameter shapes.
_PROBE = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)  # abstract: no device op at import


def _flatten(tree, prefix=""):
  """{'a': {'b': x}} -> {'a/b': x} (keys must not contain '/')."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = np.asarray(value)
  return flat


def _unflatten(flat):
  tree = {}
  for key, value in flat.items():
    *path, leaf = key.split("/")
    node = tree
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _cached(source, tag, build, cache_dir=None):
  """Returns ``build()``'s tree, cached under the converted-weights dir by the source hash."""
  if os.environ.get("CDFT_NO_CONVERTED_CACHE"):
    return build()
  digest = zoo.file_sha256(source)[:20]
  path = zoo.converted_cache_dir(cache_dir) / f"{tag}-v{CONVERSION_VERSION}-{digest}.npz"
  if path.exists():
    try:
      with np.load(path, allow_pickle=False) as data:
        return _unflatten({k: data[k] for k in data.files})
    except Exception:  # a damaged cache entry is rebuilt, never trusted
      path.unlink(missing_ok=True)
  tree = build()
  try:
    with files.atomic_open(path) as f:
      np.savez(f, **_flatten(tree))
  except OSError:
    pass  # read-only cache: conversion still works, just not cached
  return tree


def _student_abstract(stage):
  from cdft import models  # pylint: disable=import-outside-toplevel
  enc = models.get_model("encoder", stage, "16x")
  enc_abs = convert.abstract_params(enc, _PROBE)
  feats = jax.eval_shape(
      lambda p, x: enc.apply({"params": p}, x, return_all=True), enc_abs, _PROBE)
  emb_abs = convert.abstract_params(models.get_model("embedding", stage, "16x"), feats)
  dec = models.get_model("decoder", stage, "16x")
  dec_abs = convert.abstract_params(dec, feats[-1])
  return enc_abs, emb_abs, dec_abs


def convert_student_files(stage, encoder_file, decoder_file):
  """Reads a (SE, SD) pair of CD-format ``.pth`` files into Flax trees.

  Returns:
    dict with ``encoder``, ``embedding`` and ``decoder`` param trees (numpy).
  """
  from cdft.weights import torch_format  # pylint: disable=import-outside-toplevel
  enc_abs, emb_abs, dec_abs = _student_abstract(stage)
  out = {}
  if encoder_file is not None:
    state = torch_format.state_dict(torch_format.load(encoder_file), encoder_file)
    out["encoder"] = convert.from_torch_state(state, enc_abs, encoder_file)
    out["embedding"] = convert.from_torch_state(state, emb_abs, encoder_file)
    convert.check_consumed(state, [out["encoder"], out["embedding"]], encoder_file)
  if decoder_file is not None:
    state = torch_format.state_dict(torch_format.load(decoder_file), decoder_file)
    out["decoder"] = convert.from_torch_state(state, dec_abs, decoder_file)
    convert.check_consumed(state, [out["decoder"]], decoder_file)
  return out


def load_cd16x(stage, weights_dir=None, cache_dir=None):
  """The released 16x student of level ``stage``: encoder, embedding heads, decoder."""
  se = zoo.fetch("cd16x", f"{stage}SE.pth", weights_dir=weights_dir, cache_dir=cache_dir)
  sd = zoo.fetch("cd16x", f"{stage}SD.pth", weights_dir=weights_dir, cache_dir=cache_dir)
  trees = _cached(se, f"cd16x-{stage}SE", lambda: convert_student_files(stage, se, None),
                  cache_dir)
  trees.update(_cached(sd, f"cd16x-{stage}SD", lambda: convert_student_files(stage, None, sd),
                       cache_dir))
  return trees


def load_cd16x_base(stage, weights_dir=None, cache_dir=None):
  """The L1-pruned initialisation of the level-``stage`` student (before distillation)."""
  e = zoo.fetch("cd16x_base", f"e{stage}_base.pth", weights_dir=weights_dir, cache_dir=cache_dir)
  d = zoo.fetch("cd16x_base", f"d{stage}_base.pth", weights_dir=weights_dir, cache_dir=cache_dir)
  return convert_student_files(stage, e, d)


def load_vgg19_t7(stage, encoder_file, decoder_file=None):
  """The original WCT models: ``vgg_normalised_conv{k}_1.t7`` (+ ``feature_invertor_conv{k}_1.t7``).

  Returns:
    dict with ``encoder`` (and ``decoder``) param trees (numpy).
  """
  from cdft import models  # pylint: disable=import-outside-toplevel
  from cdft.weights import t7  # only this model family needs the Torch7 reader

  enc = models.get_model("encoder", stage, "vgg19")
  enc_abs = convert.abstract_params(enc, _PROBE)
  out = {"encoder": convert.from_sequential_convs(
      t7.sequential_convs(encoder_file), enc_abs,
      ["conv0"] + family.encoder_layer_names(stage), str(encoder_file))}
  if decoder_file is not None:
    feat = jax.eval_shape(lambda p, x: enc.apply({"params": p}, x), enc_abs, _PROBE)
    dec_abs = convert.abstract_params(models.get_model("decoder", stage, "vgg19"), feat)
    out["decoder"] = convert.from_sequential_convs(
        t7.sequential_convs(decoder_file), dec_abs, family.decoder_layer_names(stage),
        str(decoder_file))
  return out


def _level_model(preset, stage, trees):
  return family.LevelModel(
      encoder=family.ModuleSpec("encoder", stage, preset),
      decoder=family.ModuleSpec("decoder", stage, preset),
      encoder_params=convert.to_device(trees["encoder"]),
      decoder_params=convert.to_device(trees["decoder"]))


def vgg19_files(stage, weights_dir):
  """Where the original WCT ``.t7`` files of ``stage`` are looked for under ``weights_dir``."""
  root = pathlib.Path(weights_dir)
  names = (f"vgg_normalised_conv{stage}_1.t7", f"feature_invertor_conv{stage}_1.t7")
  for folder in (root, root / "original_wct_models", root / "vgg19"):
    if all((folder / n).is_file() for n in names):
      return tuple(folder / n for n in names)
  raise WeightError(
      f"{root}: no {names[0]} / {names[1]} (looked in ., original_wct_models/, vgg19/): "
      "the full VGG-19 model needs the original WCT Torch7 files")


MODELS = ("cd16x", "vgg19")
ADAIN_MODELS = ("adain-vgg",)  # or a cdft training workdir (load_adain)
ADAIN_STAGE = 4  # AdaIN works at relu4_1


def adain_level(preset, encoder, decoder):
  """The AdaIN pair (``{'params': ...}`` trees) as the one level (4) of a stylizer:
  the VGG's ceil pooling, no final ReLU."""
  return {ADAIN_STAGE: family.LevelModel(
      encoder=family.ModuleSpec("encoder", ADAIN_STAGE, preset, ceil_pool=preset == "vgg19"),
      decoder=family.ModuleSpec("decoder", ADAIN_STAGE, preset, final_relu=False),
      encoder_params=convert.to_device(encoder), decoder_params=convert.to_device(decoder))}


def load_adain(model="adain-vgg", weights_dir=None, cache_dir=None):
  """``{4: LevelModel}`` of an AdaIN encoder/decoder pair, for ``Stylizer(method='adain')``.

  Args:
    model: ``'adain-vgg'``, pytorch-AdaIN's released VGG and decoder
      (``<weights dir>/adain/vgg_normalised.pth`` and ``decoder.pth``), or the
      workdir of a cdft AdaIN training run: an ``adain_small_decoder`` run (the
      16x student it was trained for, with its small decoder) or an
      ``adain_decoder`` run (its encoder, with the trained decoder). Relative
      paths in the run's config are found as
      :func:`cdft.weights.resolver.resolve_run_reference` says.
    weights_dir: local weights folder (default ``$CDFT_WEIGHTS_DIR``).
    cache_dir: where converted weights are cached.
  """
  if model == "adain-vgg":
    root = weights_dir or os.environ.get("CDFT_WEIGHTS_DIR")
    if not root:
      raise WeightError("--model adain-vgg needs --weights-dir (or CDFT_WEIGHTS_DIR) holding "
                        "pytorch-AdaIN's adain/vgg_normalised.pth and adain/decoder.pth")
    from cdft.weights import adain  # pylint: disable=import-outside-toplevel
    vgg_file, decoder_file = adain.find_files(root)
    trees = [_cached(path, f"adain-{kind}", lambda p=path, k=kind: adain.load_file(p, k),
                     cache_dir)
             for path, kind in ((vgg_file, "encoder"), (decoder_file, "decoder"))]
    return adain_level("vgg19", *trees)
  path = pathlib.Path(os.path.expanduser(str(model)))
  if not path.is_dir():
    raise WeightError(f"{model}: not an AdaIN model: give 'adain-vgg' or the workdir of a cdft "
                      "adain_small_decoder (or adain_decoder) training run")
  from cdft import weights  # pylint: disable=import-outside-toplevel
  from cdft.weights import resolver  # pylint: disable=import-outside-toplevel
  from cdft.training import checkpointing  # pylint: disable=import-outside-toplevel
  params, cfg = checkpointing.restore_params(path)
  task = cfg.get("task")
  if task == "adain_small_decoder":  # see cdft.tasks.adain: the same seeds for 'random'
    preset, spec, seed = "16x", cfg["student"]["encoder"], cfg["seed"] + 103
  elif task == "adain_decoder":
    preset, spec, seed = cfg["teacher"]["preset"], cfg["teacher"]["encoder"], cfg["seed"] + 101
  else:
    raise WeightError(f"{path}: a {task!r} run has no AdaIN decoder: give the workdir of an "
                      "adain_small_decoder or adain_decoder run")
  encoder = weights.resolve(resolver.resolve_run_reference(spec, path), "encoder",
                            stage=ADAIN_STAGE, preset=preset, seed=seed,
                            weights_dir=weights_dir or cfg.get("weights_dir") or None)
  return adain_level(preset, {"params": encoder}, {"params": params["decoder"]})


def load_levels(model="cd16x", levels=(1, 2, 3, 4, 5), weights_dir=None, cache_dir=None):
  """``{level: LevelModel}`` for the stylizer.

  Args:
    model: ``'cd16x'`` (the released 16x students, from the zoo) or ``'vgg19'``
      (the original WCT normalized VGG-19 and decoders, from ``weights_dir``).
    levels: which levels to load.
    weights_dir: local weights folder (default: ``$CDFT_WEIGHTS_DIR`` or the zoo cache).
    cache_dir: zoo cache folder.
  """
  out = {}
  for k in sorted(set(levels)):
    if model == "cd16x":
      out[k] = _level_model("16x", k, load_cd16x(k, weights_dir, cache_dir))
    elif model == "vgg19":
      root = weights_dir or os.environ.get("CDFT_WEIGHTS_DIR")
      if not root:
        raise WeightError("the vgg19 model needs --weights-dir (or CDFT_WEIGHTS_DIR) with the "
                          "original WCT .t7 files")
      out[k] = _level_model("vgg19", k, load_vgg19_t7(k, *vgg19_files(k, root)))
    else:
      raise WeightError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
  return out
