"""The VGG-19 family as data, importable without Flax.

What the stylization command needs to find, key and plan a program without
building a network: block depths and width presets, layer names, and
:class:`LevelModel` with :class:`ModuleSpec`, a registry module named by data
and built (importing Flax) on first use. A warm ``cdft-stylize`` process loads
its compiled programs from the cache and never builds a module, so it does not
import Flax (0.2-0.3 s of its start-up). :mod:`cdft.models.vgg` holds the
modules themselves and re-exports these names.
"""
import dataclasses

# 3x3 convolutions per VGG-19 block.
BLOCK_DEPTHS = (2, 2, 4, 4, 4)
VGG19_WIDTHS = (64, 128, 256, 512, 512)
CD16X_WIDTHS = (16, 32, 64, 128, 128)
CD16X_STAGE1_WIDTH = 24

WIDTH_PRESETS = {"vgg19": VGG19_WIDTHS, "16x": CD16X_WIDTHS}

# XLA:CPU compile options of this family's training steps: no YNNPACK
# convolution fusions (they allocate scratch memory on every call, which the
# kernel pages in afresh). Measured on a 2-core AVX-512 VM, CD step 2 at stage
# 3 (batch 16 at 256^2, 8 CPU devices): 20.3 s a step with them, 13.7 s
# without. The CIFAR ResNets are faster with them (FT teacher 65 img/s
# against 59), so they keep XLA's defaults. The stylization entry points set
# the same option for the whole process (cdft.stylize.cpu_tuning).
CPU_TRAIN_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def stage_widths(preset, stage):
  """Block widths of the stage-``stage`` network of a preset ('vgg19' or '16x').

  The 16x stage-1 encoder/decoder alone uses 24 filters at conv1_1 (as released).
  """
  if preset not in WIDTH_PRESETS:
    raise ValueError(f"unknown width preset {preset!r}; choose from {sorted(WIDTH_PRESETS)}")
  widths = WIDTH_PRESETS[preset]
  if preset == "16x" and stage == 1:
    widths = (CD16X_STAGE1_WIDTH,) + widths[1:]
  return tuple(widths)


def check_stage(stage):
  if stage not in (1, 2, 3, 4, 5):
    raise ValueError(f"stage must be 1..5, got {stage}")


def encoder_layer_names(stage):
  """Conv names of a stage-k encoder in forward order (without conv0)."""
  names = []
  for block in range(1, stage + 1):
    depth = 1 if block == stage else BLOCK_DEPTHS[block - 1]
    names += [f"conv{block}{i}" for i in range(1, depth + 1)]
  return names


def decoder_layer_names(stage):
  """Conv names of a stage-k decoder in forward order (deepest first)."""
  names = []
  for block in range(stage, 0, -1):
    depth = 1 if block == stage else BLOCK_DEPTHS[block - 1]
    names += [f"conv{block}{i}" for i in range(depth, 0, -1)]
  return names


class ModuleSpec:
  """``cdft.models.get_model(name, stage, preset, **kwargs)``, built on first use.

  It stands for the module: attributes (``apply``, ``stage``, ...) are the
  built module's. Its ``repr`` names the arguments, which with the source
  fingerprint of :mod:`cdft.models` determine the module, so program keys need
  no module.
  """

  def __init__(self, name, stage, preset, **kwargs):
    self.name, self.stage, self.preset, self.kwargs = name, stage, preset, kwargs
    self._module = None

  def build(self):
    if self._module is None:
      from cdft import models  # pylint: disable=import-outside-toplevel
      self._module = models.get_model(self.name, self.stage, self.preset, **self.kwargs)
    return self._module

  def __getattr__(self, attr):  # only for what the instance lacks
    if attr.startswith("__") or attr == "_module":
      raise AttributeError(attr)
    return getattr(self.build(), attr)

  def __repr__(self):
    args = "".join(f", {k}={v!r}" for k, v in sorted(self.kwargs.items()))
    return f"ModuleSpec({self.name!r}, {self.stage}, {self.preset!r}{args})"


def ceil_pool(encoder):
  """Whether an encoder (a module or a :class:`ModuleSpec`) pools in ceil mode, unbuilt."""
  if isinstance(encoder, ModuleSpec):
    return bool(encoder.kwargs.get("ceil_pool", False))
  return bool(getattr(encoder, "ceil_pool", False))


@dataclasses.dataclass(frozen=True)
class LevelModel:
  """The encoder/decoder pair of one WCT level (relu{k}_1) and their parameters.

  ``encoder`` / ``decoder``: Flax modules, or :class:`ModuleSpec` of them.
  """
  encoder: object
  decoder: object
  encoder_params: dict
  decoder_params: dict
