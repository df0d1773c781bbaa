r"""Step 3 of Collaborative Distillation: the small decoder of the frozen student.

SD_k is trained on the frozen student encoder of step 2 with loss (1): pixel
MSE + λ_p·Σ_i MSE of the *teacher's* relu_i_1 (spec cd.md §3.4).

  python launch/train.py --config configs/cd_small_decoder.py:stage=3 \
      --workdir runs/cd_small_decoder_stage3 --config.input.manual_dir=data/COCO/train2014 \
      --config.student.encoder=runs/cd_student_stage3

Arguments: ``stage=1..5`` (default 5), ``runlocal``.
"""
import ml_collections

from cdft import configlib


def get_config(arg=None):
  """The config; ``arg`` like ``'stage=3,runlocal'``."""
  a = configlib.parse_arg(arg, stage=5, runlocal=False)
  config = ml_collections.ConfigDict()
  config.task = "cd_small_decoder"  # cdft.tasks registry name.
  config.stage = a.stage  # Stage k: the decoder inverts the student's relu{k}_1.
  configlib.trainer_defaults(config)
  config.input = configlib.images_input("data/COCO/train2014")  # Paper: COCO train2014.

  # Frozen teacher networks (each named as cdft.weights.resolve reads it).
  config.teacher = ml_collections.ConfigDict()
  config.teacher.encoder = configlib.DEFAULT_TEACHER_VGG  # Perceptual network: .msgpack | .t7 | 'random'.
  config.teacher.preset = "vgg19"  # Width preset of the teacher.
  # Teacher decoder (step 1), only read to prune the init when student.init='pruned'.
  config.teacher.decoder = f"runs/cd_decoder_stage{a.stage}"

  config.student = ml_collections.ConfigDict()  # The 16x student networks.
  config.student.preset = "16x"  # Width preset of the student encoder and this decoder.
  # Frozen student encoder: the step-2 workdir, 'cd16x' (released kSE.pth) or 'random'.
  config.student.encoder = f"runs/cd_student_stage{a.stage}"
  # Decoder init: 'pruned' (L1-pruned teacher decoder), 'cd16x_base', 'random', a workdir.
  config.student.init = "pruned"

  config.loss = ml_collections.ConfigDict()  # Loss weights.
  config.loss.pixel = 1.0  # Weight of the pixel MSE.
  # λ_p. The paper says loss (1) with λ_p = 1; the official README commands use 0.01.
  config.loss.perceptual = 1.0

  if a.runlocal:
    configlib.cd_runlocal(config, total_steps=300)  # ../shared photos, 128-px crops.
  return config
