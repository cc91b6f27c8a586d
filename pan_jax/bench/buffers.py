"""Where a compiled step's memory goes: XLA's buffers live at its peak, ranked.

`python -m pan_jax.bench memory` compiles the train step once with
`--xla_dump_to` and reads two files of the dump: the live ranges
(`*-live-range.txt`: every value live at the peak of the buffer plan, with
its size) and the optimized HLO (`*cpu_after_optimizations.txt`: each
value's shape, opcode and op_name, i.e. the model layer that made it). A
fusion without an op_name takes the first one found among its operands.
Every value is put in a part of the network (backbone stage, centre,
decoder, loss, arguments) and a kind (convolution output, a layout copy of
an activation or of a kernel, arguments, or the opcode of the fusion's op).
"""

import collections
import glob
import os
import re
from typing import Dict, List, NamedTuple, Tuple

_LIVE = re.compile(r'^\s+(\S+)\{([\d,]*)\}: (\d+) bytes', re.M)
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = '
                          r'(\(.*?\)|\S+?(?:\{[^}]*\})?) ([\w\-]+)\((.*)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$')


class Buffer(NamedTuple):
  name: str  # The HLO value.
  shape: str
  opcode: str
  op_name: str  # '' where none was found.
  size: int  # Bytes.


def dump_files(dump_dir: str, module: str = 'jit_train_step'
               ) -> Tuple[str, str]:
  """(live-range file, optimized HLO file) of `module` in an XLA dump."""
  found = glob.glob(os.path.join(dump_dir, f'*{module}*-live-range.txt'))
  if len(found) != 1:
    raise FileNotFoundError(f'{dump_dir}: expected one *{module}*'
                            f'-live-range.txt, found {len(found)}')
  return found[0], found[0].replace('-live-range.txt', '.txt')


def peak_buffers(dump_dir: str, module: str = 'jit_train_step'
                 ) -> List[Buffer]:
  """The values live at the peak of `module`'s buffer plan, largest first.

  Args:
    dump_dir: an `--xla_dump_to` folder (CPU dumps hold the live ranges).
    module: a substring of the HLO module's file names.

  Returns:
    One Buffer per live value.
  """
  live_file, hlo_file = dump_files(dump_dir, module)
  with open(live_file) as f:
    text = f.read()
  start = text.index('(peak):')
  end = text.find('Stack trace', start)
  live = _LIVE.findall(text[start:end if end > 0 else None])
  info, operands, roots, computation = {}, {}, {}, None
  with open(hlo_file) as f:
    for line in f:
      header = _COMPUTATION.match(line)
      if header and '=' not in line.split('{')[0]:
        computation = header.group(1)
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      name, shape, opcode, rest = m.groups()
      op = _OP_NAME.search(line)
      calls = _CALLS.search(line)
      info[name] = (shape.split('{')[0], opcode, op.group(1) if op else '',
                    calls.group(1) if calls else '')
      operands[name] = re.findall(r'%([\w.\-]+)', rest.split('),')[0])
      if line.lstrip().startswith('ROOT') and op and computation:
        roots[computation] = op.group(1)

  def op_name_of(name, depth=0):
    shape, opcode, op, calls = info.get(name, ('', '', '', ''))
    op = op or roots.get(calls, '')
    if op or depth > 4:
      return op
    for operand in operands.get(name, []):
      found = op_name_of(operand, depth + 1)
      if found:
        return found
    return ''

  buffers = []
  for name, _, size in live:
    shape, opcode, _, _ = info.get(name, ('?', '?', '', ''))
    buffers.append(Buffer(name, shape, opcode, op_name_of(name), int(size)))
  return sorted(buffers, key=lambda b: -b.size)


def part(buffer: Buffer) -> str:
  """The part of the network behind a buffer (ResNet block index dropped)."""
  if buffer.opcode == 'parameter' or buffer.name.startswith('state'):
    return 'arguments (state, batch)'
  if kind(buffer) == 'layout copy of a kernel':
    return 'kernels of every layer'
  if not buffer.op_name:
    return 'unattributed'
  op = re.sub(r'^jit\([\w]+\)/', '', buffer.op_name)
  stage = re.search(r'backbone/(layer\d)', op)
  if stage:
    return f'backbone {stage.group(1)}'
  if 'backbone' in op:
    return 'backbone stem'
  for scope in ('center', 'gau', 'head', 'classifier'):
    if f'/{scope}' in op or op.startswith(scope):
      return 'FPA centre' if scope == 'center' else f'decoder ({scope})'
  if 'PAN' in op:
    return 'output upsampling'
  return 'loss and update'


def kind(buffer: Buffer) -> str:
  """What a buffer holds, as far as its HLO says."""
  if buffer.opcode == 'parameter' or buffer.name.startswith('state'):
    return 'arguments'
  if 'conv_general_dilated' in buffer.op_name and buffer.opcode in (
      'convolution', 'dot'):
    return 'convolution output'
  if re.match(r'(transpose_copy_fusion|wrapped_copy|copy)\b', buffer.name):
    dims = re.findall(r'\d+', buffer.shape.partition('[')[2])
    if len(dims) == 4 and dims[0] == dims[1] and int(dims[0]) <= 7:
      return 'layout copy of a kernel'
    return 'layout copy of an activation'
  return f'{buffer.opcode} ({buffer.op_name.rsplit("/", 1)[-1] or "?"})'


def report(buffers: List[Buffer], top: int = 12) -> str:
  """Totals by kind and part, then the largest buffers, as text."""
  mib = 2**20
  total = sum(b.size for b in buffers)
  lines = [f'{total / mib:.1f} MiB live at the peak in {len(buffers)} values']
  for title, key in (('by kind', kind), ('by part', part),
                     ('by part and kind', lambda b: f'{part(b)}: {kind(b)}')):
    sums: Dict[str, List[int]] = collections.defaultdict(lambda: [0, 0])
    for b in buffers:
      sums[key(b)][0] += b.size
      sums[key(b)][1] += 1
    lines.append(f'-- {title}')
    for name, (size, count) in sorted(sums.items(),
                                      key=lambda kv: -kv[1][0])[:top]:
      lines.append(f'{size / mib:9.1f} MiB {count:5d}  {name}')
  lines.append('-- largest values')
  for b in buffers[:top]:
    lines.append(f'{b.size / mib:9.1f} MiB  {b.name} {b.shape} {b.opcode}  '
                 f'{b.op_name}')
  return '\n'.join(lines)
