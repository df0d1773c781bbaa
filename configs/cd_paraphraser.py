r"""Factor Transfer for the CD student, step 1: the paraphraser of the teacher's relu{k}_1.

The Factor Transfer paraphraser (spec ft.md §1.1) learns to reconstruct the
frozen normalized VGG-19's relu{k}_1 on the CD training images; a
``cd_student`` run with ``--config.distill.method=factor_transfer`` then
transfers its factor to the 16x student in place of the embedding loss.
The FT paper has no VGG recipe, so this one is CD's (Adam 1e-4, batch 16, the
256-px crops of COCO) for one epoch (as torchdistill's ImageNet paraphraser),
with FT's official L1 reconstruction and rate 0.5.

  python launch/train.py --config configs/cd_paraphraser.py:stage=3 \
      --workdir runs/cd_paraphraser_stage3 --config.input.manual_dir=data/COCO/train2014
  python launch/train.py --config configs/cd_student.py:stage=3 \
      --workdir runs/cd_student_ft_stage3 --config.input.manual_dir=data/COCO/train2014 \
      --config.teacher.decoder=runs/cd_decoder_stage3 \
      --config.distill.method=factor_transfer --config.distill.paraphraser=runs/cd_paraphraser_stage3

Arguments: ``stage=1..5`` (default 5); ``runlocal`` for a small run on one CPU
(the photos of ../shared/images/content, 128-px crops, a hundred steps).
"""
import ml_collections

from cdft import configlib


def get_config(arg=None):
  """The config; ``arg`` like ``'stage=3,runlocal'``."""
  a = configlib.parse_arg(arg, stage=5, runlocal=False)
  config = ml_collections.ConfigDict()
  config.task = "cd_paraphraser"  # cdft.tasks registry name.
  config.stage = a.stage  # Stage k: the paraphraser reconstructs relu{k}_1.
  configlib.trainer_defaults(config)
  config.input = configlib.images_input("data/COCO/train2014")  # CD's training images.
  config.num_epochs = 1.0  # One pass (torchdistill's ImageNet paraphraser: 1 epoch).

  config.teacher = ml_collections.ConfigDict()  # The frozen teacher encoder.
  config.teacher.encoder = configlib.DEFAULT_TEACHER_VGG  # Frozen VGG-19: .msgpack | .t7 | 'random'.
  config.teacher.preset = "vgg19"  # Width preset of the teacher.

  config.paraphraser = ml_collections.ConfigDict()  # The trained paraphraser.
  config.paraphraser.rate = 0.5  # Paraphrase rate k: factor channels round(m * k). FT: 0.5.

  config.loss = ml_collections.ConfigDict()  # The objective.
  config.loss.reconstruction = "l1"  # 'l1' (FT official nn.L1Loss) | 'mse'.

  if a.runlocal:
    configlib.cd_runlocal(config, total_steps=100)  # ../shared photos, 128-px crops.
  return config
