"""scripts/stage_speed.py: per-stage median images/s from a workdir's metrics.jsonl."""

import json

from tests.script_loader import load_script


def test_medians_per_stage_and_a_clear_error(tmp_path, capsys):
  stage_speed = load_script('stage_speed')
  records = [{'event': 'stage_start', 'image_size': 72},
             *({'split': 'train', 'images_per_sec': v} for v in (100.0, 800.0, 790.0)),
             {'split': 'eval', 'top1': 0.5},
             {'event': 'stage_start', 'image_size': 96},
             *({'split': 'train', 'images_per_sec': v} for v in (500.0, 510.0))]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  assert stage_speed.stage_speeds(str(tmp_path)) == {'72': 790.0, '96': 505.0}
  assert stage_speed.main([str(tmp_path), '--json']) == 0
  assert json.loads(capsys.readouterr().out) == {str(tmp_path): {'72': 790.0, '96': 505.0}}
  assert stage_speed.main([str(tmp_path / 'missing')]) == 2
  assert 'no metrics.jsonl; accepted: a train.py workdir' in capsys.readouterr().err
