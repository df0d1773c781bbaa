r"""AdaIN step 2: Collaborative Distillation's 16x student encoder for AdaIN.

The student SE (``SmallEncoder4_16x_aux``: widths 16/32/64/128, floor pooling)
and its 1x1 heads aux_i drive the frozen AdaIN decoder:
``sd = D(AdaIN(aux4(SE(c)), aux4(SE(s))))``; loss = 10·Σ_i [MSE(aux_i(c), E_i(c)) +
MSE(aux_i(s), E_i(s))] + 1·MSE(E4(sd), E4(c)) + 10·style(E(sd), E(s))
(spec adain.md §3, cd.md §3.7; the official history's TrainSE_With_AdaINDecoder2).

  python launch/train.py --config configs/adain_student.py --workdir runs/adain_student \
      --config.teacher.decoder=runs/adain_decoder \
      --config.input.manual_dir=data/COCO/train2014 \
      --config.style_input.manual_dir=data/wikiart/train

Arguments: ``runlocal`` (../shared/images content x style, 128-px crops).
"""
import ml_collections

from cdft import configlib


def get_config(arg=None):
  """The config; ``arg`` like ``'runlocal'``."""
  a = configlib.parse_arg(arg, runlocal=False)
  config = ml_collections.ConfigDict()
  config.task = "adain_student"  # cdft.tasks registry name.
  configlib.trainer_defaults(config)  # Adam 1e-4, batch 16, 20 epochs (official).
  config.input = configlib.images_input("data/COCO/train2014")  # Content: CD's loader.
  config.style_input = configlib.images_input("data/wikiart/train")  # Styles: CD's loader.

  config.teacher = ml_collections.ConfigDict()  # Frozen networks (cdft.weights.resolve).
  config.teacher.encoder = configlib.DEFAULT_TEACHER_VGG  # E: .msgpack | 'adain' | 'random'.
  config.teacher.preset = "vgg19"  # E's widths: 'vgg19' (the method) | '16x' (a narrow stand-in).
  config.teacher.decoder = "adain"  # D: adain_decoder workdir | 'adain' | .pth | 'random'.

  config.student = ml_collections.ConfigDict()  # The trained 16x student.
  config.student.init = "random"  # SE init: 'random' | 'pruned' (from E) | workdir.
  config.student.updim_relu = False  # ReLU after the aux heads (official default: off).

  config.loss = ml_collections.ConfigDict()  # Loss weights (official: 10 / 1 / 10).
  config.loss.feat = 10.0  # Embedding term on both images.
  config.loss.content = 1.0  # MSE(E4(sd), E4(c)).
  config.loss.style = 10.0  # Mean/std style loss of sd against the style.

  if a.runlocal:
    configlib.adain_runlocal(config, total_steps=300)  # ../shared contents x styles.
  return config
