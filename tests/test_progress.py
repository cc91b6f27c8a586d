"""Tests of pan_jax.progress: the bar on a terminal, one line elsewhere."""

import io
import os
import subprocess
import sys

from pan_jax import progress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Tty(io.StringIO):

  def isatty(self):
    return True


def test_bar_on_a_terminal_redraws_one_line_with_total_and_eta(monkeypatch):
  monkeypatch.delenv('PAN_JAX_PROGRESS', raising=False)
  monkeypatch.setattr(progress, '_REDRAW', 0.0)  # Draw at every update.
  stream = _Tty()
  with progress.Bar('evaluate', total=5, unit='images', stream=stream) as bar:
    for _ in range(5):
      bar.update()
  text = stream.getvalue()
  assert text.count('\n') == 1 and text.endswith('\n')  # One line.
  frames = text.rstrip('\n').split('\r')[1:]
  assert frames[0].startswith('evaluate  1/5 images   20%')
  # From the second update on, a rate and the time left.
  assert 'images/s' in frames[1] and 'ETA' in frames[1]
  assert frames[3].split()[1] == '4/5'
  assert frames[-1].startswith('evaluate: 5/5 images in ')


def test_bar_elsewhere_writes_only_the_summary(monkeypatch):
  monkeypatch.delenv('PAN_JAX_PROGRESS', raising=False)
  stream = io.StringIO()  # Not a terminal: a log file, CI.
  items = list(progress.track(range(7), 'predict', unit='images',
                              stream=stream))
  assert items == list(range(7))
  lines = stream.getvalue().splitlines()
  assert len(lines) == 1 and '\r' not in stream.getvalue()
  assert lines[0].startswith('predict: 7/7 images in ')
  # Asked for: the bar even without a terminal; 0: nothing at all.
  monkeypatch.setenv('PAN_JAX_PROGRESS', '1')
  stream = io.StringIO()
  list(progress.track(range(3), 'x', stream=stream))
  assert stream.getvalue().startswith('\rx  1/3 items')
  monkeypatch.setenv('PAN_JAX_PROGRESS', '0')
  stream = io.StringIO()
  list(progress.track(range(3), 'x', stream=stream))
  assert not stream.getvalue()
  monkeypatch.delenv('PAN_JAX_PROGRESS')
  stream = io.StringIO()
  with progress.Bar('x', 2, stream=stream, enabled=False) as bar:
    bar.update(2)
  assert not stream.getvalue()


def test_durations():
  assert progress.format_duration(42.4) == '42s'
  assert progress.format_duration(185) == '3m05s'
  assert progress.format_duration(7620) == '2h07m'


def test_prepare_shows_totals_and_no_tfds_lines(tmp_path):
  """A clean prepare: one summary line per split, none of tfds' bars, no
  warnings."""
  result = subprocess.run(
      [sys.executable, '-m', 'pan_jax.data.prepare', '--dataset=synthetic',
       f'--source_dir={tmp_path / "src"}', f'--data_dir={tmp_path / "data"}',
       '--num_train=6', '--num_val=3', '--num_workers=0'],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='', PAN_JAX_PROGRESS=''),
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stderr.splitlines()
  for split, count in (('train', 6), ('val', 3), ('trainval', 9)):
    assert any(l.startswith(f'prepare {split}: {count}/{count} examples in ')
               for l in lines), result.stderr
  assert 'Shuffling' not in result.stderr
  assert 'incomplete.' not in result.stderr
  assert 'Unable to initialize backend' not in result.stderr
  # Log lines are I (info) only: no warning or error.
  assert not [l for l in lines if l[:1] in 'WEF' and l[1:5].isdigit()], (
      result.stderr)
