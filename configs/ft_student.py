r"""Factor Transfer, step 2: the student, plain or distilled (``train_student.py``).

``method=ft`` is the official Factor Transfer (spec ft.md §2.2): loss =
CE + β·mean|FT(translator(student layer3)) - FT(paraphraser(teacher layer3))|,
β = 500, FT = per-sample L2 normalisation of the flattened factor; the
translator is trained with the student (one SGD: lr 0.1, momentum 0.9, wd 5e-4,
the official two identical optimizers), the teacher and its paraphraser stay
frozen in eval mode. Batch 128, 164 epochs, x0.1 after epochs 82 and 123 (the
pipeline drops the last partial batch: 390 steps per CIFAR epoch, official
391). The baselines share the recipe: ``none`` (CE only), ``kd`` (Hinton,
0.1·CE + 0.9·T²·KL, T = 4: RD's -r 0.1 -a 0.9), ``fitnets`` (CE + 100·hint MSE
on layer2 through a conv-BN-ReLU regressor: RD's -b 100), ``at`` (CE +
1000·Σ attention transfer over the three groups: RD's -b 1000).

  python launch/train.py \
      --config configs/ft_student.py:pair=resnet56_resnet20,method=ft,dataset=cifar10 \
      --workdir runs/ft_student_resnet56_resnet20_ft_cifar10

Arguments:
  pair: teacher_student, one of PAIRS (default resnet56_resnet20, the official
    CIFAR-10 pair). The others are the CRD CIFAR-100 pairs of spec §3.2 whose
    networks cdft has (resnet32x4/resnet8x4, VGG, MobileNetV2, ShuffleNet and
    ResNet-50 are not implemented).
  method: none | kd | fitnets | at | ft (default).
  dataset: cifar10 (default) | cifar100 | digits.
  recipe: ft (default, official) | crd (RepDistiller: batch 64, lr 0.05, 240
    epochs, x0.1 after 150/180/210; RD reports the last epoch; the FT loss
    stays the official one, not RD's attention-style variant, spec §4.1).
  runlocal: digits with the runlocal teacher and paraphraser (narrow ResNets,
    widths 8/16/32), the runlocal schedule of ft_teacher.py (batch 32, lr
    0.05, cosine over 6 epochs): a minute or two on 2 CPU cores.

The teacher and the paraphraser are read from their runs' workdirs
(``runs/ft_teacher_<teacher>_<dataset>``, ``runs/ft_paraphraser_<teacher>_<dataset>``)
unless ``--config.teacher.workdir`` / ``--config.distill.paraphraser`` say otherwise.
"""
import ml_collections

from cdft import configlib
from cdft.tasks import classification

# name: (teacher, student).
PAIRS = {
    "resnet56_resnet20": ("resnet56", "resnet20"),  # Official FT (CIFAR-10); CRD table.
    "resnet110_resnet20": ("resnet110", "resnet20"),  # CRD CIFAR-100.
    "resnet110_resnet32": ("resnet110", "resnet32"),  # CRD CIFAR-100.
    "wrn_40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2"),  # CRD CIFAR-100.
    "wrn_40_2_wrn_40_1": ("wrn_40_2", "wrn_40_1"),  # CRD CIFAR-100.
}


def get_config(arg=None):
  """The config; ``arg`` like ``'pair=resnet56_resnet20,method=ft,dataset=cifar10'``."""
  a = configlib.parse_arg(arg, pair="resnet56_resnet20", method="ft", dataset="cifar10",
                          recipe="ft", runlocal=False)
  if a.pair not in PAIRS:
    raise ValueError(f"unknown pair {a.pair!r}; choose from {', '.join(PAIRS)}")
  teacher, student = PAIRS[a.pair]
  dataset = "digits" if a.runlocal else a.dataset
  config = ml_collections.ConfigDict()
  config.task = "ft_student"  # cdft.tasks registry name.
  configlib.trainer_defaults(config)
  config.input = classification.input_config(dataset, "train")  # Training split.
  config.eval_input = classification.input_config(dataset, "test", train=False)  # Held out.
  config.num_classes = classification.NUM_CLASSES[dataset]  # Classifier outputs.

  config.student = ml_collections.ConfigDict()  # The trained student.
  config.student.model = student  # Its architecture.
  config.student.widths = ()  # Its ResNet widths; () = the standard 16/32/64.

  config.teacher = ml_collections.ConfigDict()  # The frozen teacher (eval mode; unused by 'none').
  config.teacher.model = teacher  # Its architecture.
  config.teacher.widths = ()  # Its ResNet widths; () = the standard 16/32/64.
  # Its weights: the workdir of its ft_teacher run, a PyTorch .pth state dict, or 'random'.
  config.teacher.workdir = f"runs/ft_teacher_{teacher}_{dataset}"

  config.distill = ml_collections.ConfigDict()  # How the student is distilled.
  config.distill.method = a.method  # 'none' | 'kd' | 'fitnets' | 'at' | 'ft'.
  config.distill.beta_ft = 500.0  # FT: β on the mean-reduced FT loss. Official: 500.
  # FT: the frozen paraphraser: its ft_paraphraser workdir, an official Paraphraser.pth,
  # 'released' (the released ResNet-56 one) or 'random'.
  config.distill.paraphraser = f"runs/ft_paraphraser_{teacher}_{dataset}"
  config.distill.rate = 0.5  # FT: rate of a 'random' paraphraser (loaded ones keep theirs).
  config.distill.kd_alpha = 0.9  # KD: loss = (1 - α)·CE + α·KD. RD: α 0.9 (-r 0.1 -a 0.9).
  config.distill.kd_temperature = 4.0  # KD: temperature T. RD: 4.
  config.distill.beta_fitnets = 100.0  # FitNets: β on the hint MSE. RD: 100.
  config.distill.hint_layer = "layer2"  # FitNets: the guided/hint layer. RD: feat[2] = layer2.
  config.distill.beta_at = 1000.0  # AT: β on the summed attention losses. RD: 1000.

  configlib.ft_classifier_recipe(config, a.recipe, a.runlocal)  # Optimizer, schedule.

  if a.runlocal:
    if teacher.startswith("resnet"):
      config.teacher.widths = (8, 16, 32)  # The runlocal teacher of ft_teacher.py.
    if student.startswith("resnet"):
      config.student.widths = (8, 16, 32)  # As narrow as the runlocal teacher.
  return config
