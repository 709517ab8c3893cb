"""Input-pipeline throughput on the real Fashion-MNIST (Debian IDX files).

Prepares the offline Fashion-MNIST builder (timed, unless already prepared in
--data_dir) and times the training iterator, in images/second after a warm-up,
at each image size with and without RandAugment (N=2, M=10).

With --train_model, also measures what the train step consumes at each size
(scripts/benchmark.py, our model only, same batch) and prints the headroom:
pipeline images/s over train-step images/s (below 1 the input is the
bottleneck). Give the progressive-learning stage sizes, e.g. V2-S's
128,185,243,300, to check every stage.

  .venv/bin/python scripts/benchmark_input.py            # table
  .venv/bin/python scripts/benchmark_input.py --json     # one JSON object
  .venv/bin/python scripts/benchmark_input.py --sizes 128,185,243,300 \
      --train_model v2_s --batch_size 32
"""
import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

from efficientnet_jax import data
from efficientnet_jax.data import fashion_mnist


def _prepare(data_dir: str, source_dir: str | None) -> float | None:
  """Seconds to prepare Fashion-MNIST, or None if it was already prepared."""
  builder = fashion_mnist.FashionMnistDebian(data_dir=data_dir,
                                             source_dir=source_dir)
  if builder.is_prepared():
    return None
  start = time.perf_counter()
  builder.download_and_prepare()
  return time.perf_counter() - start


def _images_per_second(spec: data.DataSpec, image_size: int, batch_size: int,
                       augment: str, warmup: int, steps: int) -> float:
  it = data.make_train_iterator(
      spec, image_size=image_size, batch_size=batch_size, seed=0,
      normalization='v1', augment=augment, num_classes=10)
  for _ in itertools.islice(it, warmup):  # tracing, shuffle-buffer fill
    pass
  start = time.perf_counter()
  for _ in itertools.islice(it, steps):
    pass
  return steps * batch_size / (time.perf_counter() - start)


def _train_images_per_second(model: str, image_size: int, batch_size: int) -> float | None:
  """Our train step's images/s at this size (scripts/benchmark.py in a subprocess)."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'benchmark.py')
  out = subprocess.run(
      [sys.executable, script, '--systems', 'ours', '--modes', 'train', '--model', model,
       '--image_size', str(image_size), '--train_batch', str(batch_size), '--rounds', '2',
       '--json', '--quiet'], capture_output=True, text=True, check=False)
  if out.returncode != 0:
    print(out.stderr[-2000:], file=sys.stderr)
    return None
  row = json.loads(out.stdout.strip().splitlines()[-1])['systems']['ours']
  return row.get('train_img_s')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default=None,
                      help='tfds data_dir (default: a fresh temporary one)')
  parser.add_argument('--source_dir', default=None,
                      help='IDX directory (default: $FASHION_MNIST_DIR or '
                      'Debian\'s)')
  parser.add_argument('--sizes', default='32,64')
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--warmup', type=int, default=20)
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--train_model', default='',
                      help='also time our train step at each size (e.g. b0, v2_s)')
  parser.add_argument('--json', action='store_true', help='print JSON only')
  args = parser.parse_args()

  data_dir = args.data_dir or tempfile.mkdtemp(prefix='fashion_tfds_')
  # tfds reports on stdout; keep stdout for the JSON.
  with contextlib.redirect_stdout(sys.stderr):
    prepare_s = _prepare(data_dir, args.source_dir)
  spec = data.DataSpec('fashion_mnist', data_dir=data_dir,
                       source_dir=args.source_dir)
  rows = []
  for size in (int(s) for s in args.sizes.split(',')):
    train_rate = (_train_images_per_second(args.train_model, size, args.batch_size)
                  if args.train_model else None)
    for augment in ('none', 'randaugment'):
      rate = _images_per_second(spec, size, args.batch_size, augment,
                                args.warmup, args.steps)
      row = {'image_size': size, 'batch_size': args.batch_size,
             'augment': augment, 'images_per_s': round(rate, 1)}
      if train_rate:
        row['train_step_images_per_s'] = train_rate
        row['headroom'] = round(rate / train_rate, 1)
      rows.append(row)
  result = {'prepare_s': None if prepare_s is None else round(prepare_s, 2),
            'cpu_count': os.cpu_count(), 'train': rows}
  if args.json:
    print(json.dumps(result))
    return
  if prepare_s is not None:
    print(f'Fashion-MNIST prepare (70k examples): {prepare_s:.1f} s')
  print(f'{"size":>5} {"batch":>6} {"augment":>12} {"images/s":>10}'
        + (f' {"train img/s":>12} {"headroom":>9}' if args.train_model else ''))
  for row in rows:
    line = (f'{row["image_size"]:>5} {row["batch_size"]:>6} {row["augment"]:>12} '
            f'{row["images_per_s"]:>10.0f}')
    if 'headroom' in row:
      line += f' {row["train_step_images_per_s"]:>12.2f} {row["headroom"]:>8.1f}x'
    print(line)


if __name__ == '__main__':
  main()
