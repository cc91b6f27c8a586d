"""Puts trained runs' numbers beside the paper's: one table, Markdown + CSV.

A config file's TABLES (configs/ablation.py: Tables 1-3; configs/voc.py:
Table 5) lists each table's rows, the run behind each row and the paper's
mIoU / pixel accuracy. This script finds each run's numbers under --base and
prints the table with a column "paper" and a column "pan_jax":

  python launch/results.py configs/ablation.py --table=3 --base=runs/ablation
  python launch/results.py configs/voc.py --table=5 \
      --base=runs/voc_r101/eval_table5 [--output=results/]

For a row whose run is RUN, the first of these that exists is used:
  BASE/RUN/report.json              (evaluate --protocols: OUT/<protocol>/)
  BASE/RUN/eval_<split>/report.json (evaluate's default output of a workdir;
                                     launch/sweep.py --evaluate runs it)
  BASE/RUN/metrics.jsonl            (the last validation of training)
A run with none of them is shown as missing. With --output=DIR the table is
also written to DIR/table<N>.md and DIR/table<N>.csv.
"""

import csv
import importlib.util
import io
import json
import os
import sys

from absl import app
from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MISSING = '—'


def load_tables(config_path: str) -> dict:
  """The TABLES dict of a config file (path, optionally with ':arg')."""
  path = config_path.split(':', 1)[0]
  if _REPO not in sys.path:
    sys.path.insert(0, _REPO)  # Config files import `configs.base`.
  spec = importlib.util.spec_from_file_location('_tables_config', path)
  if spec is None:
    raise ValueError(f'{path}: not a Python file.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'TABLES'):
    raise ValueError(f'{path} defines no TABLES (the paper\'s tables); '
                     'configs/ablation.py and configs/voc.py do.')
  return module.TABLES


def find_result(base: str, run: str, split: str = 'val') -> dict | None:
  """A run's scores: {'miou', 'pixel_accuracy' (fractions), 'step', 'source'}.

  Args:
    base: the folder holding the runs.
    run: the row's run name.
    split: the split of evaluate's default output folder (eval_<split>).

  Returns:
    None when nothing was found (see the module docstring for the order).
  """
  for report_path in (os.path.join(base, run, 'report.json'),
                      os.path.join(base, run, f'eval_{split}',
                                   'report.json')):
    if os.path.isfile(report_path):
      with open(report_path) as f:
        report = json.load(f)
      padding = report.get('padding', 'exact')
      return {'miou': report.get('miou'),
              'pixel_accuracy': report.get('pixel_accuracy'),
              'step': report.get('step'),
              'source': f'{os.path.relpath(report_path, base)} '
                        f'(padding {padding})'}
  metrics_path = os.path.join(base, run, 'metrics.jsonl')
  if os.path.isfile(metrics_path):
    last = None
    with open(metrics_path) as f:
      for line in f:
        record = json.loads(line) if line.strip() else {}
        if 'val/miou' in record:
          last = record
    if last is not None:
      return {'miou': last['val/miou'],
              'pixel_accuracy': last.get('val/pixel_accuracy'),
              'step': last.get('step'),
              'source': os.path.relpath(metrics_path, base)}
  return None


def table_rows(tables: dict, table: int, base: str,
               split: str = 'val') -> list[dict]:
  """One dict per row of `table`: the paper's numbers and the run's (in %).

  Raises:
    ValueError: no such table.
  """
  if table not in tables:
    raise ValueError(f'no table {table}; this file has '
                     f'{", ".join(map(str, tables))}')
  def percent(value):
    return None if value is None else 100 * value

  rows = []
  for row in tables[table]['rows']:
    found = find_result(base, row['run'], split)
    rows.append({
        'table': table, 'row': row['label'], 'run': row['run'],
        'paper_miou': row['miou'],
        'pan_jax_miou': percent(found['miou']) if found else None,
        'paper_pixel_accuracy': row['pixel_accuracy'],
        'pan_jax_pixel_accuracy': (percent(found['pixel_accuracy'])
                                   if found else None),
        'step': found['step'] if found else None,
        'source': found['source'] if found else 'missing',
    })
  return rows


def _number(value) -> str:
  return _MISSING if value is None else f'{value:.2f}'


def to_markdown(caption: str, rows: list[dict]) -> str:
  """The table in Markdown, mIoU and pixel accuracy in %."""
  lines = [f'**{caption}** (mIoU and pixel accuracy, %)', '',
           '| row | run | paper | pan_jax | paper pixel acc. | '
           'pan_jax pixel acc. | step | from |',
           '|---|---|---|---|---|---|---|---|']
  for row in rows:
    lines.append(
        f'| {row["row"]} | `{row["run"]}` | {_number(row["paper_miou"])} | '
        f'{_number(row["pan_jax_miou"])} | '
        f'{_number(row["paper_pixel_accuracy"])} | '
        f'{_number(row["pan_jax_pixel_accuracy"])} | '
        f'{_MISSING if row["step"] is None else row["step"]} | '
        f'{row["source"]} |')
  lines += ['', f'{_MISSING} under "paper": not in the sources available to '
            f'this repository; under "pan_jax": no result found.']
  return '\n'.join(lines) + '\n'


def to_csv(rows: list[dict]) -> str:
  """The table as CSV (empty cells where a number is missing)."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(rows[0]),
                          lineterminator='\n')
  writer.writeheader()
  for row in rows:
    writer.writerow({k: '' if v is None else
                     (f'{v:.2f}' if isinstance(v, float) else v)
                     for k, v in row.items()})
  return buffer.getvalue()


def _define_flags() -> None:
  """The script's flags (absl, as every pan_jax command)."""
  flags.DEFINE_string('config', None, 'Config file with TABLES (or give it '
                      'positionally).')
  flags.DEFINE_integer('table', None, 'The paper\'s table number.',
                       required=True)
  flags.DEFINE_string('base', 'runs/sweep', 'Folder holding the runs (the '
                      'sweep\'s --workdir_base, or evaluate --protocols\' '
                      '--output).')
  flags.DEFINE_string('split', 'val', 'Split of evaluate\'s default output '
                      'folder eval_<split>.')
  flags.DEFINE_string('output', None, 'Also write table<N>.md and '
                      'table<N>.csv here.')


def main(argv):
  """Prints the table as Markdown (and writes it with --output)."""
  args = list(argv[1:])
  config = flags.FLAGS.config
  if args and not config:
    config = args.pop(0)
  if args or not config:
    raise app.UsageError('usage: launch/results.py CONFIG --table=N '
                         '--base=DIR')
  tables = load_tables(config)
  table = flags.FLAGS.table
  try:
    rows = table_rows(tables, table, flags.FLAGS.base, flags.FLAGS.split)
  except ValueError as e:
    raise app.UsageError(f'{config}: {e}') from e
  markdown = to_markdown(tables[table]['caption'], rows)
  print(markdown, end='')
  if flags.FLAGS.output:
    os.makedirs(flags.FLAGS.output, exist_ok=True)
    for suffix, text in (('md', markdown), ('csv', to_csv(rows))):
      path = os.path.join(flags.FLAGS.output, f'table{table}.{suffix}')
      with open(path, 'w') as f:
        f.write(text)
      print(f'wrote {path}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
