"""launch/results.py: the paper's tables from the runs' report.json files."""

import csv
import io
import json
import os
import subprocess
import sys

from configs import ablation
from configs import voc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'launch'))
import results  # pylint: disable=g-import-not-at-top,wrong-import-position


def _write(path, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(value if isinstance(value, str) else json.dumps(value))


def _table3_fixture(base):
  """Reports that reproduce Table 3 exactly, one from metrics.jsonl only."""
  rows = ablation.TABLES[3]['rows']
  for row in rows[:3]:
    _write(os.path.join(base, row['run'], 'eval_val', 'report.json'),
           {'miou': row['miou'] / 100, 'pixel_accuracy': 0.9412,
            'step': 30000, 'padding': 'exact'})
  lines = [{'step': 100, 'loss': 1.0},
           {'step': 30000, 'val/miou': rows[3]['miou'] / 100,
            'val/pixel_accuracy': 0.95}]
  _write(os.path.join(base, rows[3]['run'], 'metrics.jsonl'),
         ''.join(json.dumps(line) + '\n' for line in lines))


def test_table3_reproduced_from_fixture_reports(tmp_path):
  _table3_fixture(str(tmp_path))
  rows = results.table_rows(ablation.TABLES, 3, str(tmp_path))
  assert [r['row'] for r in rows] == [
      'ResNet101', 'ResNet101+GAU (no GP, 3x3)', 'ResNet101+GAU (GP, 1x1)',
      'ResNet101+GAU (GP, 3x3)']
  for row in rows:
    assert round(row['pan_jax_miou'], 2) == row['paper_miou']
  assert rows[0]['source'] == 't1_baseline/eval_val/report.json (padding exact)'
  assert rows[3]['source'] == 't3_gau_3x3/metrics.jsonl'
  markdown = results.to_markdown(ablation.TABLES[3]['caption'], rows)
  lines = markdown.splitlines()
  assert lines[0].startswith('**Table 3: GAU on the ResNet101 baseline')
  assert lines[2].startswith('| row | run | paper | pan_jax |')
  assert lines[4] == ('| ResNet101 | `t1_baseline` | 72.60 | 72.60 | — | '
                      '94.12 | 30000 | t1_baseline/eval_val/report.json '
                      '(padding exact) |')
  assert '| 77.84 | 77.84 | — | 95.00 | 30000 |' in lines[7]
  parsed = list(csv.DictReader(io.StringIO(results.to_csv(rows))))
  assert [r['run'] for r in parsed] == [r['run'] for r in rows]
  assert parsed[1]['paper_miou'] == parsed[1]['pan_jax_miou'] == '73.56'
  assert parsed[0]['paper_pixel_accuracy'] == ''  # Not in the sources.


def test_missing_runs_and_table5_from_evaluate_protocols(tmp_path):
  for name, miou in (('ss', 0.5), ('ms_flip', 0.52)):
    _write(os.path.join(tmp_path, name, 'report.json'),
           {'miou': miou, 'pixel_accuracy': 0.8, 'step': 7,
            'padding': 'divisor'})
  rows = results.table_rows(voc.TABLES, 5, str(tmp_path))
  assert [(r['run'], r['paper_miou'], r['pan_jax_miou']) for r in rows] == [
      ('ss', 79.38, 50.0), ('ms', 80.77, None), ('ms_flip', 81.19, 52.0)]
  assert rows[1]['source'] == 'missing'
  assert rows[0]['source'] == 'ss/report.json (padding divisor)'
  assert '| PAN (MS) | `ms` | 80.77 | — |' in results.to_markdown(
      'Table 5', rows)


def test_cli_writes_markdown_and_csv(tmp_path):
  _table3_fixture(str(tmp_path / 'runs'))
  out = subprocess.run(
      [sys.executable, 'launch/results.py', 'configs/ablation.py',
       '--table=3', f'--base={tmp_path / "runs"}',
       f'--output={tmp_path / "out"}'], cwd=REPO, capture_output=True,
      text=True, check=True).stdout
  assert '| ResNet101+GAU (GP, 1x1) | `t3_gau_1x1` | 77.48 | 77.48 |' in out
  assert (tmp_path / 'out' / 'table3.md').read_text() in out
  assert (tmp_path / 'out' / 'table3.csv').read_text().startswith(
      'table,row,run,paper_miou,pan_jax_miou,')
  bad = subprocess.run(
      [sys.executable, 'launch/results.py', 'configs/ablation.py',
       '--table=9'], cwd=REPO, capture_output=True, text=True, check=False)
  assert bad.returncode != 0 and 'no table 9' in bad.stderr
