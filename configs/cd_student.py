r"""Step 2 of Collaborative Distillation: the 16x student encoder.

The student SE_k (16/32/64/128/128 filters, L1-pruned from the teacher) and its
linear embeddings Q_i are trained so that (spec cd.md §3.3):
- every embedded relu_i_1 matches the teacher's: β·Σ_i MSE(Q_i·F′_i, F_i);
- the frozen teacher decoder of step 1, fed Q_k·F′_k, reconstructs the image:
  pixel + λ_p·perceptual (the *collaborative* term).
``distill.method`` picks the paper's ablation (Fig. 6): 'collaborative' (both),
'embedding_only', 'reconstruction_only'; or 'factor_transfer': Factor Transfer
on relu{k}_1 (a paraphraser pretrained by configs/cd_paraphraser.py, a
translator on the student) in place of the embedding loss, with the
collaborative reconstruction through Q_k kept.

  python launch/train.py --config configs/cd_student.py:stage=3 \
      --workdir runs/cd_student_stage3 --config.input.manual_dir=data/COCO/train2014 \
      --config.teacher.decoder=runs/cd_decoder_stage3

Arguments: ``stage=1..5`` (default 5), ``runlocal``.
"""
import ml_collections

from cdft import configlib


def get_config(arg=None):
  """The config; ``arg`` like ``'stage=3,runlocal'``."""
  a = configlib.parse_arg(arg, stage=5, runlocal=False)
  config = ml_collections.ConfigDict()
  config.task = "cd_student"  # cdft.tasks registry name.
  config.stage = a.stage  # Stage k: the student encodes up to relu{k}_1.
  configlib.trainer_defaults(config)
  config.input = configlib.images_input("data/COCO/train2014")  # Paper: COCO train2014.

  # Frozen teacher networks (each named as cdft.weights.resolve reads it).
  config.teacher = ml_collections.ConfigDict()
  config.teacher.encoder = configlib.DEFAULT_TEACHER_VGG  # Frozen VGG-19: .msgpack | .t7 | 'random'.
  config.teacher.preset = "vgg19"  # Width preset of the teacher encoder/decoder.
  # Frozen teacher decoder (step 1): its workdir, a .t7 decoder, or 'random'.
  config.teacher.decoder = f"runs/cd_decoder_stage{a.stage}"

  config.student = ml_collections.ConfigDict()  # The 16x student networks.
  config.student.preset = "16x"  # Width preset of the student.
  # Student init: 'pruned' (L1-largest filters of the teacher, paper), 'cd16x_base'
  # (the released pruned files), 'cd16x' (the released students), 'random', a workdir.
  config.student.init = "pruned"
  # Train the student's conv0 (the 1x1 RGB -> Caffe-BGR map) too: the official code does
  # (its optimizer takes every encoder parameter), though it is the teacher's fixed map.
  config.student.train_conv0 = True

  config.distill = ml_collections.ConfigDict()  # How the student is distilled.
  # 'collaborative' | 'embedding_only' | 'reconstruction_only' | 'factor_transfer'.
  config.distill.method = "collaborative"
  config.distill.beta = 10.0  # β, weight of the embedding loss. Paper: 10.
  # factor_transfer: the frozen paraphraser of relu{k}_1: its cd_paraphraser workdir or 'random'.
  config.distill.paraphraser = f"runs/cd_paraphraser_stage{a.stage}"
  config.distill.rate = 0.5  # factor_transfer: rate of a 'random' paraphraser (FT official: 0.5).
  # factor_transfer: β on the mean-reduced FT loss (FT's CIFAR value; untuned for VGG features).
  config.distill.beta_ft = 500.0

  config.loss = ml_collections.ConfigDict()  # Loss weights.
  config.loss.pixel = 1.0  # Weight of the reconstruction's pixel MSE. Paper: 1.
  config.loss.perceptual = 1.0  # λ_p of the reconstruction. Paper: 1.

  if a.runlocal:
    configlib.cd_runlocal(config, total_steps=300)  # ../shared photos, 128-px crops.
  return config
