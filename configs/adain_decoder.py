r"""AdaIN step 1: pytorch-AdaIN's decoder for the frozen normalized VGG-19 (relu4_1).

``t = AdaIN(E4(c), E4(s))``; loss = 1·MSE(E4(D(t)), t) + 10·Σ_i [MSE of the
means + MSE of the stds of relu_i_1, i = 1..4] (spec adain.md §3, train.py).

  python launch/train.py --config configs/adain_decoder.py \
      --workdir runs/adain_decoder --config.input.manual_dir=data/COCO/train2014 \
      --config.style_input.manual_dir=data/wikiart/train

Arguments: ``runlocal`` for a small run on one CPU (../shared/images content x
style, 128-px crops, a few hundred steps).
"""
import ml_collections

from cdft import configlib


def get_config(arg=None):
  """The config; ``arg`` like ``'runlocal'``."""
  a = configlib.parse_arg(arg, runlocal=False)
  config = ml_collections.ConfigDict()
  config.task = "adain_decoder"  # cdft.tasks registry name.
  configlib.trainer_defaults(config)
  config.batch_size = 8  # pytorch-AdaIN: 8.
  config.total_steps = 160_000  # pytorch-AdaIN: 160k iterations.
  config.checkpoint_every = 10_000  # pytorch-AdaIN: save_model_interval 10k.
  config.schedule.name = "inverse_time"  # pytorch-AdaIN: lr / (1 + lr_decay * iteration) ...
  config.schedule.decay = 5e-5  # ... lr_decay 5e-5.
  config.input = configlib.adain_input("data/COCO/train2014")  # Content images. Paper: COCO.
  config.style_input = configlib.adain_input("data/wikiart/train")  # Style images: WikiArt.

  config.teacher = ml_collections.ConfigDict()  # The frozen encoder E (cdft.weights.resolve).
  config.teacher.encoder = configlib.DEFAULT_TEACHER_VGG  # .msgpack | 'adain' | .pth | 'random'.
  config.teacher.preset = "vgg19"  # E's widths: 'vgg19' (the method) | '16x' (a narrow stand-in).

  config.init = "random"  # Decoder init: 'random' | 'adain' | decoder.pth | workdir.

  config.loss = ml_collections.ConfigDict()  # Loss weights.
  config.loss.content = 1.0  # pytorch-AdaIN content_weight.
  config.loss.style = 10.0  # pytorch-AdaIN style_weight.

  if a.runlocal:
    configlib.adain_runlocal(config, total_steps=300)  # ../shared contents x styles.
  return config
