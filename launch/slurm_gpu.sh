#!/usr/bin/env bash
# Multi-host GPU training under SLURM: one process per node, all its GPUs in it.
#
#   sbatch --nodes=4 --gres=gpu:8 launch/slurm_gpu.sh configs/cd_student.py:stage=5 runs/cd_student_stage5 \
#       --config.input.manual_dir=/data/coco/train2014 --config.batch_size=256
#
# jax.distributed.initialize() reads the coordinator, process count and id from
# SLURM's environment; every process reads its own part of each global batch;
# checkpoints go to the (shared) workdir. Resubmitting the job resumes.
#SBATCH --job-name=cdft
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: sbatch [slurm options] launch/slurm_gpu.sh CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# --signal=TERM@120 above gives the trainer two minutes to save before the time limit.
exec srun --kill-on-bad-exit=1 python launch/train.py --distributed \
  --config "$CONFIG" --workdir "$WORKDIR" "$@"
