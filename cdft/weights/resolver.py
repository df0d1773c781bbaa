"""One resolver for every way a network's weights are named: :func:`resolve`.

A config (or a command line) names a network's weights by a string; this is
the one place that turns it into parameters, for every task and for
``launch/evaluate.py``:

* ``'random'``: a fresh Flax init from ``seed``;
* a model-zoo entry: ``'cd16x'`` / ``'cd16x_base'`` (the released 16x
  students and decoders / their pruned initialisations), ``'released'`` (the
  official FT paraphraser);
* ``'adain'``: pytorch-AdaIN's released ``vgg_normalised.pth`` / ``decoder.pth``
  under ``<weights dir>/adain/`` (AdaIN's stage-4 VGG-19 encoder and decoder);
* a file: a normalized VGG-19 ``.msgpack`` (``cdft-weights normalize-vgg``), a
  ``.t7`` of the original WCT release, a PyTorch ``.pth``/``.pt``;
* the workdir of an earlier cdft training run (its checkpoint's network of
  that role);
* ``'pruned'``: the 16x network pruned from given teacher parameters
  (``teacher=``; the CD paper's initialisation).
"""
import os
import pathlib

import jax
import numpy as np

from cdft import models
from cdft.errors import CdftError
from cdft.models import factor_transfer as ft_models

KINDS = ("encoder", "decoder", "embedding", "classifier", "paraphraser")
# Weights names of resolve() that are not paths.
_NAMED_WEIGHTS = ("random", "cd16x", "cd16x_base", "adain", "released")
_PROBE = np.zeros((1, 32, 32, 3), np.float32)  # classifier parameter shapes do not depend on H x W


def resolve(spec, kind, *, stage=None, preset=None, model=None, num_classes=None, widths=(),
            in_channels=None, rate=0.5, teacher=None, seed=0, weights_dir=None):
  """The weights named ``spec`` for a network of ``kind``.

  Args:
    spec: the name (see the module docstring).
    kind: ``'encoder'``, ``'decoder'``, ``'embedding'`` (the CD VGG family:
      give ``stage`` and ``preset``), ``'classifier'`` (give ``model``,
      ``num_classes`` and optionally ``widths``) or ``'paraphraser'`` (give
      ``in_channels``, and ``rate`` for ``'random'``).
    stage, preset: the VGG stage (1..5) and width preset ('vgg19' or '16x').
    model, num_classes, widths: the classifier architecture
      (:func:`classifier_module`).
    in_channels, rate: the paraphraser's input channels and rate.
    teacher: the teacher's parameter tree, for ``'pruned'``.
    seed: for ``'random'``.
    weights_dir: the model-zoo folder (default $CDFT_WEIGHTS_DIR, else the cache).

  Returns:
    The host-numpy parameter tree (encoder, decoder, embedding);
    ``(module, {'params', 'batch_stats'})`` (classifier);
    ``(module, params)`` (paraphraser: its rate is the loaded file's own).

  Raises:
    CdftError: a name that does not resolve, or weights that do not fit.
  """
  if kind in ("encoder", "decoder", "embedding"):
    if stage is None or preset is None:
      raise CdftError(f"{kind} weights need the network's stage and preset")
    if spec == "pruned":
      if teacher is None or kind == "embedding":
        raise CdftError(f"'pruned' {kind} weights need the teacher's {kind} to prune")
      return _pruned(teacher, kind, stage)
    return _vgg_network(spec, kind, stage, preset, seed, weights_dir)
  if kind == "classifier":
    return _classifier(spec, model, num_classes, widths, seed)
  if kind == "paraphraser":
    return _paraphraser(spec, in_channels, rate, seed, weights_dir)
  raise CdftError(f"unknown kind of network {kind!r}; choose from {', '.join(KINDS)}")


def _expand(spec):
  return pathlib.Path(os.path.expanduser(str(spec)))


def classifier_module(name, num_classes, widths=()):
  """A CIFAR classifier of :func:`cdft.models.get_classifier`.

  Args:
    name: 'resnet20', 'resnet32', 'resnet56', 'resnet110', 'wrn_16_2', 'wrn_40_1'
      or 'wrn_40_2'.
    num_classes: classifier outputs.
    widths: optional ResNet stem/group widths (3 positive ints, e.g. (8, 16, 32)
      for a narrow test network); () keeps the standard 16/32/64.

  Raises:
    CdftError: unknown name, or widths that do not fit the model.
  """
  widths = tuple(int(w) for w in (widths or ()))
  kwargs = {}
  if widths:
    if not name.startswith("resnet"):
      raise CdftError(f"widths {widths} only apply to the CIFAR ResNets, not {name!r}")
    if len(widths) != 3 or min(widths) < 1:
      raise CdftError(f"ResNet widths must be 3 positive integers (stem/groups), got {widths}")
    kwargs["widths"] = widths
  if int(num_classes) < 2:
    raise CdftError(f"num_classes must be >= 2, got {num_classes}")
  try:
    return models.get_classifier(name, int(num_classes), **kwargs)
  except ValueError as e:
    raise CdftError(str(e)) from None


def _probe(stage):
  # The smallest input that reaches relu{stage}_1 with at least 2x2 positions.
  side = 2 ** stage
  return np.zeros((1, side, side, 3), np.float32)


def _random_params(module, x, seed):
  return jax.device_get(models.init(module, jax.random.key(seed), x)["params"])


def _unwrap(tree):
  """Loaders return ``{'params': tree}``; tasks keep the bare tree."""
  if isinstance(tree, dict) and set(tree) == {"params"}:
    return tree["params"]
  return tree


def _vgg_network(spec, kind, stage, preset, seed=0, weights_dir=None):
  """Parameters of one network, named by a config string.

  Args:
    spec: one of
      ``'random'`` (fresh Flax init from ``seed``),
      a ``.msgpack`` normalized VGG-19 (``cdft-weights normalize-vgg``; encoders),
      a ``.t7`` file of the original WCT release (``vgg_normalised_conv{k}_1.t7``
      for encoders, ``feature_invertor_conv{k}_1.t7`` for decoders),
      ``'cd16x'`` / ``'cd16x_base'`` (the released students / their pruned
      initialisations, from the model zoo),
      or the workdir of an earlier cdft training run.
    kind: ``'encoder'``, ``'decoder'`` or ``'embedding'``.
    stage: 1..5.
    preset: width preset of the network ('vgg19' or '16x').
    seed: for ``'random'``.
    weights_dir: zoo folder for ``cd16x*`` (default $CDFT_WEIGHTS_DIR).

  Returns:
    the Flax param tree (host numpy).
  """
  if spec == "random":
    if kind == "embedding":
      enc = models.get_model("encoder", stage, preset)
      x = _probe(stage)
      feats = jax.eval_shape(lambda: enc.init_with_output(
          jax.random.key(0), x, return_all=True)[0])
      dummy = tuple(np.zeros(f.shape, np.float32) for f in feats)
      return _random_params(models.get_model("embedding", stage, preset), dummy, seed)
    module = models.get_model(kind, stage, preset)
    if kind == "encoder":
      return _random_params(module, _probe(stage), seed)
    enc = models.get_model("encoder", stage, preset)
    feat = jax.eval_shape(lambda: enc.init_with_output(jax.random.key(0), _probe(stage))[0])
    return _random_params(module, np.zeros(feat.shape, np.float32), seed)
  if spec in ("cd16x", "cd16x_base"):
    from cdft.weights import pretrained  # pylint: disable=import-outside-toplevel
    if preset != "16x":
      raise CdftError(f"{spec!r} weights are 16x students, but the network has preset {preset!r}")
    load = pretrained.load_cd16x if spec == "cd16x" else pretrained.load_cd16x_base
    trees = load(stage, weights_dir=weights_dir)
    if kind not in trees:
      raise CdftError(f"{spec!r} has no {kind} weights")
    return _unwrap(trees[kind])
  if spec == "adain" or str(spec).endswith(".pth"):
    return _adain_network(spec, kind, stage, preset, weights_dir)
  path = _expand(spec)
  if path.is_dir():
    return _workdir_params(path, kind, f"the {kind}")
  if not path.is_file():
    raise CdftError(f"{spec}: no such weights file or training workdir (for the stage-{stage} "
                    f"{kind}; see README 'Train')")
  if path.suffix == ".msgpack":
    if kind != "encoder":
      raise CdftError(f"{path}: a normalized VGG-19 file holds encoders only, not a {kind}")
    from cdft.weights import normalize  # pylint: disable=import-outside-toplevel
    return _unwrap(normalize.load_encoder(path, stage))
  if path.suffix == ".t7":
    from cdft.weights import pretrained  # pylint: disable=import-outside-toplevel
    if kind == "encoder":
      return _unwrap(pretrained.load_vgg19_t7(stage, path)["encoder"])
    if kind == "decoder":
      # The decoder file is read against the stage's encoder shapes only.
      return _t7_decoder(stage, path)
  raise CdftError(f"{path}: cannot load a {kind} from a {path.suffix or 'suffix-less'} file "
                  "(.msgpack, .t7, 'random', 'cd16x', 'cd16x_base', 'adain' or .pth "
                  "(pytorch-AdaIN), or a workdir)")


def _adain_network(spec, kind, stage, preset, weights_dir):
  """pytorch-AdaIN's released VGG / decoder: ``'adain'`` (``<weights dir>/adain/``) or a
  ``.pth`` file of either layout."""
  from cdft.weights import adain  # pylint: disable=import-outside-toplevel
  if (stage, preset) != (4, "vgg19") or kind == "embedding":
    raise CdftError(f"{spec}: pytorch-AdaIN's files hold the VGG-19 relu4_1 encoder and its "
                    f"decoder (stage 4, preset vgg19), not a stage-{stage} {preset} {kind}")
  if spec != "adain":
    path = _expand(spec)
    if not path.is_file():
      raise CdftError(f"{spec}: no such weights file")
    return _unwrap(adain.load_file(path, kind))
  root = weights_dir or os.environ.get("CDFT_WEIGHTS_DIR")
  if not root:
    raise CdftError("'adain' weights need a weights folder (config.weights_dir, --weights-dir "
                    "or CDFT_WEIGHTS_DIR) holding adain/vgg_normalised.pth and adain/decoder.pth")
  return _unwrap(adain.load_file(adain.find_files(root)[kind == "decoder"], kind))


def _t7_decoder(stage, path):
  """A ``feature_invertor_conv{k}_1.t7`` decoder of the original WCT release."""
  from cdft.weights import convert, t7  # pylint: disable=import-outside-toplevel
  enc = models.get_model("encoder", stage, "vgg19")
  feat = jax.eval_shape(lambda: enc.init_with_output(jax.random.key(0), _probe(stage))[0])
  abstract = convert.abstract_params(models.get_model("decoder", stage, "vgg19"), feat)
  return _unwrap(convert.from_sequential_convs(t7.sequential_convs(path), abstract,
                                               models.vgg.decoder_layer_names(stage), str(path)))


def _pruned(teacher_params, kind, stage):
  from cdft.weights import prune  # pylint: disable=import-outside-toplevel
  widths = models.vgg.stage_widths("16x", stage)
  if kind == "encoder":
    return prune.prune_encoder(teacher_params, stage, widths)
  return prune.prune_decoder(teacher_params, stage, widths)


def _workdir_params(path, role, what):
  from cdft.training import checkpointing  # pylint: disable=import-outside-toplevel
  params, cfg = checkpointing.restore_params(path)
  if role not in params:
    raise CdftError(f"{path}: the run (task {cfg.get('task')!r}) has no {role!r} parameters "
                    f"to use as {what} (it has {sorted(params)})")
  return params[role]


def _check_tree(loaded, expected, where, what):
  """Raises CdftError unless ``loaded`` has ``expected``'s structure and shapes."""
  want = jax.tree_util.tree_flatten_with_path(expected)[0]
  got = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
  got_paths = {jax.tree_util.keystr(p): v for p, v in got.items()}
  for path, leaf in want:
    key = jax.tree_util.keystr(path)
    if key not in got_paths:
      raise CdftError(f"{where}: {what} has no tensor {key} (another architecture?)")
    if tuple(np.shape(got_paths[key])) != tuple(leaf.shape):
      raise CdftError(f"{where}: {what} tensor {key} has shape {np.shape(got_paths[key])}, "
                      f"expected {tuple(leaf.shape)} (another architecture or width?)")
  if len(got_paths) != len(want):
    raise CdftError(f"{where}: {what} has {len(got_paths)} tensors, expected {len(want)} "
                    "(another architecture?)")


def _classifier(spec, name, num_classes, widths=(), seed=0):
  """Variables ``{'params', 'batch_stats'}`` (host numpy) of a frozen classifier.

  Args:
    spec: ``'random'`` (fresh init from ``seed``), the workdir of a
      ``classifier`` run (its ``classifier`` network) or of an ``ft_student`` run
      (its ``student``), or a PyTorch state-dict file (``.pth``/``.pt``).
    name, num_classes, widths: the architecture (see :func:`classifier_module`).
    seed: for ``'random'``.

  Returns:
    ``(module, variables)``.
  """
  module = classifier_module(name, num_classes, widths)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), _PROBE))
  if spec == "random":
    variables = jax.device_get(models.init(module, jax.random.key(seed), _PROBE))
    return module, {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  path = _expand(spec)
  if path.is_dir():
    from cdft.training import checkpointing  # pylint: disable=import-outside-toplevel
    variables, cfg = checkpointing.restore_variables(path)
    role = "classifier" if "classifier" in variables["params"] else "student"
    if role not in variables["params"]:
      raise CdftError(f"{path}: the run (task {cfg.get('task')!r}) holds no classifier "
                      f"(parameters {sorted(variables['params'])})")
    saved = cfg.get("model", {}).get("name") if role == "classifier" else \
        cfg.get("student", {}).get("model")
    if saved and saved != name:
      raise CdftError(f"{path}: the run trained a {saved}, but the config asks for a {name}")
    params = variables["params"][role]
    stats = (variables.get("model_state") or {}).get(role, {})
  elif path.is_file() and path.suffix in (".pth", ".pt"):
    from cdft.weights import ft as ft_weights  # pylint: disable=import-outside-toplevel
    from cdft.weights import torch_format  # pylint: disable=import-outside-toplevel
    state = torch_format.state_dict(torch_format.load(path), str(path))
    converted = ft_weights.classifier_from_state(module, state, str(path))
    params, stats = converted["params"], converted.get("batch_stats", {})
  else:
    raise CdftError(f"{spec}: no such training workdir or .pth file for the {name} "
                    "(or use 'random')")
  variables = {"params": params, "batch_stats": stats}
  _check_tree(variables, abstract, str(spec), f"the {name}")
  return module, jax.device_get(variables)


def _paraphraser(spec, in_channels, rate=0.5, seed=0, weights_dir=None):
  """A frozen paraphraser for a feature map of ``in_channels`` channels.

  Args:
    spec: ``'random'`` (fresh init from ``seed`` with ``rate``), the workdir of
      an ``ft_paraphraser`` / ``cd_paraphraser`` run, an official
      ``Paraphraser.pth`` file, or ``'released'`` (the released ResNet-56 one
      from the model zoo, ``weights_dir`` / $CDFT_WEIGHTS_DIR). The rate of a
      loaded paraphraser is its own (read from its shapes).
    in_channels: m, the channels of the teacher feature it reads.
    rate: paraphrase rate k for ``'random'``.
    seed: for ``'random'``.
    weights_dir: model-zoo folder for ``'released'``.

  Returns:
    ``(Paraphraser module, params)`` (host numpy).

  Raises:
    CdftError: missing files/runs, or a paraphraser of another width.
  """
  if spec == "random":
    module = ft_models.Paraphraser(int(in_channels), float(rate))
    probe = np.zeros((1, 2, 2, int(in_channels)), np.float32)
    return module, jax.device_get(models.init(module, jax.random.key(seed), probe)["params"])
  path = _expand(spec)
  if spec == "released" or (path.is_file() and path.suffix in (".pth", ".pt")):
    from cdft.weights import ft as ft_weights  # pylint: disable=import-outside-toplevel
    if spec == "released":
      _, variables = ft_weights.load_ft_paraphraser(weights_dir=weights_dir)
    else:  # the file's own rate, from its conv0 (m -> m) and conv1 (m -> f) weights
      from cdft.weights import torch_format  # pylint: disable=import-outside-toplevel
      state = torch_format.state_dict(torch_format.load(path), str(path))
      shapes = {k: np.shape(state.get(f"{k}.weight", ())) for k in ("conv0", "conv1")}
      if len(shapes["conv0"]) != 4 or len(shapes["conv1"]) != 4:
        raise CdftError(f"{path}: not an official Paraphraser file (no 4-D conv0/conv1 "
                        "weights)")
      rate = shapes["conv1"][0] / shapes["conv0"][1]
      _, variables = ft_weights.paraphraser_from_state(state, rate=rate, source=str(path))
    params = variables["params"]
  elif path.is_dir():
    params = _workdir_params(path, "paraphraser", "the paraphraser")
  else:
    raise CdftError(f"{spec}: no such paraphraser workdir or .pth file (or use 'random', "
                    "'released')")
  try:
    m = int(np.shape(params["conv0"]["kernel"])[2])
    f = int(np.shape(params["conv1"]["kernel"])[3])
  except (KeyError, TypeError, IndexError):
    raise CdftError(f"{spec}: not paraphraser parameters (no conv0/conv1 kernels)") from None
  if m != int(in_channels):
    raise CdftError(f"{spec}: the paraphraser reads {m}-channel features, but the teacher "
                    f"feature has {in_channels} channels")
  module = ft_models.Paraphraser(m, f / m)
  probe = np.zeros((1, 2, 2, m), np.float32)
  _check_tree(params, jax.eval_shape(lambda: module.init(jax.random.key(0), probe))["params"],
              str(spec), "the paraphraser")
  return module, jax.device_get(params)


def resolve_run_reference(spec, workdir):
  """Where a weights path named in a run's config lies, seen from here.

  Relative paths in a config are relative to the directory training was started
  from, which the run does not record. ``spec`` is used as given (``~``
  expanded; relative to the current directory) if it exists; otherwise
  relative to the evaluated workdir's parent folder, then to each folder above
  it, the first where it exists (``runs/cd_student_stage3`` in a run at
  ``/x/runs/cd_small_decoder_stage3`` is ``/x/runs/cd_student_stage3``).
  Names that are not paths (``random``, ``cd16x``, ``cd16x_base``) and paths
  found nowhere are returned unchanged (the loader reports the latter).

  Args:
    spec: the config string (e.g. ``config['student']['encoder']``).
    workdir: the evaluated run's workdir.

  Returns:
    the string to give :func:`cdft.weights.resolve`.
  """
  spec = str(spec)
  if spec in _NAMED_WEIGHTS or "://" in spec:
    return spec
  path = pathlib.Path(os.path.expanduser(spec))
  if path.is_absolute() or path.exists():
    return str(path)
  for folder in pathlib.Path(os.path.abspath(os.path.expanduser(str(workdir)))).parents:
    candidate = folder / path
    if candidate.exists():
      return str(candidate)
  return spec
