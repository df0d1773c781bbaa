r"""The official training steps, rebuilt in PyTorch, to time them on *this* machine.

``../shared/baselines`` times the official code on one machine of each kind; machines of
the same kind still differ (a 2-vCPU "AVX-512" VM may be an Intel core with two 512-bit
FMA units or an AMD Zen 4 core that splits them, half the float32 peak), so a ratio against
those rows can say more about the CPU than about cdft. This script is the reference
``launch/bench_train.py --reference PYTHON`` runs beside cdft, alternating, on the same
cores: the body of each official training loop as spec'd in ``../shared/specs`` (ft.md
§1–2, cd.md §2–3) and in ``../shared/baselines/README.md`` §5 (what each timed step is),
written here from those facts (no official code). Same protocol as the baselines: torch
float32, ``torch.set_num_threads(2)`` (this machine's cores), no channels_last, no
``torch.compile``, random inputs made before timing (``torch.randn`` for FT, ``torch.rand``
for CD), random weights, ``--warmup`` then ``--repeats`` timed iterations of forward, loss,
``.item()``, ``zero_grad``, backward and the optimizer step; median.

Each model's parameter count is checked against the spec's (cd.md §2: Encoder3 555,340,
Decoder3 555,075, SE3 35,164 + 21,952 aux, SD3 35,091) and printed, so a reference that
drifted from the architecture fails instead of timing other work (the CIFAR ResNets have no
count in the specs; their widths and depths are ft.md §1.3's).

Needs ``torch`` (the baselines used the 2.13.0 CPU wheel); cdft does not:

  python -m venv /tmp/torch && /tmp/torch/bin/pip install torch==2.13.0 \
      --index-url https://download.pytorch.org/whl/cpu
  /tmp/torch/bin/python launch/reference_torch.py --step ft_train_teacher
"""
import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

# Parameter counts of the spec (cd.md §2.1–2.5; ft.md §1.1).
SPEC_PARAMS = {"encoder3": 555_340, "decoder3": 555_075, "encoder5": 12_944_972,
               "decoder5": 12_944_451, "se3": 35_164 + 21_952, "se5": 810_140 + 154_048,
               "sd3": 35_091, "sd5": 810_003,
               "paraphraser": 129_312}  # ft.md §1.1: the shapes of Paraphraser.pth


def _count(module):
  return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- Factor Transfer (ft.md)
class _Block(nn.Module):
  """Post-activation basic block, option-B shortcut where the shape changes."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
    self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
    self.shortcut = nn.Sequential()
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout))

  def forward(self, x):
    out = F.relu(self.b1(self.c1(x)))
    return F.relu(self.b2(self.c2(out)) + self.shortcut(x))


class ResNet(nn.Module):
  """CIFAR ResNet-(6n+2), widths 16/32/64; returns (logits, layer3 output)."""

  def __init__(self, n, num_classes=10):
    super().__init__()
    self.conv, self.bn = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
    blocks, cin = [], 16
    for g, width in enumerate((16, 32, 64)):
      for i in range(n):
        blocks.append(_Block(cin, width, 2 if g and not i else 1))
        cin = width
    self.blocks, self.fc = nn.Sequential(*blocks), nn.Linear(64, num_classes)

  def forward(self, x):
    feat = self.blocks(F.relu(self.bn(self.conv(x))))
    return self.fc(F.avg_pool2d(feat, 8).flatten(1)), feat


def _lrelu_convs(channels, transpose=False):
  conv = nn.ConvTranspose2d if transpose else nn.Conv2d
  layers = []
  for cin, cout in zip(channels[:-1], channels[1:]):
    layers += [conv(cin, cout, 3, 1, 1), nn.LeakyReLU(0.1)]
  return nn.Sequential(*layers)


class Paraphraser(nn.Module):
  """ft.md §1.1: 3 convs down to m·k channels, 3 transposed convs back, LeakyReLU(0.1)."""

  def __init__(self, m=64, k=0.5):
    super().__init__()
    f = int(round(m * k))
    self.encoder = _lrelu_convs((m, m, f, f))
    self.decoder = _lrelu_convs((f, f, m, m), transpose=True)

  def forward(self, x, mode):
    return self.encoder(x) if mode == 1 else self.decoder(self.encoder(x))


def _factor(x):
  return F.normalize(x.flatten(1))


def ft_train_teacher(batch):
  net = ResNet(9).train()
  opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
  x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

  def step():
    logits, _ = net(x)
    loss = F.cross_entropy(logits, y)
    loss.item()
    logits.argmax(1).eq(y).sum().item()
    opt.zero_grad()
    loss.backward()
    opt.step()
  return step, {"trained": _count(net)}


def ft_train_paraphraser(batch):
  teacher, para = ResNet(9).eval(), Paraphraser().train()
  opt = torch.optim.SGD(para.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
  x = torch.randn(batch, 3, 32, 32)

  def step():  # the teacher's feature is not detached: backward runs through ResNet-56
    _, feat = teacher(x)
    loss = F.l1_loss(para(feat, 0), feat.detach())
    loss.item()
    opt.zero_grad()
    loss.backward()
    opt.step()
  return step, {"trained": _count(para), "spec_check": {"paraphraser": _count(para)}}


def ft_train_student(batch):
  teacher, para = ResNet(9).eval(), Paraphraser().eval()
  student, translator = ResNet(3).train(), _lrelu_convs((64, 64, 32, 32)).train()
  opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
          for m in (student, translator)]
  x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

  def step():  # teacher and paraphraser forwards are not under no_grad, as in the official code
    _, t_feat = teacher(x)
    target = para(t_feat, 1)
    logits, s_feat = student(x)
    loss = F.cross_entropy(logits, y) + 500 * F.l1_loss(_factor(translator(s_feat)),
                                                        _factor(target.detach()))
    loss.item()
    logits.argmax(1).eq(y).sum().item()
    for o in opts:
      o.zero_grad()
    loss.backward()
    for o in opts:
      o.step()
  return step, {"trained": _count(student) + _count(translator),
                "spec_check": {"paraphraser": _count(para)}}


# ---------------------------------------------------------------- Collaborative Distillation (cd.md)
VGG = ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512,))
SMALL = ((16, 16), (32, 32), (64, 64, 64, 64), (128, 128, 128, 128), (128,))


def _conv(cin, cout):
  return nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3), nn.ReLU())


def _encoder(k, widths, aux=False):
  """Prefix up to relu{k}_1: stage s < k has all its convs, stage k only its first."""
  enc = nn.Module()
  enc.conv0 = nn.Conv2d(3, 3, 1)
  enc.stages = nn.ModuleList()
  cin = 3
  for s in range(k):
    layers = [] if s == 0 else [nn.MaxPool2d(2, 2)]
    convs = widths[s] if s < k - 1 else widths[s][:1]
    for cout in convs:
      layers.append(_conv(cin, cout))
      cin = cout
    enc.stages.append(nn.Sequential(*layers))
  enc.aux = (nn.ModuleList(nn.Conv2d(widths[s][0], VGG[s][0], 1) for s in range(k))
             if aux else None)
  return enc


def _relus(enc, x):
  """relu{1..k}_1 of encoder ``enc`` (the first conv of each stage)."""
  out, h = [], enc.conv0(x)
  for s, stage in enumerate(enc.stages):
    layers = list(stage)
    if s:
      h = layers.pop(0)(h)
    for j, layer in enumerate(layers):
      h = layer(h)
      if j == 0:
        out.append(h)
  return out


def _decoder(k, widths):
  """cd.md §2.2 / §2.5: mirror of the encoder from relu{k}_1 back to RGB, nearest 2x up."""
  chans = [w for stage in widths[:k - 1] for w in stage] + [widths[k - 1][0]]
  bounds = {sum(len(s) for s in widths[:i]) for i in range(1, k)}  # where a pool was
  layers, seq = [], [3] + chans
  for i in range(len(seq) - 1, 0, -1):
    layers.append(_conv(seq[i], seq[i - 1]))
    if i - 1 in bounds:
      layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
  return nn.Sequential(*layers)


def _mse_feats(a, b):
  return sum(F.mse_loss(x, y) for x, y in zip(a, b))


def _cd(stage, batch, size, what):
  be = _encoder(stage, VGG).requires_grad_(False)
  c = torch.rand(batch, 3, size, size)
  checks = {f"encoder{stage}": _count(be)}  # keys of SPEC_PARAMS
  if what == "decoder":  # CD 1: BD on the frozen BE, pixel + perceptual
    bd = _decoder(stage, VGG)
    trained, checks[f"decoder{stage}"] = bd, _count(bd)

    def loss_fn():
      target = _relus(be, c)
      rec = bd(target[-1])
      return F.mse_loss(rec, c) + _mse_feats(_relus(be, rec), target)
  elif what == "student":  # CD 2: SE through the frozen BD, 10 embed + pixel + perceptual
    bd = _decoder(stage, VGG).requires_grad_(False)
    se = _encoder(stage, SMALL, aux=True)
    trained, checks[f"se{stage}"], checks[f"decoder{stage}"] = se, _count(se), _count(bd)

    def loss_fn():
      target = _relus(be, c)
      embedded = [q(f) for q, f in zip(se.aux, _relus(se, c))]
      rec = bd(embedded[-1])
      return (10 * _mse_feats(embedded, target) + F.mse_loss(rec, c)
              + _mse_feats(_relus(be, rec), target))
  else:  # CD 3: SD on the frozen SE, pixel + 0.01 perceptual
    se = _encoder(stage, SMALL).requires_grad_(False)
    sd = _decoder(stage, SMALL)
    trained, checks[f"sd{stage}"] = sd, _count(sd)

    def loss_fn():
      rec = sd(_relus(se, c)[-1])
      return F.mse_loss(rec, c) + 0.01 * _mse_feats(_relus(be, rec), _relus(be, c))
  opt = torch.optim.Adam(trained.parameters(), lr=1e-4)

  def step():
    loss = loss_fn()
    loss.item()
    opt.zero_grad()
    loss.backward()
    opt.step()
  return step, {"trained": _count(trained), "spec_check": checks}


STEPS = {
    "ft_train_teacher": (lambda: ft_train_teacher(128), 128),
    "ft_train_paraphraser": (lambda: ft_train_paraphraser(128), 128),
    "ft_train_student": (lambda: ft_train_student(128), 128),
    "cd_decoder_k3": (lambda: _cd(3, 16, 256, "decoder"), 16),
    "cd_student_k3": (lambda: _cd(3, 16, 256, "student"), 16),
    "cd_small_decoder_k3": (lambda: _cd(3, 16, 256, "small_decoder"), 16),
    "cd_decoder_k5": (lambda: _cd(5, 16, 256, "decoder"), 16),
    "cd_student_k5": (lambda: _cd(5, 16, 256, "student"), 16),
    "cd_small_decoder_k5": (lambda: _cd(5, 16, 256, "small_decoder"), 16),
}


def _check(name, info):
  """Parameter counts against the spec's: a mismatch means the reference times other work."""
  for part, count in info.get("spec_check", {}).items():
    if count != SPEC_PARAMS[part]:
      raise SystemExit(f"{name}: the reference's {part} has {count} parameters, the spec "
                       f"{SPEC_PARAMS[part]}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--step", required=True, choices=sorted(STEPS))
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  make, batch = STEPS[args.step]
  step, info = make()
  _check(args.step, info)
  times = []
  for _ in range(args.warmup + args.repeats):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  timed = times[args.warmup:]
  med = statistics.median(timed)
  print(json.dumps({
      "step": args.step, "reference": f"torch {torch.__version__}", "threads": args.threads,
      "batch": batch, "parameters_trained": info["trained"],
      "parameters_checked": info.get("spec_check", {}),
      "timed_step_s": [round(t, 4) for t in timed], "median_step_s": round(med, 4),
      "images_per_s": round(batch / med, 3),
      "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


if __name__ == "__main__":
  main()
