"""The three training steps of Collaborative Distillation (spec cd.md §3).

1. :class:`DecoderTask` (``cd_decoder``): a decoder for the frozen stage-k
   normalized VGG-19, loss (1) = pixel + λ_p·perceptual.
2. :class:`StudentEncoderTask` (``cd_student``): the 16x student encoder and
   its linear embeddings Q_i by *collaborative distillation*: the embedded last
   student feature Q_k·F′_k must drive the frozen teacher decoder (loss (1) on
   its reconstruction) and every embedded relu_i_1 must match the teacher's
   (β·Σ‖F_i − Q_i·F′_i‖²). ``distill.method`` selects the paper's ablation.
3. :class:`SmallDecoderTask` (``cd_small_decoder``): the small decoder of the
   frozen student encoder, loss (1) with the teacher VGG as perceptual network.

Factor Transfer in place of the embedding loss (``distill.method =
'factor_transfer'``): :func:`paraphraser_task` (``cd_paraphraser``) first
trains a paraphraser on the frozen teacher's relu{k}_1; the student then
matches ``β_ft·L_FT(translator(F′_k), paraphraser(F_k))`` (spec ft.md §2.2)
while Q_k·F′_k still drives the teacher decoder (the collaborative term).

Weights are named by strings in the config (see :func:`cdft.weights.resolve`).
"""
import jax
import jax.numpy as jnp
import numpy as np

from cdft import losses
from cdft import models
from cdft import weights
from cdft.data import augment
from cdft.errors import CdftError
from cdft.models import factor_transfer as ft_models
from cdft.models import family
from cdft.tasks import paraphraser

METHODS = ("collaborative", "embedding_only", "reconstruction_only", "factor_transfer")


def _as_device(tree):
  return jax.tree.map(jnp.asarray, tree)


class _StyleTask:
  """Shared pieces: the frozen teacher encoder and the reconstruction loss."""

  # The trainer compiles the step with these on a CPU backend.
  cpu_compiler_options = family.CPU_TRAIN_COMPILER_OPTIONS

  def __init__(self, config):
    self.config = config
    self.dtype = models.compute_dtype(config)  # None: float32
    self.stage = int(config.stage)
    if self.stage not in (1, 2, 3, 4, 5):
      raise CdftError(f"config.stage must be 1..5, got {config.stage}")
    t = config.teacher
    self.teacher_encoder = models.get_model("encoder", self.stage, t.preset, dtype=self.dtype)
    self.frozen = {"teacher_encoder": weights.resolve(
        t.encoder, "encoder", stage=self.stage, preset=t.preset, seed=config.seed + 101,
        weights_dir=config.weights_dir or None)}
    self._images = augment.device_op(config.get("input"))  # uint8 crops -> [0, 1]

  def _teacher_feats(self, frozen, x):
    return self.teacher_encoder.apply({"params": frozen["teacher_encoder"]}, x, return_all=True)

  def _reconstruction(self, frozen, rec, image, target_feats):
    loss_cfg = self.config.loss
    return losses.reconstruction(rec, image, self._teacher_feats(frozen, rec), target_feats,
                                 loss_cfg.pixel, loss_cfg.perceptual)


class DecoderTask(_StyleTask):
  """Step 1: train a decoder of the frozen teacher encoder (``cd_decoder``)."""

  def __init__(self, config):
    super().__init__(config)
    self.decoder = models.get_model("decoder", self.stage, config.teacher.preset,
                                    dtype=self.dtype)

  def init(self, rng, batch):
    del batch
    seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
    init = self.config.init
    params = weights.resolve(init, "decoder", stage=self.stage, preset=self.config.teacher.preset,
                             seed=seed, weights_dir=self.config.weights_dir or None)
    return {"params": {"decoder": params}, "model_state": {}}

  def loss(self, params, model_state, frozen, batch, rng):
    del rng
    image = self._images(batch["image"])
    feats = jax.lax.stop_gradient(self._teacher_feats(frozen, image))
    rec = self.decoder.apply({"params": params["decoder"]}, feats[-1])
    loss, metrics = self._reconstruction(frozen, rec, image, feats)
    return loss, (metrics, model_state)


class StudentEncoderTask(_StyleTask):
  """Step 2: distil the 16x student encoder (``cd_student``)."""

  def __init__(self, config):
    super().__init__(config)
    method = config.distill.method
    if method not in METHODS:
      raise CdftError(f"config.distill.method: unknown method {method!r}; choose from "
                      f"{', '.join(METHODS)}")
    self.method = method
    s = config.student
    self.encoder = models.get_model("encoder", self.stage, s.preset, dtype=self.dtype)
    self.embedding = models.get_model("embedding", self.stage, s.preset, dtype=self.dtype)
    self.teacher_decoder = models.get_model("decoder", self.stage, config.teacher.preset,
                                            dtype=self.dtype)
    if method != "embedding_only":
      self.frozen["teacher_decoder"] = weights.resolve(
          config.teacher.decoder, "decoder", stage=self.stage, preset=config.teacher.preset,
          seed=config.seed + 102, weights_dir=config.weights_dir or None)
    if method == "factor_transfer":
      d = config.distill
      self.paraphraser, self.frozen["paraphraser"] = weights.resolve(
          d.paraphraser, "paraphraser", in_channels=self.teacher_encoder.widths[self.stage - 1],
          rate=d.rate, seed=config.seed + 104, weights_dir=config.weights_dir or None)
      self.translator = ft_models.Translator(self.encoder.widths[self.stage - 1],
                                             self.paraphraser.factor_channels)

  def init(self, rng, batch):
    del batch
    s = self.config.student
    seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
    wdir = self.config.weights_dir or None
    encoder = weights.resolve(s.init, "encoder", stage=self.stage, preset=s.preset, seed=seed,
                              teacher=self.frozen["teacher_encoder"], weights_dir=wdir)
    # The embedding heads Q_i start fresh, as in the official pruning tool
    # (the *_aux tensors of the base files are PyTorch's default init).
    embedding = weights.resolve("random", "embedding", stage=self.stage, preset=s.preset,
                                seed=seed + 1)
    params = {"encoder": encoder, "embedding": embedding}
    if self.method == "factor_transfer":
      probe = np.zeros((1, 2, 2, self.translator.in_channels), np.float32)
      params["translator"] = jax.device_get(
          models.init(self.translator, jax.random.key(seed + 2), probe)["params"])
    return {"params": params, "model_state": {}}

  def trainable(self, params):
    """``'train'`` / ``'frozen'`` per parameter, for the optimizer's mask.

    With ``student.train_conv0 = False`` the student encoder's conv0 keeps its
    initial (pruned: the teacher's) values.
    """
    train_conv0 = bool(self.config.student.get("train_conv0", True))

    def label(path, _):
      names = [getattr(k, "key", None) for k in path]
      is_conv0 = names[:2] == ["encoder", "conv0"]
      return "frozen" if is_conv0 and not train_conv0 else "train"

    return jax.tree_util.tree_map_with_path(label, params)

  def loss(self, params, model_state, frozen, batch, rng):
    del rng
    d = self.config.distill
    image = self._images(batch["image"])
    t_feats = jax.lax.stop_gradient(self._teacher_feats(frozen, image))
    s_feats = self.encoder.apply({"params": params["encoder"]}, image, return_all=True)
    embedded = self.embedding.apply({"params": params["embedding"]}, s_feats)
    metrics = {}
    loss = 0.0
    if self.method == "factor_transfer":
      # FT on relu{k}_1 replaces the embedding loss; of the heads Q_i only Q_k is
      # used (by the reconstruction below), the others get no gradient.
      factor_t = self.paraphraser.apply({"params": frozen["paraphraser"]}, t_feats[-1],
                                        method=ft_models.Paraphraser.encode)
      factor_s = self.translator.apply({"params": params["translator"]}, s_feats[-1])
      ft_term = losses.ft_loss(factor_s, jax.lax.stop_gradient(factor_t))
      metrics["ft"] = ft_term
      loss = loss + d.beta_ft * ft_term
    elif self.method != "reconstruction_only":
      feat = losses.embedding(embedded, t_feats)
      metrics["embedding"] = feat
      loss = loss + d.beta * feat
    if self.method != "embedding_only":
      # The collaborative path: the frozen teacher decoder reads Q_k·F′_k.
      rec = self.teacher_decoder.apply({"params": frozen["teacher_decoder"]}, embedded[-1])
      rec_loss, rec_metrics = self._reconstruction(frozen, rec, image, t_feats)
      metrics.update(rec_metrics)
      loss = loss + rec_loss
    return loss, (metrics, model_state)


def paraphraser_task(config):
  """``cd_paraphraser``: the Factor Transfer paraphraser on the teacher encoder's relu{k}_1.

  The paraphraser reconstructs the frozen teacher encoder's last feature (a
  constant); a ``cd_student`` run with ``distill.method = 'factor_transfer'``
  reads it.
  """
  paraphraser.check_config(config)  # before the teacher is loaded
  teacher = _StyleTask(config)
  channels = teacher.teacher_encoder.widths[teacher.stage - 1]

  def features(frozen, image):
    return teacher._teacher_feats(frozen, image)[-1]

  def probe_shape(batch):
    del batch  # convolutions only: any spatial size
    return (1, 2, 2, channels)

  task = paraphraser.ParaphraserTask(config, paraphraser.FeatureTap(
      teacher.frozen, channels, features, probe_shape))
  task.cpu_compiler_options = _StyleTask.cpu_compiler_options  # the VGG teacher's step
  return task


class SmallDecoderTask(_StyleTask):
  """Step 3: train the small decoder of the frozen student (``cd_small_decoder``)."""

  def __init__(self, config):
    super().__init__(config)
    s = config.student
    self.encoder = models.get_model("encoder", self.stage, s.preset, dtype=self.dtype)
    self.decoder = models.get_model("decoder", self.stage, s.preset, dtype=self.dtype)
    self.frozen["student_encoder"] = weights.resolve(
        s.encoder, "encoder", stage=self.stage, preset=s.preset, seed=config.seed + 103,
        weights_dir=config.weights_dir or None)

  def init(self, rng, batch):
    del batch
    s = self.config.student
    seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
    wdir = self.config.weights_dir or None
    teacher = None
    if s.init == "pruned":
      t = self.config.teacher
      teacher = weights.resolve(t.decoder, "decoder", stage=self.stage, preset=t.preset,
                                seed=self.config.seed + 102, weights_dir=wdir)
    decoder = weights.resolve(s.init, "decoder", stage=self.stage, preset=s.preset, seed=seed,
                              teacher=teacher, weights_dir=wdir)
    return {"params": {"decoder": decoder}, "model_state": {}}

  def loss(self, params, model_state, frozen, batch, rng):
    del rng
    image = self._images(batch["image"])
    t_feats = jax.lax.stop_gradient(self._teacher_feats(frozen, image))
    s_feat = jax.lax.stop_gradient(
        self.encoder.apply({"params": frozen["student_encoder"]}, image))
    rec = self.decoder.apply({"params": params["decoder"]}, s_feat)
    loss, metrics = self._reconstruction(frozen, rec, image, t_feats)
    return loss, (metrics, model_state)
