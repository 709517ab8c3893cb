"""EfficientNet paper Table 2 beside ours: params, multiply-adds, compute and top-1/top-5.

    python experiments/table2/table2.py                      # params, MACs, compute
    python experiments/table2/table2.py --workdirs b0=runs/b0,b4=gs://bucket/runs/b4
    python experiments/table2/table2.py --markdown           # or --json
    python experiments/table2/table2.py --eval_json evals/b*.json  # released weights

Paper numbers are arXiv:1905.11946 **v5** Table 2 (= the tensorflow/tpu README
AutoAugment row and the released checkpoints; B0 77.1). The ICML'19 version
(v1) printed lower accuracies (B0 76.3), which the authors attribute to buggy
internal code (tensorflow/tpu#623); the README's no-AutoAugment row is the
target when training with `--config.data.augment=none`. Both are shown.

Our params and multiply-adds come from `efficientnet_jax.model_table` (the
same counts the tests pin to the official figures). Accuracies come from each
workdir's metrics.jsonl: the last `split: eval` record, EMA (`top1`, `top5`)
and raw weights (`raw_top1`, `raw_top5`), written by efficientnet_jax/train.py.
A workdir must be finished (its last eval at the configured train_steps /
num_epochs, from its config.json) unless --allow-unfinished. `--eval_json`
shows released weights evaluated by `python -m efficientnet_jax.evaluate
--weights=... --json` (official eval preprocessing of their origin) beside the
paper; experiments/table2/README.md has the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from efficientnet_jax.model import architectures
from efficientnet_jax import model_table

MODELS = tuple(f'b{i}' for i in range(8))
PAPER_REVISION = 'arXiv:1905.11946v5 Table 2 (AutoAugment, EMA weights, 350 epochs)'

# arXiv v5 Table 2: top-1, top-5 and params as printed (multiply-adds are
# model_table.PUBLISHED_MACS, the same table).
PAPER_TOP1 = dict(zip(MODELS, (77.1, 79.1, 80.1, 81.6, 82.9, 83.6, 84.0, 84.3)))
PAPER_TOP5 = dict(zip(MODELS, (93.3, 94.4, 94.9, 95.7, 96.4, 96.7, 96.8, 97.0)))
PAPER_PARAMS = dict(zip(MODELS, (5.3e6, 7.8e6, 9.2e6, 12e6, 19e6, 30e6, 43e6, 66e6)))
# tensorflow/tpu README, "baseline preprocessing" (no AutoAugment) checkpoints.
README_NO_AA_TOP1 = dict(zip(MODELS[:6], (76.7, 78.7, 79.8, 81.1, 82.5, 83.1)))
# ICML'19 / arXiv v1 Table 2 (superseded, tensorflow/tpu#623); B6/B7 not quoted.
ICML_TOP1 = dict(zip(MODELS[:6], (76.3, 78.8, 79.8, 81.1, 82.6, 83.3)))

# Training compute: fwd + bwd ~ 3x the forward's 2 FLOPs per multiply-add.
EPOCHS = 350
TRAIN_IMAGES = 1_281_167  # ImageNet-1k train (the paper holds out 25k as minival)
TPU_V3_CORE_PEAK = 61.5e12  # bf16 FLOP/s: 123 TFLOPS per v3 chip, 2 TensorCores
A100_PEAK = 312e12  # bf16 dense FLOP/s
# An assumption, not a measurement (README): depthwise convs keep EfficientNet far
# below a ResNet's matmul utilisation (B0 trains no faster per image than
# ResNet-50 with ~10x fewer multiply-adds, lukemelas/EfficientNet-PyTorch#273).
DEFAULT_UTILIZATION = 0.10


class WorkdirError(ValueError):
  """A workdir that cannot give a final accuracy; the message is one line naming it."""


def within_rounding(value: float, printed: float) -> bool:
  """True when `printed` (two significant digits, as in Table 2) is `value` correctly rounded."""
  return float(f'{value:.2g}') == float(f'{printed:.2g}')


def training_compute(macs: int, *, epochs: float = EPOCHS, images: int = TRAIN_IMAGES,
                     utilization: float = DEFAULT_UTILIZATION) -> dict:
  """FLOPs of a full training run and the device-hours they take at `utilization`."""
  flops = 2 * macs * 3 * epochs * images
  return dict(train_flops=flops,
              tpu_v3_core_hours=flops / (TPU_V3_CORE_PEAK * utilization) / 3600,
              a100_hours=flops / (A100_PEAK * utilization) / 3600)


def size_rows(models=MODELS, utilization: float = DEFAULT_UTILIZATION) -> list[dict]:
  """model_table rows for `models` with the paper's printed figures and training compute."""
  rows = model_table.table_rows([architectures.get_spec(m) for m in models])
  for row in rows:
    name = row['model']
    row['paper_params'] = PAPER_PARAMS[name]
    row['params_within_rounding'] = within_rounding(row['params'], PAPER_PARAMS[name])
    row['macs_within_rounding'] = within_rounding(row['macs'], row['published_macs'])
    row.update(training_compute(row['macs'], utilization=utilization))
  return rows


def _read_lines(path: str) -> list[str]:
  if '://' in path:  # gs:// workdirs of a TPU pod run
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with tf.io.gfile.GFile(path) as f:
      return f.read().splitlines()
  with open(path, encoding='utf-8') as f:
    return f.read().splitlines()


def _exists(path: str) -> bool:
  if '://' in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.io.gfile.exists(path)
  return os.path.exists(path)


def read_workdir(model: str, workdir: str, *, allow_unfinished: bool = False) -> dict:
  """The final eval record of `workdir`, checked to be `model` and finished.

  Raises:
    WorkdirError: no metrics.jsonl, no eval record, no config.json, another
      model, or (without allow_unfinished) a run short of its configured length.
  """
  where = f'{model}={workdir}'
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if not _exists(metrics):
    raise WorkdirError(f'{where}: no metrics.jsonl (not a train.py workdir, or not started)')
  evals = []
  for number, line in enumerate(_read_lines(metrics), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      raise WorkdirError(f'{where}: metrics.jsonl line {number} is not JSON') from None
    if record.get('split') == 'eval':
      evals.append(record)
  if not evals:
    raise WorkdirError(f'{where}: unfinished: metrics.jsonl has no eval record yet')
  final = max(evals, key=lambda r: r['step'])
  config_path = os.path.join(workdir, 'config.json')
  if not _exists(config_path):
    raise WorkdirError(f'{where}: no config.json, so whether training finished is unknown')
  config = json.loads('\n'.join(_read_lines(config_path)))
  trained = _trained_model(config)
  if trained != model:
    raise WorkdirError(f'{where}: the workdir trained {trained!r}, not {model!r}')
  if config.get('train_steps', -1) > 0:
    done, progress = final['step'] >= config['train_steps'], (
        f'step {final["step"]} of {config["train_steps"]}')
  else:
    epochs = config['num_epochs']
    done = final.get('epoch', 0.0) >= epochs - 1e-6
    progress = f'epoch {final.get("epoch", 0.0):.1f} of {epochs:g}'
  if not done and not allow_unfinished:
    raise WorkdirError(f'{where}: unfinished: the last eval is at {progress} '
                       '(pass --allow-unfinished to report it anyway)')
  return dict(model=model, workdir=workdir, finished=done, progress=progress,
              step=final['step'], epoch=final.get('epoch'),
              image_size=final.get('image_size'), count=final.get('count'),
              top1=_pct(final.get('top1')), top5=_pct(final.get('top5')),
              raw_top1=_pct(final.get('raw_top1')), raw_top5=_pct(final.get('raw_top5')))


def _trained_model(config: dict) -> str:
  """The variant name a saved config.json trains ('b3', 'b0[width=0.5]', ...)."""
  from configs import base  # pylint: disable=g-import-not-at-top
  model = base.get_config().model  # fields a workdir's older config.json may lack
  try:
    model.update(config['model'])
    return architectures.spec_from_config(model).name
  except (KeyError, ValueError, AttributeError) as e:
    return f'<unreadable model config: {e}>'


def _pct(fraction):
  return None if fraction is None else 100.0 * fraction


def accuracy_rows(results: dict[str, dict]) -> list[dict]:
  rows = []
  for model in MODELS:
    if model not in results:
      continue
    r = dict(results[model])
    r.update(paper_top1=PAPER_TOP1[model], paper_top5=PAPER_TOP5[model],
             readme_no_aa_top1=README_NO_AA_TOP1.get(model), icml_top1=ICML_TOP1.get(model))
    r['top1_minus_paper'] = None if r['top1'] is None else round(r['top1'] - r['paper_top1'], 2)
    rows.append(r)
  return rows


def parse_workdirs(text: str) -> dict[str, str]:
  """'b0=DIR,b1=DIR' -> {'b0': 'DIR', 'b1': 'DIR'}."""
  out = {}
  for item in filter(None, (part.strip() for part in text.split(','))):
    model, sep, workdir = item.partition('=')
    model = model.strip().lower()
    if not sep or not workdir.strip():
      raise ValueError(f'--workdirs item {item!r}; accepted: MODEL=DIR with MODEL in b0..b7')
    if model not in MODELS:
      raise ValueError(f'--workdirs model {model!r}; accepted: {", ".join(MODELS)}')
    if model in out:
      raise ValueError(f'--workdirs names {model!r} twice')
    out[model] = workdir.strip()
  return out


IMAGENET_VAL_EXAMPLES = 50_000
_EVAL_FIELDS = ('weights', 'model', 'origin', 'top1', 'top5', 'count', 'data', 'preprocessing')


def _eval_records(path: str) -> list:
  """The JSON values of an evaluate --json output: one object, or one per line."""
  if not _exists(path):
    raise ValueError(f'--eval_json {path}: no such file')
  lines = _read_lines(path)
  try:
    return [json.loads('\n'.join(lines))]
  except json.JSONDecodeError:
    pass
  records = []
  for number, line in enumerate(lines, 1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        raise ValueError(f'--eval_json {path}: line {number} is not JSON') from None
  return records


def read_eval_json(path: str) -> list[dict]:
  """Imported-weights accuracies from `python -m efficientnet_jax.evaluate --json` output.

  Returns:
    One row per record: the model, weights, origin, preprocessing, count, top-1/top-5
    (percent) and the paper's figures beside them.

  Raises:
    ValueError: one line naming the file: not JSON, not an evaluate --weights output,
      or a model outside Table 2.
  """
  rows = []
  for record in _eval_records(path):
    if not isinstance(record, dict) or 'ema' in record:
      raise ValueError(f'--eval_json {path}: not an `evaluate --weights ... --json` output '
                       '(workdir evaluations go in --workdirs)')
    missing = [k for k in _EVAL_FIELDS if k not in record]
    if missing:
      raise ValueError(f'--eval_json {path}: no {", ".join(missing)} field; expected the '
                       'output of `python -m efficientnet_jax.evaluate --weights=... --json`')
    model = record['model']
    if model not in MODELS:
      raise ValueError(f'--eval_json {path}: model {model!r} is not in Table 2; accepted: '
                       f'{", ".join(MODELS)}')
    data, prep = record['data'], record['preprocessing']
    top1 = _pct(record['top1'])
    rows.append(dict(
        model=model, weights=record['weights'], origin=record['origin'], file=path,
        data=f'{data["name"]}:{data["split"]}', count=record['count'],
        complete=(data['name'], data['split'], record['count']) == (
            'imagenet2012', 'validation', IMAGENET_VAL_EXAMPLES),
        image_size=prep['image_size'], crop=f'{prep["crop"]}/{prep["crop_padding"]}',
        resize=prep['resize'], normalization=prep['normalization'],
        top1=top1, top5=_pct(record['top5']),
        paper_top1=PAPER_TOP1[model], paper_top5=PAPER_TOP5[model],
        readme_no_aa_top1=README_NO_AA_TOP1.get(model),
        top1_minus_paper=round(top1 - PAPER_TOP1[model], 2)))
  return rows


def imported_rows(paths) -> list[dict]:
  """`read_eval_json` rows of every file, in Table 2 model order (stable per model)."""
  rows = [row for path in paths for row in read_eval_json(path)]
  return sorted(rows, key=lambda r: MODELS.index(r['model']))


def _imported_note(r: dict) -> str:
  if r['complete']:
    return ''
  return f' (NOT the 50k val set: {r["data"]}, {r["count"]} examples)'


def format_imported_text(rows: list[dict]) -> str:
  header = (f'{"model":<6}{"top-1":>7}{"top-5":>7}{"paper":>7}{"p-5":>6}{"diff":>7}'
            f'{"noAA":>6}  {"origin":<8}{"res":>4} {"crop":<6} {"resize":<13}weights')
  lines = ['Imported weights (python -m efficientnet_jax.evaluate --json):', header,
           '-' * len(header)]
  for r in rows:
    lines.append(
        f'{r["model"]:<6}{r["top1"]:>7.2f}{r["top5"]:>7.2f}{r["paper_top1"]:>7.1f}'
        f'{r["paper_top5"]:>6.1f}{r["top1_minus_paper"]:>+7.2f}'
        f'{_f(r["readme_no_aa_top1"], ".1f"):>6}  {r["origin"]:<8}{r["image_size"]:>4} '
        f'{r["crop"]:<6} {r["resize"]:<13}{r["weights"]}{_imported_note(r)}')
  lines.append('crop: rule/crop_padding (the crop keeps size/(size+padding) of the short '
               'side); paper/p-5: v5; noAA: tensorflow/tpu README without AutoAugment.')
  return '\n'.join(lines)


def format_imported_markdown(rows: list[dict]) -> str:
  lines = ['| model | weights | origin | res | crop | resize | top-1 | top-5 | paper v5 top-1 '
           '| paper v5 top-5 | − paper | README no-AA |',
           '|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(
        f'| {r["model"]} | `{r["weights"]}`{_imported_note(r)} | {r["origin"]} | '
        f'{r["image_size"]} | {r["crop"]} | {r["resize"]} | {r["top1"]:.2f} | '
        f'{r["top5"]:.2f} | {r["paper_top1"]:.1f} | {r["paper_top5"]:.1f} | '
        f'{r["top1_minus_paper"]:+.2f} | {_f(r["readme_no_aa_top1"], ".1f")} |')
  return '\n'.join(lines)


def _printed(value: float) -> str:
  """Two significant digits as Table 2 prints them: 0.70, 1.0, 19."""
  return f'{value:#.2g}'.rstrip('.')


def _f(value, fmt, missing='-'):
  return missing if value is None else format(value, fmt)


def _yes(flag: bool) -> str:
  return 'yes' if flag else 'NO'


def format_text(size: list[dict], accuracy: list[dict], utilization: float) -> str:
  header = (f'{"model":<6}{"res":>5}{"params":>13}{"official":>13}{"paper":>7}{"~":>5}'
            f'{"MACs (G)":>10}{"paper":>7}{"dev %":>7}{"~":>5}{"PFLOP":>8}'
            f'{"v3-core-h":>11}{"A100-h":>9}')
  lines = [f'Paper: {PAPER_REVISION}. "~": ours rounds to the printed figure.',
           header, '-' * len(header)]
  for r in size:
    lines.append(
        f'{r["model"]:<6}{r["resolution"]:>5}{r["params"]:>13,}{r["official_params"]:>13,}'
        f'{_printed(r["paper_params"] / 1e6):>6}M{_yes(r["params_within_rounding"]):>5}'
        f'{r["macs"] / 1e9:>10.3f}{_printed(r["published_macs"] / 1e9):>7}'
        f'{r["macs_deviation_pct"]:>+7.1f}{_yes(r["macs_within_rounding"]):>5}'
        f'{r["train_flops"] / 1e15:>8,.0f}{r["tpu_v3_core_hours"]:>11,.0f}'
        f'{r["a100_hours"]:>9,.0f}')
  lines.append(f'Compute: 2 x MACs x 3 (fwd+bwd) x {EPOCHS} epochs x {TRAIN_IMAGES:,} images; '
               f'hours at {utilization:.0%} of peak (TPU v3 core {TPU_V3_CORE_PEAK / 1e12:g} '
               f'TFLOP/s, A100 {A100_PEAK / 1e12:g} TFLOP/s, bf16).')
  if accuracy:
    lines.append('')
    header = (f'{"model":<6}{"top-1":>7}{"top-5":>7}{"raw-1":>7}{"raw-5":>7}{"paper":>7}'
              f'{"p-5":>6}{"diff":>7}{"noAA":>6}{"ICML":>6}  workdir')
    lines += [header, '-' * len(header)]
    for r in accuracy:
      note = '' if r['finished'] else f' (UNFINISHED: {r["progress"]})'
      lines.append(
          f'{r["model"]:<6}{_f(r["top1"], ".2f"):>7}{_f(r["top5"], ".2f"):>7}'
          f'{_f(r["raw_top1"], ".2f"):>7}{_f(r["raw_top5"], ".2f"):>7}{r["paper_top1"]:>7.1f}'
          f'{r["paper_top5"]:>6.1f}{_f(r["top1_minus_paper"], "+.2f"):>7}'
          f'{_f(r["readme_no_aa_top1"], ".1f"):>6}{_f(r["icml_top1"], ".1f"):>6}  '
          f'{r["workdir"]}{note}')
    lines.append('top-1/top-5: EMA weights; raw-1/raw-5: the raw weights; paper/p-5: v5; '
                 'noAA: tensorflow/tpu README without AutoAugment; ICML: v1 (superseded).')
  return '\n'.join(lines)


def format_markdown(size: list[dict], accuracy: list[dict], utilization: float) -> str:
  lines = [f'Paper: {PAPER_REVISION}. "~" = ours rounds to the printed figure.', '',
           '| model | res | params (ours) | official | paper | ~ | MACs ours (G) | paper (G) '
           '| dev % | ~ | train PFLOP | TPU v3 core-h | A100-h |',
           '|---|---:|---:|---:|---:|:-:|---:|---:|---:|:-:|---:|---:|---:|']
  for r in size:
    lines.append(
        f'| {r["model"]} | {r["resolution"]} | {r["params"]:,} | {r["official_params"]:,} | '
        f'{_printed(r["paper_params"] / 1e6)}M | {_yes(r["params_within_rounding"])} | '
        f'{r["macs"] / 1e9:.3f} | {_printed(r["published_macs"] / 1e9)} | '
        f'{r["macs_deviation_pct"]:+.1f} | {_yes(r["macs_within_rounding"])} | '
        f'{r["train_flops"] / 1e15:,.0f} | {r["tpu_v3_core_hours"]:,.0f} | '
        f'{r["a100_hours"]:,.0f} |')
  lines.append('')
  lines.append(f'Compute at {utilization:.0%} of bf16 peak (TPU v3 core '
               f'{TPU_V3_CORE_PEAK / 1e12:g} TFLOP/s, A100 {A100_PEAK / 1e12:g} TFLOP/s).')
  if accuracy:
    lines += ['', '| model | top-1 EMA | top-5 EMA | top-1 raw | top-5 raw | paper v5 top-1 '
              '| paper v5 top-5 | ours − paper | README no-AA | ICML v1 | workdir |',
              '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|']
    for r in accuracy:
      note = '' if r['finished'] else f' (unfinished: {r["progress"]})'
      lines.append(
          f'| {r["model"]} | {_f(r["top1"], ".2f")} | {_f(r["top5"], ".2f")} | '
          f'{_f(r["raw_top1"], ".2f")} | {_f(r["raw_top5"], ".2f")} | {r["paper_top1"]:.1f} | '
          f'{r["paper_top5"]:.1f} | {_f(r["top1_minus_paper"], "+.2f")} | '
          f'{_f(r["readme_no_aa_top1"], ".1f")} | {_f(r["icml_top1"], ".1f")} | '
          f'`{r["workdir"]}`{note} |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdirs', default='',
                      help='finished train.py workdirs, e.g. b0=runs/b0,b1=runs/b1')
  parser.add_argument('--allow-unfinished', action='store_true',
                      help='report the latest eval of a run that has not finished')
  parser.add_argument('--models', default=','.join(MODELS), help='subset of b0..b7')
  parser.add_argument('--utilization', type=float, default=DEFAULT_UTILIZATION,
                      help='fraction of bf16 peak assumed for the compute estimate')
  parser.add_argument('--eval_json', nargs='+', default=[], metavar='FILE',
                      help='`python -m efficientnet_jax.evaluate --weights=... --json` outputs '
                           '(released weights) to show beside the paper')
  output = parser.add_mutually_exclusive_group()
  output.add_argument('--json', action='store_true', help='one JSON object')
  output.add_argument('--markdown', action='store_true', help='markdown tables')
  args = parser.parse_args(argv)
  try:
    models = [m.strip().lower() for m in args.models.split(',') if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
      raise ValueError(f'--models {",".join(unknown)}; accepted: {", ".join(MODELS)}')
    if not 0 < args.utilization <= 1:
      raise ValueError(f'--utilization={args.utilization}; accepted: a fraction in (0, 1]')
    workdirs = parse_workdirs(args.workdirs)
    results = {m: read_workdir(m, d, allow_unfinished=args.allow_unfinished)
               for m, d in workdirs.items()}
    imported = imported_rows(args.eval_json)
  except ValueError as e:  # WorkdirError included: one line naming the workdir
    print(f'error: {e}', file=sys.stderr)
    return 2
  size = size_rows(models, args.utilization)
  accuracy = accuracy_rows(results)
  if args.json:
    print(json.dumps(dict(paper_revision=PAPER_REVISION, utilization=args.utilization,
                          epochs=EPOCHS, train_images=TRAIN_IMAGES, size=size,
                          accuracy=accuracy, imported=imported), indent=1))
  elif args.markdown:
    print(format_markdown(size, accuracy, args.utilization))
    if imported:
      print('\n' + format_imported_markdown(imported))
  else:
    print(format_text(size, accuracy, args.utilization))
    if imported:
      print('\n' + format_imported_text(imported))
  return 0


if __name__ == '__main__':
  sys.exit(main())
