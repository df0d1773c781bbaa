r"""Step 1 of Collaborative Distillation: a decoder for the frozen normalized VGG-19.

Trains the stage-k decoder (relu{k}_1 -> RGB) with loss (1): pixel MSE +
λ_p·Σ_i MSE of relu_i_1 (i <= k) of the teacher (spec cd.md §3.1-3.2).

  python launch/train.py --config configs/cd_decoder.py:stage=3 \
      --workdir runs/cd_decoder_stage3 --config.input.manual_dir=data/COCO/train2014

Arguments: ``stage=1..5`` (default 5); ``runlocal`` for a small run on one CPU
(the photos of ../shared/images/content, 128-px crops, a few hundred steps).
"""
import ml_collections

from cdft import configlib


def get_config(arg=None):
  """The config; ``arg`` like ``'stage=3,runlocal'``."""
  a = configlib.parse_arg(arg, stage=5, runlocal=False)
  config = ml_collections.ConfigDict()
  config.task = "cd_decoder"  # cdft.tasks registry name.
  config.stage = a.stage  # Network stage k: the decoder inverts relu{k}_1.
  configlib.trainer_defaults(config)
  config.input = configlib.images_input("data/COCO/train2014")  # Paper: COCO train2014.

  # Frozen teacher networks (each named as cdft.weights.resolve reads it).
  config.teacher = ml_collections.ConfigDict()
  config.teacher.encoder = configlib.DEFAULT_TEACHER_VGG  # Frozen VGG-19: .msgpack | .t7 | 'random'.
  config.teacher.preset = "vgg19"  # Width preset of the teacher (and of this decoder).

  config.init = "random"  # Decoder init: 'random' | .t7 decoder | workdir (fine-tune).

  config.loss = ml_collections.ConfigDict()  # Loss weights.
  config.loss.pixel = 1.0  # Weight of the pixel MSE.
  config.loss.perceptual = 1.0  # λ_p, weight of Σ_i MSE(relu_i_1). Paper: 1.

  if a.runlocal:
    configlib.cd_runlocal(config, total_steps=300)  # ../shared photos, 128-px crops.
  return config
