r"""Factor Transfer, step 0: the teacher classifier (official ``train_teacher.py``).

Cross-entropy, SGD lr 0.1, momentum 0.9, weight decay 5e-4 on all parameters,
batch 128, 164 epochs (the official ``range(0, 163 + 1)``) with the rate x0.1
after epochs 82 and 123, augmentation zero-pad 4 + random crop 32 + flip (spec
ft.md §2.2, §4.8, §4.14). The data pipeline drops the last partial batch, so an
epoch of CIFAR at batch 128 is 390 steps (official: 391, the last one of 80
images): the run and its decays come 0.26 % earlier in steps, on the same
number of epochs.

  python launch/train.py --config configs/ft_teacher.py:model=resnet56,dataset=cifar10 \
      --workdir runs/ft_teacher_resnet56_cifar10

Arguments:
  model: resnet20 | resnet32 | resnet56 (default) | resnet110 | wrn_16_2 |
    wrn_40_1 | wrn_40_2.
  dataset: cifar10 (default) | cifar100 | digits.
  recipe: ft (default, the official FT recipe above) | crd (RepDistiller's
    CIFAR-100 teacher recipe: batch 64, lr 0.05, 240 epochs, x0.1 after 150,
    180 and 210).
  runlocal: digits (the dataset argument is ignored), a narrow network
    (ResNets at widths 8/16/32), batch 32, lr 0.05 with a cosine decay over 6
    epochs (the 164-epoch step schedule does not shrink to a few epochs):
    a narrow ResNet-20 reaches about 97 % test accuracy in ~40 s on one CPU
    device (a narrow ResNet-56 about 95 % in ~90 s).
"""
import ml_collections

from cdft import configlib
from cdft.tasks import classification


def get_config(arg=None):
  """The config; ``arg`` like ``'model=resnet56,dataset=cifar10'``."""
  a = configlib.parse_arg(arg, model="resnet56", dataset="cifar10", recipe="ft",
                          runlocal=False)
  dataset = "digits" if a.runlocal else a.dataset
  config = ml_collections.ConfigDict()
  config.task = "classifier"  # cdft.tasks registry name.
  configlib.trainer_defaults(config)
  config.input = classification.input_config(dataset, "train")  # Training split.
  config.eval_input = classification.input_config(dataset, "test", train=False)  # Held out.
  config.num_classes = classification.NUM_CLASSES[dataset]  # Classifier outputs.

  config.model = ml_collections.ConfigDict()  # The classifier (cdft.models.get_classifier).
  config.model.name = a.model  # Architecture name.
  config.model.widths = ()  # ResNet stem/group widths; () = the standard 16/32/64.

  configlib.ft_classifier_recipe(config, a.recipe, a.runlocal)  # Optimizer, schedule.

  if a.runlocal:
    if a.model.startswith("resnet"):
      config.model.widths = (8, 16, 32)  # Narrow: fast on a CPU, still 95-97 % on digits.
  return config
