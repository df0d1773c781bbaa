"""``cdft-weights export``: a trained cdft workdir written in the official PyTorch layouts.

So the official code (and anything that reads its files) can load cdft-trained
networks. Each task writes what it trained, under the names the official
repositories use:

* ``cd_student`` (stage k): ``{k}SE.pth``, the student encoder with its
  embedding heads ``conv*_aux`` (the layout of the released ``cd_wct16x/kSE.pth``);
* ``cd_small_decoder``: ``{k}SD.pth``, the small decoder (``cd_wct16x/kSD.pth``);
* ``cd_decoder``: ``{k}BD.pth``, the teacher-width decoder (same key layout);
* ``ft_paraphraser`` / ``cd_paraphraser``: ``Paraphraser.pth`` (the official FT
  paraphraser's keys, ``ConvTranspose2d`` weights included);
* ``classifier``: ``{model}.pth``; ``ft_student``: ``{model}.pth`` (the student)
  and, when it has one, ``translator.pth`` / ``regressor.pth``.

The files are plain state dicts (``{name: tensor}``) in the zip format of
``torch.save``, written by :mod:`cdft.weights.torch_format` (no torch needed).
Every file is read back and compared before the command reports it.
"""
import pathlib

import numpy as np

from cdft.errors import CdftError, WeightError
from cdft.weights import convert, ft, torch_format


def _files(task, params, model_state, config):
  """``{file name: state dict}`` of what a run of ``task`` trained."""
  stage = config.get("stage")
  if task == "cd_student":
    state = convert.to_torch_state(params["encoder"])
    state.update(convert.to_torch_state(params["embedding"]))
    return {f"{stage}SE.pth": state}
  if task == "cd_small_decoder":
    return {f"{stage}SD.pth": convert.to_torch_state(params["decoder"])}
  if task == "cd_decoder":
    return {f"{stage}BD.pth": convert.to_torch_state(params["decoder"])}
  if task in ("ft_paraphraser", "cd_paraphraser"):
    return {"Paraphraser.pth": ft.variables_to_state({"params": params["paraphraser"]})}
  if task == "classifier":
    name = config.get("model", {}).get("name", "classifier")
    return {f"{name}.pth": ft.variables_to_state(
        {"params": params["classifier"], "batch_stats": model_state.get("classifier", {})})}
  if task == "ft_student":
    name = config.get("student", {}).get("model", "student")
    out = {f"{name}.pth": ft.variables_to_state(
        {"params": params["student"], "batch_stats": model_state.get("student", {})})}
    for head, file_name in (("translator", "translator.pth"), ("regressor", "regressor.pth")):
      if head in params:
        out[file_name] = ft.variables_to_state(
            {"params": params[head], "batch_stats": model_state.get(head, {})})
    return out
  raise CdftError(f"cannot export a {task!r} run (exportable: cd_student, cd_small_decoder, "
                  "cd_decoder, cd_paraphraser, ft_paraphraser, classifier, ft_student)")


def export_run(workdir, out_dir, step=None):
  """Writes the networks a training run trained as official ``.pth`` files.

  Args:
    workdir: the run's workdir (``launch/train.py``).
    out_dir: the folder to write into (created).
    step: the checkpoint (default: the latest).

  Returns:
    The written paths.

  Raises:
    CdftError: not a workdir, no checkpoint, a task with no official layout.
  """
  from cdft.training import checkpointing  # pylint: disable=import-outside-toplevel
  variables, config = checkpointing.restore_variables(workdir, step)
  task = config.get("task")
  states = _files(task, variables["params"], variables.get("model_state") or {}, config)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for name, state in states.items():
    path = out_dir / name
    torch_format.save(state, path)
    back = torch_format.state_dict(torch_format.load(path), str(path))
    if set(back) != set(state) or any(not np.array_equal(back[k], state[k]) for k in state):
      raise WeightError(f"{path}: the written file does not read back as written")
    written.append(path)
  return written
