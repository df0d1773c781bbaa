r"""Trains any cdft config: the one entry point of the one trainer.

  python launch/train.py --config configs/cd_decoder.py:stage=3,runlocal \
      --workdir runs/cd_decoder_stage3

Rerunning the same command resumes from the workdir's latest checkpoint, with
the compiled programs of earlier processes (``<cdft cache>/xla-train``; off with
``CDFT_NO_COMPILE_CACHE=1``). On
several hosts add ``--distributed`` (TPU pods and SLURM are auto-detected by
``jax.distributed.initialize``; elsewhere pass ``--coordinator_address``,
``--num_processes`` and ``--process_id``). See launch/slurm_gpu.sh and
launch/tpu_vm_pod.sh.
"""
import sys

if __name__ == "__main__":
  # Before anything else: glibc's malloc reads its tunables at process start.
  from cdft.training import cpu_memory  # pylint: disable=g-import-not-at-top
  cpu_memory.reexec_with_huge_pages()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py[:args]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (when not auto-detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    # Progress is the trainer's own lines; orbax logs every save at INFO (dozens of lines per
    # checkpoint). ``-v 0`` brings them back.
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=import-outside-toplevel
  if _DISTRIBUTED.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from cdft import train  # pylint: disable=import-outside-toplevel
  from cdft.errors import CdftError  # pylint: disable=import-outside-toplevel
  from cdft.training import sharding  # pylint: disable=import-outside-toplevel
  train.enable_compile_cache()  # the next process of this run compiles nothing it has seen
  try:
    # A CPU host runs the step on several CPU devices (faster; the same step). Left alone
    # for a cluster whose process count is only known once JAX runs.
    split = None
    if not _DISTRIBUTED.value or _NUM_PROCESSES.value:
      split = sharding.split_cpu_host(_CONFIG.value, _NUM_PROCESSES.value or 1)
    if split and jax.default_backend() == "cpu":
      print(f"train: the step runs on {split} CPU devices of this process "
            "(config.cpu_devices; 1: one device)", flush=True)
    result = train.run(_CONFIG.value, _WORKDIR.value)
  except CdftError as e:
    print(f"train: error: {e}", file=sys.stderr)
    sys.exit(2)
  if result["preempted"]:
    sys.exit(0)


if __name__ == "__main__":
  app.run(main)
