"""Progress of the commands: a one-line bar with total and ETA on stderr.

    with progress.Bar('evaluate', total=1449, unit='images') as bar:
      for batch in batches:
        ...
        bar.update(len(batch))

On a terminal (stderr is a tty), or when asked (PAN_JAX_PROGRESS=1, or
`show=True`), one line is redrawn in place with a carriage return:

    evaluate  37/100 images  37%  12.3 images/s  ETA 5s

Elsewhere (a log file, CI) nothing is written while it runs, so logs stay
clean, and one summary line is written at the end:

    evaluate: 100/100 images in 8.1s (12.3 images/s)

PAN_JAX_PROGRESS=0 turns both off. Only process 0 of a multi-host run
writes (the others' progress is the same). Rates and ETAs are measured from
the first update on (the first step includes compilation, which would skew
them); the summary's time is the whole, from the bar's creation.
"""

import os
import sys
import time
from typing import IO, Iterable, Iterator, Optional, TypeVar

import jax

T = TypeVar('T')
# Seconds between two redraws of the bar.
_REDRAW = 0.2


def format_duration(seconds: float) -> str:
  """'42s', '3m05s' or '2h07m'."""
  seconds = int(round(max(0.0, seconds)))
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


class Bar:
  """A progress bar of `total` units (see the module docstring).

  Attributes:
    count: units done so far.
  """

  def __init__(self, description: str, total: Optional[int] = None,
               unit: str = 'items', *, show: Optional[bool] = None,
               enabled: bool = True, rate: bool = True,
               stream: Optional[IO[str]] = None):
    """Starts a bar (writes nothing yet).

    Args:
      description: what is counted, first on the line (the command's name).
      total: units expected (None: unknown, no percentage or ETA).
      unit: plural name of the unit.
      show: True redraws the bar, False writes only the summary line;
        default: PAN_JAX_PROGRESS, else whether the stream is a terminal.
      enabled: False writes nothing at all (a library call, a test).
      rate: show units/s and the ETA (False for a few uneven stages).
      stream: where to write (sys.stderr).
    """
    self._description = description
    self._total = total
    self._unit = unit
    self._stream = stream if stream is not None else sys.stderr
    setting = os.environ.get('PAN_JAX_PROGRESS', '')
    self._enabled = (enabled and setting != '0' and
                     jax.process_index() == 0)
    if show is None:
      show = setting == '1' or _is_tty(self._stream)
    self._show = show
    self._with_rate = rate
    self.count = 0
    self._created = time.monotonic()
    self._start = None  # Time of the first update.
    self._counted_from = 0  # Units done by then (not in the rate).
    self._drawn = 0.0
    self._width = 0
    self._closed = False

  def update(self, n: int = 1) -> None:
    """Adds `n` units done."""
    now = time.monotonic()
    self.count += n
    if self._start is None:
      self._start, self._counted_from = now, self.count
    if self._enabled and self._show and (
        now - self._drawn >= _REDRAW or self.count == self._total):
      self._drawn = now
      self._write('\r' + self._line(now, final=False), pad=True)

  def close(self) -> None:
    """Writes the summary line (once)."""
    if self._closed:
      return
    self._closed = True
    if not self._enabled:
      return
    line = self._line(time.monotonic(), final=True)
    self._write(('\r' if self._show else '') + line, pad=self._show)
    self._write('\n')

  def __enter__(self) -> 'Bar':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _rate(self, now: float) -> Optional[float]:
    if not self._with_rate or self._start is None or now <= self._start:
      return None
    done = self.count - self._counted_from
    return done / (now - self._start) if done > 0 else None

  def _line(self, now: float, final: bool) -> str:
    rate = self._rate(now)
    counted = (f'{self.count}/{self._total}' if self._total is not None
               else str(self.count))
    if final:
      elapsed = now - self._created
      line = f'{self._description}: {counted} {self._unit} in ' \
             f'{format_duration(elapsed)}'
      if rate is not None:
        line += f' ({rate:.3g} {self._unit}/s)'
      return line
    line = f'{self._description}  {counted} {self._unit}'
    if self._total:
      line += f'  {100 * self.count / self._total:3.0f}%'
    if rate is not None:
      line += f'  {rate:.3g} {self._unit}/s'
      if self._total is not None:
        remaining = max(0, self._total - self.count) / rate
        line += f'  ETA {format_duration(remaining)}'
    return line

  def _write(self, text: str, pad: bool = False) -> None:
    if pad:
      # Blank what is left of a longer previous line.
      width = len(text.lstrip('\r'))
      text += ' ' * max(0, self._width - width)
      self._width = width
    try:
      self._stream.write(text)
      self._stream.flush()
    except (OSError, ValueError):  # A closed or broken stream: not fatal.
      self._enabled = False


def track(iterable: Iterable[T], description: str,
          total: Optional[int] = None, unit: str = 'items', **kwargs
          ) -> Iterator[T]:
  """Yields the items of `iterable`, one unit of a Bar each.

  Args:
    iterable: the items.
    description, unit, **kwargs: as Bar's.
    total: default len(iterable) where it has one.

  Yields:
    The items.
  """
  if total is None and hasattr(iterable, '__len__'):
    total = len(iterable)
  with Bar(description, total, unit, **kwargs) as bar:
    for item in iterable:
      yield item
      bar.update()


def _is_tty(stream: IO[str]) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False
