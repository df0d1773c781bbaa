"""Shared pieces of the ml-collections configs in ``configs/``.

Config files call ``parse_arg`` on their ``get_config(arg)`` string and build on
``trainer_defaults`` / ``images_input``; every field is commented where it is
set. Nothing here derives one field from another: derived values go stale when
a field is overridden on the command line, so the trainer derives them.
"""
import ml_collections

# The normalized VGG-19 teacher of the CD configs: where ``cdft-weights
# normalize-vgg`` writes it by default.
DEFAULT_TEACHER_VGG = "~/.cache/cdft/vgg19_normalized.msgpack"


def parse_arg(arg, **defaults):
  """Parses ``'stage=3,runlocal'`` into a ConfigDict, typed like ``defaults``.

  A bare name sets a boolean to True. Unknown names are an error.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    name, _, value = item.partition("=")
    if name not in defaults:
      raise ValueError(f"unknown config argument {name!r}; known: {sorted(defaults)}")
    default = defaults[name]
    if isinstance(default, bool):
      out[name] = value.lower() in ("", "1", "true", "yes")
    elif isinstance(default, int):
      out[name] = int(value)
    elif isinstance(default, float):
      out[name] = float(value)
    else:
      out[name] = value
  return out


def trainer_defaults(config):
  """Adds the fields every training config shares (paper defaults of CD)."""
  config.seed = 0  # PRNG seed: parameter init, data order and augmentation.
  config.batch_size = 16  # Global batch (all devices, all hosts). Paper: 16.
  config.num_epochs = 20.0  # Training length in epochs (paper: 20) ...
  config.total_steps = -1  # ... unless this is positive: then exactly this many steps.

  config.optimizer = ml_collections.ConfigDict()  # Optimizer (optax).
  config.optimizer.name = "adam"  # 'adam' | 'sgd'. Paper: Adam.
  config.optimizer.learning_rate = 1e-4  # Base learning rate. Paper: 1e-4, no schedule.
  config.optimizer.b1 = 0.9  # Adam beta1 (PyTorch default).
  config.optimizer.b2 = 0.999  # Adam beta2 (PyTorch default).
  config.optimizer.eps = 1e-8  # Adam epsilon (PyTorch default).
  config.optimizer.momentum = 0.9  # SGD momentum (used when name='sgd').
  config.optimizer.nesterov = False  # SGD Nesterov momentum.
  config.optimizer.weight_decay = 0.0  # Coupled L2 (PyTorch weight_decay) on all params.

  config.schedule = ml_collections.ConfigDict()  # Learning-rate schedule.
  config.schedule.name = "constant"  # 'constant' | 'piecewise' | 'cosine' | 'inverse_time'.
  config.schedule.boundaries = ()  # Epochs at which 'piecewise' multiplies the rate ...
  config.schedule.decay = 0.1  # ... by this factor ('inverse_time': lr / (1 + decay * step)).

  # Device mesh (axis, size); -1 = all devices; sizes over fewer devices than a single
  # process has take the first ones. Data parallel.
  config.mesh = (("data", -1),)
  # The networks' computation dtype, 'float32' | 'bfloat16' (CD and FT tasks; parameters,
  # optimizer state, BatchNorm statistics and the losses' reductions stay float32).
  config.compute_dtype = "float32"
  # CPU hosts (launch/train.py): the batch split over several CPU devices of the same
  # cores is faster than one device, and the same step. Left alone when XLA_FLAGS sets a
  # device count.
  config.cpu_devices = -1  # CPU devices per process: -1 auto (up to 8, dividing the batch); 1.
  # CPU convolutions of the CIFAR ResNets and FT's paraphraser/translator: 'auto' runs
  # them on oneDNN where `pip install 'cdft[onednn]'` and a C++ compiler are there (2-3x
  # faster than XLA:CPU's), else on XLA with a warning; 'onednn' requires it; 'xla'.
  # GPU and TPU always use XLA's.
  config.cpu_conv = "auto"
  config.device_prefetch = 2  # Batches placed on the devices ahead of the step (0: none).
  config.log_every = 50  # Steps between metric lines (JSONL + console).
  config.checkpoint_every = 1000  # Steps between checkpoints (also saved at the end/on SIGTERM).
  config.checkpoint_every_epochs = 0.0  # Epochs between checkpoints; > 0 replaces checkpoint_every.
  config.keep_checkpoints = 3  # How many of the newest checkpoints to keep ...
  config.keep_every = 0  # ... plus every checkpoint at a multiple of this step (0: none).
  config.eval_every = 0  # Steps between held-out evaluations (0: never; tasks that have one).
  config.eval_every_epochs = 0.0  # Epochs between evaluations; > 0 replaces eval_every.
  config.eval_batch_size = 0  # Eval batch (0: batch_size).
  config.weights_dir = ""  # Model-zoo folder for 'cd16x'/'cd16x_base' ('' = $CDFT_WEIGHTS_DIR).
  return config


def images_input(manual_dir, crop=256, shorter_side=300):
  """``config.input`` for a folder of images with the paper's preprocessing."""
  inp = ml_collections.ConfigDict()
  inp.dataset = "image_folder"  # 'image_folder' (TFDS builder over manual_dir) | 'coco'.
  inp.manual_dir = manual_dir  # Folder of training images (image_folder).
  inp.data_dir = ""  # TFDS data_dir ('' = TFDS default, ~/tensorflow_datasets).
  inp.split = "train"  # Split to train on.
  inp.preprocess = "cd_train"  # Preprocessing (cdft.data.preprocess registry).
  inp.pp = ml_collections.ConfigDict()  # Keyword arguments of the preprocessing.
  inp.pp.shorter_side = shorter_side  # Resize so the shorter side is this (paper: 300) ...
  inp.pp.crop = crop  # ... then a random square crop of this size (paper: 256) ...
  inp.pp.flip = True  # ... and a random horizontal flip (paper: yes).
  # The crop ships as uint8 and is scaled to [0, 1] in the step (cdft.data.augment).
  inp.on_device = True
  # grain worker processes decoding and cropping whole batches (-1: one per two cores, 1-8;
  # 0: threads of the trainer process). The batches do not depend on it.
  inp.num_workers = -1
  return inp


def cd_runlocal(config, total_steps):
  """The ``runlocal`` variant of a CD config: real photos, small crops, 2 CPU cores."""
  config.batch_size = 8  # Fits 2 CPU cores.
  config.total_steps = total_steps  # A few minutes of CPU.
  config.input.manual_dir = "../shared/images/content"  # Real photos beside the repo.
  config.input.pp.shorter_side = 144  # Smaller images ...
  config.input.pp.crop = 128  # ... and crops.
  config.log_every = 10  # More frequent progress.
  config.checkpoint_every = 100  # Resume points.
  return config


def adain_input(manual_dir):
  """``config.input`` / ``config.style_input`` of pytorch-AdaIN: 512 x 512, random 256 crop."""
  inp = images_input(manual_dir)
  inp.preprocess = "adain_train"  # pytorch-AdaIN: Resize((512, 512)) then RandomCrop(256).
  inp.pp = ml_collections.ConfigDict()  # Keyword arguments of the preprocessing.
  inp.pp.size = 512  # Square resize (aspect ratio not kept).
  inp.pp.crop = 256  # Random square crop (a multiple of 8).
  return inp


def adain_runlocal(config, total_steps):
  """The ``runlocal`` variant of an AdaIN config: ../shared contents x styles, 2 CPU cores."""
  config.batch_size = 8  # Fits 2 CPU cores.
  config.total_steps = total_steps  # A few minutes of CPU.
  for inp, folder in ((config.input, "content"), (config.style_input, "style")):
    inp.manual_dir = f"../shared/images/{folder}"  # Real photos / artworks beside the repo.
    if inp.preprocess == "adain_train":
      inp.pp.size = 160  # Smaller images ...
    else:
      inp.pp.shorter_side = 144  # Smaller images ...
    inp.pp.crop = 128  # ... and crops (a multiple of 8).
  config.log_every = 10  # More frequent progress.
  config.checkpoint_every = 100  # Resume points.
  return config


def ft_classifier_recipe(config, recipe="ft", runlocal=False):
  """The training recipe of FT's teacher and student classifiers (spec ft.md §2.2, §3.2).

  ``recipe='ft'``: the official FT code; ``'crd'``: RepDistiller's CIFAR-100
  recipe. ``runlocal``: the digits schedule for 2 CPU cores (the networks'
  widths are the config's business).
  """
  config.batch_size = 128  # Global batch. Official: 128.
  config.num_epochs = 164.0  # Official: range(0, 163 + 1) = 164 epochs.
  config.optimizer.name = "sgd"  # Official: torch.optim.SGD (student and translator) ...
  config.optimizer.learning_rate = 0.1  # ... lr 0.1 ...
  config.optimizer.momentum = 0.9  # ... momentum 0.9 (not Nesterov) ...
  config.optimizer.weight_decay = 5e-4  # ... weight decay 5e-4 on every parameter.
  config.schedule.name = "piecewise"  # MultiStepLR, stepped per epoch ...
  config.schedule.boundaries = (82, 123)  # ... milestones [82, 123] (epochs) ...
  config.schedule.decay = 0.1  # ... gamma 0.1.
  config.eval_every_epochs = 5.0  # Test accuracy every 5 epochs (and at the end), any batch size.
  config.checkpoint_every_epochs = 10.0  # Every 10 epochs (and at the end / on SIGTERM).
  if recipe == "crd":
    config.batch_size = 64  # RD: batch 64 ...
    config.optimizer.learning_rate = 0.05  # ... lr 0.05 (CIFAR ResNets / WRNs) ...
    config.num_epochs = 240.0  # ... for 240 epochs ...
    config.schedule.boundaries = (150, 180, 210)  # ... x0.1 from 1-indexed epochs 151/181/211.
  elif recipe != "ft":
    raise ValueError(f"unknown recipe {recipe!r}; choose ft or crd")
  if runlocal:
    config.batch_size = 32  # 46 steps per epoch of the 1,500 training digits ...
    config.optimizer.learning_rate = 0.05  # ... at half the rate ...
    config.num_epochs = 6.0  # ... for 6 epochs ...
    config.schedule.name = "cosine"  # ... with a cosine decay (164 epochs' steps do not shrink).
    config.log_every = 23  # Twice an epoch.
    config.eval_every_epochs = 2.0  # Every 2 epochs.
    config.checkpoint_every_epochs = 0.0  # checkpoint_every steps instead ...
    config.checkpoint_every = 1000  # ... so only at the end.
  return config
