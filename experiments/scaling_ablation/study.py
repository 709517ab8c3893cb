"""One command per scaling study (see README.md).

    python -m experiments.scaling_ablation.study --study=grid --preset=small --root=runs/experiments
    python -m experiments.scaling_ablation.study --study=single_vs_compound --preset=small
    python -m experiments.scaling_ablation.study --study=table_vs_formula --preset=imagenet \
        --shard=3/16 --set=data.data_dir=/data/tfds      # one of 16 cluster jobs
    python -m experiments.scaling_ablation.study --study=grid --preset=small --seeds=5

Every point runs with the preset's seeds (`--seeds` overrides), one workdir
each; results.md gives each point's mean and 95 % interval over its seeds and
the study's verdicts, paired by seed (experiments/README.md, "The driver").
"""

from __future__ import annotations

import argparse
import sys

from experiments import harness
from experiments.scaling_ablation import presets
from experiments.scaling_ablation import studies


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--study', required=True, help=', '.join(studies.STUDY_NAMES))
  parser.add_argument('--preset', default='small', help=', '.join(presets.PRESET_NAMES))
  harness.add_flags(parser)
  args = parser.parse_args(argv)
  return harness.main_for(
      lambda: studies.make_study(args.study, presets.get_preset(args.preset)), args)


if __name__ == '__main__':
  sys.exit(main())
