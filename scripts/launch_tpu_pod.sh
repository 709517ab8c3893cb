#!/usr/bin/env bash
# Runs one training command on every worker of a Cloud TPU VM pod slice.
#
# JAX's multi-controller runtime needs the same program on every host; on a TPU
# VM `jax.distributed.initialize()` (called by train.py) finds the coordinator
# and the process ids from the TPU metadata, so no flags are needed.
#
# Usage: scripts/launch_tpu_pod.sh TPU_NAME ZONE [train.py flags...]
#   scripts/launch_tpu_pod.sh my-v4-32 us-central2-b \
#       --config=configs/b4.py --workdir=gs://my-bucket/runs/b4 \
#       --config.data.data_dir=gs://my-bucket/tensorflow_datasets
#
# The workdir and data_dir must be visible to every worker (a GCS bucket); the
# repository must be checked out at REPO_DIR on every worker with its venv
# (`make venv`). Re-running the same command resumes from the workdir.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [train.py flags...]" >&2
  exit 2
fi
tpu_name=$1
zone=$2
shift 2
repo_dir=${REPO_DIR:-efficientnet-jax}

# printf %q quotes every flag so it survives the remote shell unchanged.
flags=$(printf ' %q' "$@")
exec gcloud compute tpus tpu-vm ssh "$tpu_name" --zone="$zone" --worker=all \
  --command="cd $repo_dir && .venv/bin/python train.py$flags"
