"""CD training losses against an independent numpy computation on tiny inputs."""
import jax
import ml_collections
import numpy as np
import pytest

from cdft import losses
from cdft import models
from cdft.models import factor_transfer as ft_models
from cdft.tasks import style


def _np_mse(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return np.mean((a - b) ** 2)


def test_mse_and_reconstruction_match_numpy():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((2, 2, 5, 4, 3)).astype(np.float32)
  fa = [rng.standard_normal((2, 4, 4, c)).astype(np.float32) for c in (3, 6)]
  fb = [rng.standard_normal((2, 4, 4, c)).astype(np.float32) for c in (3, 6)]
  assert float(losses.mse(a, b)) == pytest.approx(_np_mse(a, b), rel=1e-6)
  total, parts = losses.reconstruction(a, b, fa, fb, 2.0, 0.5)
  want = 2.0 * _np_mse(a, b) + 0.5 * (_np_mse(fa[0], fb[0]) + _np_mse(fa[1], fb[1]))
  assert float(total) == pytest.approx(want, rel=1e-6)
  assert float(parts["perceptual"]) == pytest.approx(want / 0.5 - 4 * _np_mse(a, b), rel=1e-5)
  with pytest.raises(ValueError, match="2 vs 1 feature maps"):
    losses.perceptual(fa, fb[:1])


def _config(method):
  c = ml_collections.ConfigDict()
  c.stage, c.seed, c.weights_dir = 2, 0, ""
  c.teacher = ml_collections.ConfigDict(
      {"encoder": "random", "decoder": "random", "preset": "vgg19"})
  c.student = ml_collections.ConfigDict({"preset": "16x", "init": "random"})
  c.distill = ml_collections.ConfigDict({"method": method, "beta": 10.0, "beta_ft": 50.0,
                                         "paraphraser": "random", "rate": 0.5})
  c.loss = ml_collections.ConfigDict({"pixel": 1.0, "perceptual": 0.7})
  return c


@pytest.mark.parametrize("method", style.METHODS)
def test_student_loss_composition(method):
  task = style.StudentEncoderTask(_config(method))
  x = np.random.default_rng(1).random((2, 12, 12, 3), dtype=np.float32)
  params = task.init(jax.random.key(0), {"image": x})["params"]
  loss, (metrics, _) = task.loss(params, {}, task.frozen, {"image": x}, jax.random.key(1))

  # Independent recomputation: network outputs from the modules, the embedding as
  # a numpy matmul of the 1x1 heads, every loss term in float64 numpy.
  enc = models.get_model("encoder", 2, "vgg19")
  t_feats = enc.apply({"params": task.frozen["teacher_encoder"]}, x, return_all=True)
  s_feats = models.get_model("encoder", 2, "16x").apply(
      {"params": params["encoder"]}, x, return_all=True)
  embedded = []
  for i, f in enumerate(s_feats):
    head = params["embedding"][f"conv{i + 1}1_aux"]
    w = np.asarray(head["kernel"]).reshape(-1, head["kernel"].shape[-1])
    embedded.append(np.asarray(f, np.float64) @ w + np.asarray(head["bias"]))
  feat = sum(_np_mse(e, t) for e, t in zip(embedded, t_feats))
  ft_term = None
  if method == "factor_transfer":
    # FT on relu2_1: the frozen paraphraser's factor of the teacher feature and the
    # translator's of the student one, each L2-normalised per sample, mean |diff|.
    factor_t = task.paraphraser.apply({"params": task.frozen["paraphraser"]}, t_feats[-1],
                                      method=ft_models.Paraphraser.encode)
    factor_s = task.translator.apply({"params": params["translator"]}, s_feats[-1])

    def unit(f):
      f = np.asarray(f, np.float64).reshape(len(f), -1)
      return f / np.linalg.norm(f, axis=1, keepdims=True)

    ft_term = np.mean(np.abs(unit(factor_s) - unit(factor_t)))
    assert float(metrics["ft"]) == pytest.approx(ft_term, rel=2e-5)
    assert "embedding" not in metrics
  if method == "embedding_only":
    assert "teacher_decoder" not in task.frozen  # not even loaded
    assert float(loss) == pytest.approx(10 * feat, rel=2e-5)
    return
  rec = models.get_model("decoder", 2, "vgg19").apply(
      {"params": task.frozen["teacher_decoder"]}, embedded[-1].astype(np.float32))
  pix = _np_mse(rec, x)
  perc = sum(_np_mse(a, b) for a, b in zip(enc.apply(
      {"params": task.frozen["teacher_encoder"]}, rec, return_all=True), t_feats))
  want = {"collaborative": 10 * feat + pix + 0.7 * perc,
          "reconstruction_only": pix + 0.7 * perc,
          "factor_transfer": (50 * ft_term if ft_term is not None else 0) + pix + 0.7 * perc,
          }[method]
  assert float(loss) == pytest.approx(want, rel=2e-5)
  assert float(metrics["pixel"]) == pytest.approx(pix, rel=2e-5)
  assert ("embedding" in metrics) == (method == "collaborative")


def test_unknown_method_is_a_clear_error():
  with pytest.raises(Exception, match="unknown method 'kd'"):
    style.StudentEncoderTask(_config("kd"))
