"""The Factor Transfer training steps on CIFAR-style classification (spec ft.md §2).

1. :class:`ClassifierTask` (``classifier``): a teacher (or baseline) classifier,
   cross-entropy with train-mode BatchNorm (the ``batch_stats`` are the model
   state); evaluation = eval-mode accuracy and cross-entropy.
2. :func:`paraphraser_task` (``ft_paraphraser``): the paraphraser, trained
   unsupervised to reconstruct the frozen teacher's FT tap (eval-mode teacher,
   its feature a constant): L1 as the official code, or MSE (RD/KDZ/TD); the
   task is :class:`cdft.tasks.paraphraser.ParaphraserTask`.
3. :class:`StudentTask` (``ft_student``): a student trained with cross-entropy
   plus one distillation term, ``distill.method``:

   - ``none``: the plain student (no teacher);
   - ``kd``: Hinton KD, ``(1 - α)·CE + α·T²·KL`` (RD: α = 0.9, T = 4);
   - ``fitnets``: ``CE + β·MSE(regressor(student hint), teacher hint)``, the
     conv-BN-ReLU regressor trained jointly (RD: β = 100, layer2);
   - ``at``: ``CE + β·Σ_layers AT`` over the three groups (RD: β = 1000);
   - ``ft``: ``CE + β·L_FT(translator(student tap), paraphraser(teacher tap))``,
     the official loss (mean reduction, β = 500); the translator is trained
     with the student (same optimizer), the paraphraser and teacher are frozen
     in eval mode and the teacher factor is a constant.

   Evaluation = the student's eval-mode accuracy.

Trainable parameters are dicts keyed by role (``classifier``; ``paraphraser``;
``student`` + ``translator`` / ``regressor``) and so are the BatchNorm states,
so a later step finds a network in an earlier run's workdir by its role.
Frozen networks are named by strings in the config: ``'random'`` (fresh
init, for tests and benchmarks), the workdir of an earlier run, or a PyTorch
``.pth`` file (teacher: a classifier state dict; paraphraser: the official
``Paraphraser.pth`` format, or ``'released'`` for the model-zoo one).
Every network is named by a string of the config and loaded by
:func:`cdft.weights.resolve`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cdft import losses
from cdft import models
from cdft import weights
from cdft.data import augment
from cdft.errors import CdftError
from cdft.models import factor_transfer as ft
from cdft.tasks import paraphraser

METHODS = ("none", "kd", "fitnets", "at", "ft")
AT_LAYERS = ("layer1", "layer2", "layer3")  # RD: feat[1:-1], the three group outputs.
_PROBE = np.zeros((1, 32, 32, 3), np.float32)  # Parameter shapes do not depend on H x W.

# Classes of the labelled datasets of cdft.data.sources.
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "digits": 10}
# Per-channel mean / std of the 1,500 training digits (32 x 32, values in [0, 1]).
DIGITS_MEAN = (0.3054, 0.3054, 0.3054)
DIGITS_STD = (0.3221, 0.3221, 0.3221)


def input_config(dataset, split, train=True, padding_mode="constant"):
  """``config.input`` (or ``config.eval_input``) for a labelled 32 x 32 dataset.

  Training: the official FT augmentation (zero-pad 4, random 32 x 32 crop,
  horizontal flip; digits are not flipped: a mirrored digit is another shape),
  then per-channel normalisation; evaluation: the normalisation only.

  Args:
    dataset: 'cifar10', 'cifar100' or 'digits'.
    split: 'train' / 'test' (TFDS slicing such as 'train[:90%]' for CIFAR).
    train: augmentation (training) or not (evaluation).
    padding_mode: 'constant' (torchvision RandomCrop(32, padding=4)) or
      'reflect' (the official code's unused CIFAR-100 loader).
  """
  import ml_collections  # pylint: disable=import-outside-toplevel
  if dataset not in NUM_CLASSES:
    raise CdftError(f"unknown dataset {dataset!r}; choose from {', '.join(NUM_CLASSES)}")
  inp = ml_collections.ConfigDict()
  inp.dataset = dataset  # cdft.data.sources name: 'cifar10' | 'cifar100' | 'digits'.
  inp.split = split  # Split ('train' / 'test').
  inp.data_dir = ""  # TFDS data_dir of the prepared CIFAR ('' = TFDS default).
  inp.manual_dir = ""  # Unused by these datasets.
  inp.preprocess = "cifar_train" if train else "cifar_eval"  # cdft.data.preprocess op.
  # Run that op inside the jitted step (cdft.data.augment): the host ships uint8
  # pixels gathered by index, the device pads, crops, flips and normalises.
  # False: the numpy op on the host, per example, in a thread pool.
  inp.on_device = True
  inp.pp = ml_collections.ConfigDict()  # Keyword arguments of the preprocessing.
  if dataset == "digits":
    inp.pp.stats = "none"  # No CIFAR statistics ...
    inp.pp.mean = DIGITS_MEAN  # ... the digits' own mean ...
    inp.pp.std = DIGITS_STD  # ... and standard deviation.
  else:
    inp.pp.stats = dataset  # Normalisation (official FT CIFAR-10 / CIFAR-100 numbers).
  if train:
    inp.pp.pad = 4  # Padding before the random crop (official: 4).
    inp.pp.crop = 32  # Random crop side (official: 32).
    inp.pp.flip = dataset != "digits"  # Random horizontal flip (official: yes on CIFAR).
    inp.pp.padding_mode = padding_mode  # 'constant' (zeros, official) | 'reflect'.
  return inp


def _require_labels(batch, who):
  if "label" not in batch:
    raise CdftError(f"{who} needs labelled data: the input batches have no 'label' "
                    f"(keys {sorted(batch)}); use a labelled dataset (cifar10, cifar100, digits)")


def _check_labels(batch, num_classes, who):
  _require_labels(batch, who)
  labels = np.asarray(batch["label"])
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise CdftError(f"{who}: labels in [{labels.min()}, {labels.max()}] do not fit "
                    f"num_classes={num_classes} (set config.num_classes for the dataset)")


def _eval_sums(logits, labels, mask):
  """Masked sums of correct predictions and cross-entropy, and the count."""
  mask = mask.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {"accuracy": jnp.sum(correct * mask), "ce": jnp.sum(ce * mask),
          "count": jnp.sum(mask)}


def _evaluate(module, role, params, model_state, batch):
  """Eval-mode masked sums of the classifier ``params[role]`` on a held-out batch."""
  logits, _ = module.apply({"params": params[role], "batch_stats": model_state[role]},
                           batch["image"], train=False)
  return _eval_sums(logits, batch["label"], batch["mask"])


def _ce_and_accuracy(logits, labels):
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return ce, accuracy


def _feature_shapes(module, batch=None):
  """Shapes of a classifier's features for one example of ``batch`` (default 32 x 32);
  nothing is computed."""
  image = _PROBE if batch is None else np.asarray(batch["image"][:1])
  return jax.eval_shape(lambda: module.apply(module.init(jax.random.key(0), image), image,
                                             train=False)[1])


class _Task:
  """Shared pieces: the config, the held-out split and the in-step preprocessing."""

  def __init__(self, config):
    self.config = config
    self.num_classes = int(config.num_classes)
    self.eval_input = config.get("eval_input")
    self.frozen = {}
    self.dtype = models.compute_dtype(config)  # None: float32
    self._train_images = augment.device_op(config.get("input"))
    self._eval_images = augment.device_op(self.eval_input)

  def _images(self, batch, rng):
    """The training batch's images as the networks take them (augmented on the device
    when ``config.input.on_device``, from the step's ``rng``)."""
    return self._train_images(batch["image"], rng)

  def _probe(self, batch):
    """``{'image': zeros}`` shaped as one prepared training image of ``batch``."""
    return {"image": augment.probe(self._train_images, batch["image"])}

  def _in_dtype(self, module):
    """``module`` computing in ``config.compute_dtype`` (its parameters stay float32)."""
    return module if self.dtype is None else module.clone(dtype=self.dtype)

  def _teacher(self, teacher_cfg):
    module, variables = weights.resolve(
        teacher_cfg.workdir, "classifier", model=teacher_cfg.model, num_classes=self.num_classes,
        widths=teacher_cfg.widths, seed=self.config.seed + 201)
    return self._in_dtype(module), variables

  def _teacher_shapes(self, batch=None):
    """Shapes of the teacher's features for one example of ``batch`` (default 32 x 32)."""
    image = _PROBE if batch is None else np.asarray(batch["image"][:1])
    return jax.eval_shape(lambda: self.teacher.apply(self.frozen["teacher"], image,
                                                     train=False)[1])

  def _teacher_apply(self, frozen, image):
    """Eval-mode teacher: ``(logits, feats)``, constants."""
    out = self.teacher.apply(frozen["teacher"], image, train=False)
    return jax.lax.stop_gradient(out)


class ClassifierTask(_Task):
  """Trains a classifier with cross-entropy (``classifier``: the FT teacher)."""

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    self.model = self._in_dtype(weights.classifier_module(m.name, self.num_classes, m.widths))

  def init(self, rng, batch):
    _check_labels(batch, self.num_classes, "task 'classifier'")
    variables = models.init(self.model, rng, self._probe(batch)["image"])
    return {"params": {"classifier": variables["params"]},
            "model_state": {"classifier": variables["batch_stats"]}}

  def loss(self, params, model_state, frozen, batch, rng):
    del frozen
    (logits, _), new = self.model.apply(
        {"params": params["classifier"], "batch_stats": model_state["classifier"]},
        self._images(batch, rng), train=True, mutable=["batch_stats"])
    ce, accuracy = _ce_and_accuracy(logits, batch["label"])
    return ce, ({"ce": ce, "accuracy": accuracy}, {"classifier": new["batch_stats"]})

  def evaluate(self, params, model_state, frozen, batch):
    del frozen
    return _evaluate(self.model, "classifier", params, model_state,
                     dict(batch, image=self._eval_images(batch["image"])))


def paraphraser_task(config):
  """``ft_paraphraser``: the paraphraser on the frozen teacher classifier's FT tap."""
  paraphraser.check_config(config)  # before the teacher is loaded
  teacher = _Task(config)
  teacher.teacher, teacher.frozen["teacher"] = teacher._teacher(config.teacher)

  def features(frozen, image):
    return teacher._teacher_apply(frozen, image)[1]["ft"]

  def probe_shape(batch):
    return tuple(teacher._teacher_shapes(batch)["ft"].shape)

  return paraphraser.ParaphraserTask(config, paraphraser.FeatureTap(
      teacher.frozen, int(probe_shape(None)[-1]), features, probe_shape))


class StudentTask(_Task):
  """Trains a student classifier with ``distill.method`` (``ft_student``)."""

  def __init__(self, config):
    super().__init__(config)
    d = config.distill
    if d.method not in METHODS:
      raise CdftError(f"config.distill.method: unknown method {d.method!r}; choose from "
                      f"{', '.join(METHODS)}")
    self.method = d.method
    s = config.student
    self.student = self._in_dtype(weights.classifier_module(s.model, self.num_classes,
                                                            s.widths))
    self.teacher = None
    self.head = None  # the trained translator / regressor, if any
    if self.method == "none":
      return
    if self.method == "kd" and not 0.0 <= float(d.kd_alpha) <= 1.0:
      raise CdftError(f"config.distill.kd_alpha must be in [0, 1], got {d.kd_alpha}")
    # The teacher's feature shapes from its architecture alone: a rate that
    # leaves no factor fails before the teacher is loaded.
    t = config.teacher
    t_feats = _feature_shapes(weights.classifier_module(t.model, self.num_classes, t.widths))
    if self.method == "ft":
      ft.factor_channels(int(t_feats["ft"].shape[-1]), d.rate)
    self.teacher, self.frozen["teacher"] = self._teacher(config.teacher)
    s_feats = self._student_shapes()
    if self.method == "ft":
      self.paraphraser, self.frozen["paraphraser"] = weights.resolve(
          d.paraphraser, "paraphraser", in_channels=int(t_feats["ft"].shape[-1]), rate=d.rate,
          seed=config.seed + 202, weights_dir=config.get("weights_dir") or None)
      self.head_name, self.head_input = "translator", "ft"
      self.paraphraser = self._in_dtype(self.paraphraser)
      self.head = self._in_dtype(ft.Translator(int(s_feats["ft"].shape[-1]),
                                               self.paraphraser.factor_channels))
    elif self.method == "fitnets":
      if d.hint_layer not in AT_LAYERS:
        raise CdftError(f"config.distill.hint_layer: unknown layer {d.hint_layer!r}; choose "
                        f"from {', '.join(AT_LAYERS)}")
      # RD's ConvReg for equal spatial sizes: conv3x3 -> BN -> ReLU.
      self.head_name, self.head_input = "regressor", d.hint_layer
      self.head = ft.HintRegressor(int(t_feats[d.hint_layer].shape[-1]), kernel_size=3)

  def _student_shapes(self, batch=None):
    return _feature_shapes(self.student, batch)

  def init(self, rng, batch):
    _check_labels(batch, self.num_classes, "task 'ft_student'")
    k_student, k_head = jax.random.split(rng)
    batch = self._probe(batch)
    variables = models.init(self.student, k_student, batch["image"])
    params = {"student": variables["params"]}
    state = {"student": variables["batch_stats"]}
    if self.method in ("none", "kd"):
      return {"params": params, "model_state": state}
    s_feats, t_feats = self._student_shapes(batch), self._teacher_shapes(batch)
    compared = AT_LAYERS if self.method == "at" else (self.head_input,)
    for layer in compared:
      s, t = s_feats[layer], t_feats[layer]
      if s.shape[1:3] != t.shape[1:3]:
        raise CdftError(f"{self.method}: student {layer} {tuple(s.shape[1:])} and teacher "
                        f"{layer} {tuple(t.shape[1:])} differ in spatial size")
    if self.head is not None:
      head = models.init(self.head, k_head, np.zeros(s_feats[self.head_input].shape, np.float32))
      params[self.head_name] = head["params"]
      if "batch_stats" in head:
        state[self.head_name] = head["batch_stats"]
    return {"params": params, "model_state": state}

  def loss(self, params, model_state, frozen, batch, rng):
    d = self.config.distill
    image, labels = self._images(batch, rng), batch["label"]
    (logits, s_feats), new = self.student.apply(
        {"params": params["student"], "batch_stats": model_state["student"]},
        image, train=True, mutable=["batch_stats"])
    new_state = {"student": new["batch_stats"]}
    ce, accuracy = _ce_and_accuracy(logits, labels)
    metrics = {"ce": ce, "accuracy": accuracy}
    if self.method == "none":
      return ce, (metrics, new_state)
    t_logits, t_feats = self._teacher_apply(frozen, image)
    if self.method == "kd":
      kd = losses.kd_loss(logits, t_logits, d.kd_temperature)
      metrics["kd"] = kd
      loss = (1.0 - d.kd_alpha) * ce + d.kd_alpha * kd
    elif self.method == "fitnets":
      regressed, head = self.head.apply(
          {"params": params["regressor"], "batch_stats": model_state["regressor"]},
          s_feats[d.hint_layer], train=True, mutable=["batch_stats"])
      new_state["regressor"] = head["batch_stats"]
      hint = losses.hint_loss(regressed, t_feats[d.hint_layer])
      metrics["hint"] = hint
      loss = ce + d.beta_fitnets * hint
    elif self.method == "at":
      at = losses.attention_transfer_loss([s_feats[k] for k in AT_LAYERS],
                                      [t_feats[k] for k in AT_LAYERS])
      metrics["at"] = at
      loss = ce + d.beta_at * at
    else:  # ft
      factor_t = jax.lax.stop_gradient(self.paraphraser.apply(
          {"params": frozen["paraphraser"]}, t_feats["ft"], method=ft.Paraphraser.encode))
      factor_s = self.head.apply({"params": params["translator"]}, s_feats["ft"])
      ft_term = losses.ft_loss(factor_s, factor_t)
      metrics["ft"] = ft_term
      loss = ce + d.beta_ft * ft_term
    return loss, (metrics, new_state)

  def evaluate(self, params, model_state, frozen, batch):
    del frozen
    return _evaluate(self.student, "student", params, model_state,
                     dict(batch, image=self._eval_images(batch["image"])))

