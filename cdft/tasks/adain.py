"""AdaIN's three training steps on the one trainer (spec adain.md §3).

Each batch holds content images (``batch['image']``, ``config.input``) and as
many style images (``batch['style']``, ``config.style_input``). E is the frozen
normalized VGG-19 to relu4_1 (pytorch-AdaIN's ceil-mode pooling), E_i its
relu{i}_1, and the style loss is pytorch-AdaIN's mean/std loss over E_1..E_4
(:func:`cdft.losses.adain_style`).

1. :class:`DecoderTask` (``adain_decoder``, pytorch-AdaIN's ``train.py``): the
   decoder D of E. ``t = AdaIN(E4(c), E4(s))``; loss =
   ``content·MSE(E4(D(t)), t) + style·style(E(D(t)), E(s))`` (1 and 10).
2. :class:`StudentTask` (``adain_student``, CD's ``TrainSE_With_AdaINDecoder2``):
   the 16x student SE and its heads aux_i, through the frozen AdaIN decoder:
   ``sd = D(AdaIN(aux4(SE(c)), aux4(SE(s))))``; loss = ``feat·Σ_i[MSE(aux_i c,
   E_i c) + MSE(aux_i s, E_i s)] + content·MSE(E4(sd), E4(c)) + style·style(E(sd),
   E(s))`` (10, 1, 10; the content target is the content's relu4_1, not t).
3. :class:`SmallDecoderTask` (``adain_small_decoder``, ours: the paper never
   published it): the 16x decoder SD of the frozen student SE, with AdaIN's
   losses measured by E: ``t' = AdaIN(SE4(c), SE4(s))``; loss =
   ``content·MSE(E4(SD(t')), AdaIN(E4(c), E4(s))) + style·style(E(SD(t')), E(s))``.
   The content target is AdaIN's t in E's space.

Crops must be multiples of 8, so that ceil and floor pooling agree and a
decoded image has the input's size (the original code asserts the same).
"""
import jax
import numpy as np

from cdft import losses
from cdft import models
from cdft import weights
from cdft.data import augment
from cdft.errors import CdftError
from cdft.models import adain
from cdft.models import family
from cdft.models import vgg

STAGE = 4  # relu4_1


def _check_crops(config):
  for name in ("input", "style_input"):
    inp = config.get(name)
    if inp is None:
      raise CdftError(f"an AdaIN task needs config.{name} (content and style images)")
    crop = inp.pp.get("crop")
    if crop is not None and crop % 8:
      raise CdftError(f"config.{name}.pp.crop must be a multiple of 8 for AdaIN, got {crop}")


def _seed(rng):
  return int(jax.random.randint(rng, (), 0, 2**31 - 1))


class _AdaINTask:
  """Shared pieces: the frozen VGG encoder E and the weights folder."""

  # The trainer compiles the step with these on a CPU backend.
  cpu_compiler_options = family.CPU_TRAIN_COMPILER_OPTIONS

  def __init__(self, config):
    _check_crops(config)
    if models.compute_dtype(config) is not None:
      raise CdftError("config.compute_dtype: the AdaIN tasks train in float32 only "
                      "(bfloat16 is for the CD and FT tasks)")
    self.config = config
    self.weights_dir = config.get("weights_dir") or None
    self.preset = config.teacher.preset  # E's widths (and the AdaIN decoder's)
    self.encoder = vgg.adain_encoder(self.preset)
    self.frozen = {"encoder": weights.resolve(
        config.teacher.encoder, "encoder", stage=STAGE, preset=self.preset,
        seed=config.seed + 101, weights_dir=self.weights_dir)}
    # The content and style crops as uint8, scaled to [0, 1] in the step.
    self._contents = augment.device_op(config.get("input"))
    self._styles = augment.device_op(config.get("style_input"))

  def _batch(self, batch):
    return self._contents(batch["image"]), self._styles(batch["style"])

  def _feats(self, frozen, x):
    """E_1..E_4 of ``x``: constants of the loss (the gradient flows only through ``x``)."""
    return self.encoder.apply({"params": frozen["encoder"]}, x, return_all=True)

  def _decoder_init(self, rng, preset):
    """The trained decoder's start (``config.init``) at ``preset`` widths."""
    params = weights.resolve(self.config.init, "decoder", stage=STAGE, preset=preset,
                             seed=_seed(rng), weights_dir=self.weights_dir)
    return {"params": {"decoder": params}, "model_state": {}}

  def _weighted(self, terms):
    w = self.config.loss
    total = sum(float(w[name]) * value for name, value in terms.items())
    return total, dict(terms)


class DecoderTask(_AdaINTask):
  """Step 1: pytorch-AdaIN's decoder of the frozen VGG (``adain_decoder``)."""

  def __init__(self, config):
    super().__init__(config)
    self.decoder = vgg.adain_decoder(self.preset)

  def init(self, rng, batch):
    del batch
    return self._decoder_init(rng, self.preset)

  def loss(self, params, model_state, frozen, batch, rng):
    del rng
    content, style = self._batch(batch)
    c_feats = jax.lax.stop_gradient(self._feats(frozen, content))
    s_feats = jax.lax.stop_gradient(self._feats(frozen, style))
    t = adain.adain(c_feats[-1], s_feats[-1])
    out_feats = self._feats(frozen, self.decoder.apply({"params": params["decoder"]}, t))
    loss, metrics = self._weighted({"content": losses.mse(out_feats[-1], t),
                                    "style": losses.adain_style(out_feats, s_feats)[0]})
    return loss, (metrics, model_state)


class StudentTask(_AdaINTask):
  """Step 2: CD's 16x AdaIN student through the frozen AdaIN decoder (``adain_student``)."""

  def __init__(self, config):
    super().__init__(config)
    self.teacher_decoder = vgg.adain_decoder(self.preset)
    self.frozen["decoder"] = weights.resolve(
        config.teacher.decoder, "decoder", stage=STAGE, preset=self.preset,
        seed=config.seed + 102, weights_dir=self.weights_dir)
    self.student = vgg.adain_encoder("16x")
    self.embedding = vgg.Embedding(stage=STAGE, widths=vgg.stage_widths("16x", STAGE),
                                   teacher_widths=vgg.stage_widths(self.preset, STAGE),
                                   relu=bool(config.student.updim_relu))

  def init(self, rng, batch):
    del batch
    seed = _seed(rng)
    s = self.config.student
    encoder = weights.resolve(s.init, "encoder", stage=STAGE, preset="16x", seed=seed,
                              teacher=self.frozen["encoder"], weights_dir=self.weights_dir)
    # The heads Q_i start fresh (PyTorch's default init), mapping to E's widths.
    probe = tuple(np.zeros((1, 1, 1, w), np.float32) for w in self.embedding.widths[:STAGE])
    embedding = jax.device_get(
        models.init(self.embedding, jax.random.key(seed + 1), probe)["params"])
    return {"params": {"encoder": encoder, "embedding": embedding}, "model_state": {}}

  def _embedded(self, params, x):
    feats = self.student.apply({"params": params["encoder"]}, x, return_all=True)
    return self.embedding.apply({"params": params["embedding"]}, feats)

  def loss(self, params, model_state, frozen, batch, rng):
    del rng
    content, style = self._batch(batch)
    aux_c, aux_s = self._embedded(params, content), self._embedded(params, style)
    sd = self.teacher_decoder.apply({"params": frozen["decoder"]},
                                    adain.adain(aux_c[-1], aux_s[-1]))
    terms = losses.cd_adain(aux_c, aux_s, self._feats(frozen, content),
                            self._feats(frozen, style), self._feats(frozen, sd))
    loss, metrics = self._weighted(terms)
    return loss, (metrics, model_state)


class SmallDecoderTask(_AdaINTask):
  """Step 3: the 16x AdaIN decoder of the frozen student (``adain_small_decoder``)."""

  def __init__(self, config):
    super().__init__(config)
    self.student = vgg.adain_encoder("16x")
    self.frozen["student_encoder"] = weights.resolve(
        config.student.encoder, "encoder", stage=STAGE, preset="16x", seed=config.seed + 103,
        weights_dir=self.weights_dir)
    self.decoder = vgg.adain_decoder("16x")

  def init(self, rng, batch):
    del batch
    return self._decoder_init(rng, "16x")

  def loss(self, params, model_state, frozen, batch, rng):
    del rng
    content, style = self._batch(batch)
    se = {"params": frozen["student_encoder"]}
    t_small = jax.lax.stop_gradient(adain.adain(self.student.apply(se, content),
                                                self.student.apply(se, style)))
    c_feats = jax.lax.stop_gradient(self._feats(frozen, content))
    s_feats = jax.lax.stop_gradient(self._feats(frozen, style))
    target = adain.adain(c_feats[-1], s_feats[-1])
    out_feats = self._feats(frozen, self.decoder.apply({"params": params["decoder"]}, t_small))
    loss, metrics = self._weighted({"content": losses.mse(out_feats[-1], target),
                                    "style": losses.adain_style(out_feats, s_feats)[0]})
    return loss, (metrics, model_state)
