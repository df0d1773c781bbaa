r"""AdaIN step 3 (ours; the paper never published it): the 16x decoder of the frozen student.

``t' = AdaIN(SE4(c), SE4(s))`` (128 channels; the aux heads are dropped); loss =
1·MSE(E4(SD(t')), AdaIN(E4(c), E4(s))) + 10·style(E(SD(t')), E(s)): AdaIN's two
losses, measured by the big encoder E, against AdaIN's target in E's space
(spec adain.md §3).

  python launch/train.py --config configs/adain_small_decoder.py \
      --workdir runs/adain_small_decoder --config.student.encoder=runs/adain_student \
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
  config.task = "adain_small_decoder"  # cdft.tasks registry name.
  configlib.trainer_defaults(config)
  config.batch_size = 8  # As the AdaIN decoder recipe.
  config.total_steps = 160_000  # As the AdaIN decoder recipe.
  config.checkpoint_every = 10_000  # As the AdaIN decoder recipe.
  config.schedule.name = "inverse_time"  # lr / (1 + decay * step), as pytorch-AdaIN ...
  config.schedule.decay = 5e-5  # ... lr_decay 5e-5.
  config.input = configlib.adain_input("data/COCO/train2014")  # Content images.
  config.style_input = configlib.adain_input("data/wikiart/train")  # Style images.

  config.teacher = ml_collections.ConfigDict()  # The frozen loss network E.
  config.teacher.encoder = configlib.DEFAULT_TEACHER_VGG  # .msgpack | 'adain' | 'random'.
  config.teacher.preset = "vgg19"  # E's widths: 'vgg19' (the method) | '16x' (a narrow stand-in).

  config.student = ml_collections.ConfigDict()  # The frozen 16x student.
  config.student.encoder = "random"  # SE: adain_student workdir | 'random'.

  config.init = "random"  # Small decoder init: 'random' | workdir.

  config.loss = ml_collections.ConfigDict()  # Loss weights.
  config.loss.content = 1.0  # As pytorch-AdaIN.
  config.loss.style = 10.0  # As pytorch-AdaIN.

  if a.runlocal:
    configlib.adain_runlocal(config, total_steps=300)  # ../shared contents x styles.
  return config
