r"""Factor Transfer, step 1: the paraphraser of a trained teacher (``train_Paraphraser.py``).

The paraphraser (spec ft.md §1.1: three 3x3 convs down to round(m*k) factor
channels and three back, LeakyReLU 0.1, no BN) learns to reconstruct the
frozen teacher's FT tap (``layer3`` output, after the last ReLU), teacher in
eval mode. Official recipe (§2.1, §4.8): L1 loss, SGD lr 0.1, momentum 0.9,
weight decay 5e-4, batch 128, 6 epochs (``range(0, 5 + 1)``; its MultiStepLR
milestones 150/225 are never reached, so the rate is constant).

  python launch/train.py --config configs/ft_paraphraser.py:teacher=resnet56,dataset=cifar10 \
      --workdir runs/ft_paraphraser_resnet56_cifar10

Arguments:
  teacher: the teacher's architecture (resnet56 by default; see ft_teacher.py);
    its run is read from ``runs/ft_teacher_<teacher>_<dataset>`` unless
    ``--config.teacher.workdir`` says otherwise.
  dataset: cifar10 (default) | cifar100 | digits.
  recipe: ft (default, official) | crd (RepDistiller's stage 1: MSE, lr 0.01,
    batch 64, 30 epochs).
  runlocal: digits with the runlocal teacher of ft_teacher.py (narrow ResNet),
    batch 32, the official 6 epochs at lr 0.1.
"""
import ml_collections

from cdft import configlib
from cdft.tasks import classification


def get_config(arg=None):
  """The config; ``arg`` like ``'teacher=resnet56,dataset=cifar10'``."""
  a = configlib.parse_arg(arg, teacher="resnet56", dataset="cifar10", recipe="ft",
                          runlocal=False)
  dataset = "digits" if a.runlocal else a.dataset
  config = ml_collections.ConfigDict()
  config.task = "ft_paraphraser"  # cdft.tasks registry name.
  configlib.trainer_defaults(config)
  config.input = classification.input_config(dataset, "train")  # Teacher features of these.
  config.num_classes = classification.NUM_CLASSES[dataset]  # The teacher's outputs.

  config.teacher = ml_collections.ConfigDict()  # The frozen teacher (eval mode).
  config.teacher.model = a.teacher  # Its architecture.
  config.teacher.widths = ()  # Its ResNet widths; () = the standard 16/32/64.
  # Its weights: the workdir of its ft_teacher run, a PyTorch .pth state dict, or 'random'.
  config.teacher.workdir = f"runs/ft_teacher_{a.teacher}_{dataset}"

  config.paraphraser = ml_collections.ConfigDict()  # The trained paraphraser.
  config.paraphraser.rate = 0.5  # Paraphrase rate k: factor channels round(m * k). Official: 0.5.

  config.loss = ml_collections.ConfigDict()  # The objective.
  config.loss.reconstruction = "l1"  # 'l1' (official nn.L1Loss) | 'mse' (RD, KDZ, TD).

  config.batch_size = 128  # Global batch. Official: 128.
  config.num_epochs = 6.0  # Official: range(0, 5 + 1) = 6 epochs.
  config.optimizer.name = "sgd"  # Official: torch.optim.SGD ...
  config.optimizer.learning_rate = 0.1  # ... lr 0.1, constant in practice ...
  config.optimizer.momentum = 0.9  # ... momentum 0.9 ...
  config.optimizer.weight_decay = 5e-4  # ... weight decay 5e-4 on every parameter.
  config.schedule.name = "constant"  # Official milestones 150/225 are never reached.
  config.log_every = 50  # Steps between metric lines.
  config.checkpoint_every = 1000  # Steps between checkpoints (and at the end).

  if a.recipe == "crd":
    config.loss.reconstruction = "mse"  # RD: nn.MSELoss ...
    config.optimizer.learning_rate = 0.01  # ... lr 0.01 (CIFAR ResNet/WRN students) ...
    config.batch_size = 64  # ... batch 64 ...
    config.num_epochs = 30.0  # ... init_epochs 30.
  elif a.recipe != "ft":
    raise ValueError(f"unknown recipe {a.recipe!r}; choose ft or crd")

  if a.runlocal:
    if a.teacher.startswith("resnet"):
      config.teacher.widths = (8, 16, 32)  # The runlocal teacher of ft_teacher.py.
    config.batch_size = 32  # 46 steps per epoch of the digits, as the runlocal teacher.
    config.log_every = 23  # Twice an epoch.
  return config
