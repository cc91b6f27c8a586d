"""The accelerator suite (`python -m pan_jax.bench gpu`): one table and JSON.

On one NVIDIA GPU it measures, each in a fresh process: pan_jax's train step
in bfloat16 and float32 (images/s, MFU against the chip's peak, peak HBM
from jax's memory stats), pan_jax's inference at batch 1 and 8, and smp.PAN
with PyTorch's AMP (bfloat16) and channels_last on the same shapes
(torch_peer.py; torch.compile as one more train row with --smp_compile).
Measurements run in the order of `plan`; once --budget_s is spent the rest
are reported as skipped, so the suite ends in time (8 minutes by default).
On a CPU the same command is the smoke mode (tiny flags, MFU n/a).
"""

import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

Record = Dict[str, Any]

# Dense peak TFLOP/s per chip: (device_kind substring, bfloat16, float32).
# float32 convolutions and matmuls run as TF32 on these chips at JAX's (and
# cuDNN's) default precision, so the float32 peak is the TF32 one. The first
# match wins: specific names come first. NVIDIA data sheets, no sparsity.
PEAK_TFLOPS: Tuple[Tuple[str, float, float], ...] = (
    ('B200', 2250., 1100.),
    ('H200', 989., 494.),
    ('H100 PCIe', 756., 378.),
    ('H100', 989., 494.),
    ('A100', 312., 156.),
    ('L40S', 362., 183.),
    ('L4', 121., 60.),
)
# A measurement is started only while this much of the budget is left.
START_MARGIN_S = 45.


def peak_tflops(device_kind: str, dtype: str) -> Optional[float]:
  """The chip's dense peak for `dtype`, or None for an unknown chip (CPU)."""
  for name, bf16, fp32 in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return bf16 if dtype == 'bfloat16' else fp32
  return None


def plan(train_batch: int, infer_batches: Sequence[int], smp: bool,
         smp_compile: bool) -> List[Record]:
  """The suite's measurements, in the order they run.

  Args:
    train_batch: images per train step.
    infer_batches: the inference batches.
    smp: include smp.PAN (PyTorch AMP + channels_last).
    smp_compile: include smp.PAN's train step under torch.compile (last: its
      compilation is the slowest).

  Returns:
    One dict per measurement: side, mode, dtype, batch, compile.
  """
  rows = [dict(side='pan_jax', mode='train', dtype='bfloat16',
               batch=train_batch)]
  rows += [dict(side='pan_jax', mode='infer', dtype='bfloat16', batch=b)
           for b in infer_batches]
  rows.append(dict(side='pan_jax', mode='train', dtype='float32',
                   batch=train_batch))
  if smp:
    rows.append(dict(side='smp', mode='train', dtype='bfloat16',
                     batch=train_batch))
    rows += [dict(side='smp', mode='infer', dtype='bfloat16', batch=b)
             for b in infer_batches]
    if smp_compile:
      rows.append(dict(side='smp', mode='train', dtype='bfloat16',
                       batch=train_batch, compile=True))
  for row in rows:
    row.setdefault('compile', False)
  return rows


def run(rows: Sequence[Record], measure: Callable[[Record], Record], *,
        budget_s: float) -> List[Record]:
  """Measures every planned row while the budget lasts; prints the table.

  Args:
    rows: `plan`'s measurements.
    measure: runs one row in a subprocess and returns its record.
    budget_s: wall-clock budget of the whole suite.

  Returns:
    One result per row: the row, and images_per_s, median_s, mfu,
    peak_device_mib, peak_rss_mib, device_kind, gflop_per_step; or `skipped`
    with the reason.
  """
  start = time.perf_counter()
  results = []
  # (mode, dtype, batch) -> pan_jax's FLOP count, for smp's MFU too.
  flops = {}
  for row in rows:
    left = budget_s - (time.perf_counter() - start)
    if left < START_MARGIN_S:
      results.append(dict(row, skipped=f'budget: {left:.0f} s left'))
      continue
    try:
      record = measure(row)
    except RuntimeError as e:  # A failed child (e.g. no torch): a row says so.
      results.append(dict(row, skipped=str(e).splitlines()[0][:200]))
      continue
    kind = record.get('device_kind', '?')
    key = (row['mode'], row['dtype'], row['batch'])
    if row['side'] == 'pan_jax':
      flops[key] = record['gflop_per_step'] * 1e9
    step_flops = flops.get(key)
    peak = peak_tflops(kind, row['dtype'])
    mfu = (step_flops / record['median_s'] / (peak * 1e12)
           if step_flops and peak else None)
    results.append(dict(
        row, device_kind=kind, median_s=record['median_s'],
        images_per_s=record['images_per_s'], mfu=mfu,
        gflop_per_step=(step_flops / 1e9 if step_flops else None),
        peak_device_mib=record.get('peak_device_mib'),
        peak_rss_mib=record.get('peak_rss_mib'),
        compile_s=record.get('compile_s', record.get('warmup_s'))))
  print(table(results), flush=True)
  return results


def table(results: Sequence[Record]) -> str:
  """The results as one fixed-width table."""

  def fmt(value, spec):
    return 'n/a' if value is None else format(value, spec)

  lines = [f'{"side":<8} {"mode":<6} {"dtype":<9} {"batch":>5} {"img/s":>8} '
           f'{"step s":>8} {"MFU":>6} {"peak MiB":>9} {"compile s":>9}  note']
  for r in results:
    note = r.get('skipped', '') or ('torch.compile' if r['compile'] else '')
    if r['side'] == 'smp' and not r.get('skipped'):
      note = ('AMP+channels_last ' + note).strip()
    peak = r.get('peak_device_mib') or r.get('peak_rss_mib')
    lines.append(
        f'{r["side"]:<8} {r["mode"]:<6} {r["dtype"]:<9} {r["batch"]:>5} '
        f'{fmt(r.get("images_per_s"), ".2f"):>8} '
        f'{fmt(r.get("median_s"), ".4f"):>8} '
        f'{fmt(r.get("mfu") and 100 * r["mfu"], ".1f"):>6} '
        f'{fmt(peak, ".0f"):>9} {fmt(r.get("compile_s"), ".1f"):>9}  {note}')
  return '\n'.join(lines)
