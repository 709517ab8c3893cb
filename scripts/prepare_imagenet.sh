#!/usr/bin/env bash
# Prepares ImageNet (ILSVRC2012) as the TFDS dataset `imagenet2012`, once.
#
# ImageNet cannot be downloaded automatically: get ILSVRC2012_img_train.tar
# (~138 GB) and ILSVRC2012_img_val.tar (~6.3 GB) from https://image-net.org and
# put them in MANUAL_DIR. Preparing writes ~150 GB of tfrecords to DATA_DIR and
# takes hours. Then train with DataSpec('imagenet2012', data_dir=DATA_DIR,
# eval_split='validation').
#
# Usage: scripts/prepare_imagenet.sh MANUAL_DIR DATA_DIR
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 MANUAL_DIR DATA_DIR" >&2
  exit 2
fi
manual_dir=$1
data_dir=$2
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}

for tar in ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar; do
  if [[ ! -f "$manual_dir/$tar" ]]; then
    echo "missing $manual_dir/$tar: download it from https://image-net.org" >&2
    exit 1
  fi
done
# The equivalent of `tfds build imagenet2012 --manual_dir=... --data_dir=...`,
# through the Python API: the pinned tensorflow-datasets' `tfds` CLI also needs
# apache_beam. tfds's download manager imports importlib_resources, which
# tensorflow-datasets does not declare.
"$python" -c 'import importlib_resources' 2>/dev/null || {
  echo "preparing needs importlib_resources: $python -m pip install importlib_resources" >&2
  exit 1
}
exec "$python" - "$manual_dir" "$data_dir" <<'PY'
import sys
import tensorflow_datasets as tfds

manual_dir, data_dir = sys.argv[1:]
builder = tfds.builder('imagenet2012', data_dir=data_dir)
builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
print(builder.info.splits)
PY
