"""The bench command: python -m pan_jax.bench MODE (train, infer, ..., all).

What each mode measures: pan_jax/bench/__init__.py. Examples:

  python -m pan_jax.bench infer --peer --peer_dir=../shared/peer
  python -m pan_jax.bench train --peer --peer_dir=../shared/peer --rounds=3
  python -m pan_jax.bench train --config=configs/smp_pan.py:resnet50 --size=256
  python -m pan_jax.bench data --workers=0,2
  python -m pan_jax.bench eval --settings=single --eval_config=configs/voc.py
  python -m pan_jax.bench loop --loop_config=configs/demo.py --steps=60
  python -m pan_jax.bench memory  # the train step's peak, ranked
  python -m pan_jax.bench gpu --json=gpu.jsonl  # one GPU, ~8 minutes
  python -m pan_jax.bench all --json=bench.jsonl

`--batch`, `--warmup` and `--iters` have a default per mode; `--config.x=y`
(and `--eval_config.x=y`, `--loop_config.x=y`) override config fields.
All flags: python -m pan_jax.bench --helpfull.
"""

import functools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from pan_jax import runtime
from pan_jax.bench import buffers
from pan_jax.bench import data as data_bench
from pan_jax.bench import eval as eval_bench
from pan_jax.bench import gpu
from pan_jax.bench import harness
from pan_jax.bench import loop
from pan_jax.bench import step
from pan_jax.bench import torch_peer

FLAGS = flags.FLAGS
MODES = ('train', 'infer', 'data', 'eval', 'loop')
# `all` runs MODES; these run only when asked for.
SUITES = ('memory', 'gpu')
# The defaults of --batch, --warmup and --iters, per mode. An eval batch of 0
# is one image per device.
MODE_DEFAULTS = {
    'batch': {'train': 2, 'infer': 1, 'data': 8, 'eval': 0, 'gpu': 8},
    'warmup': {'train': 2, 'infer': 2, 'data': 3, 'eval': 1, 'gpu': 3},
    'iters': {'train': 5, 'infer': 5, 'data': 20, 'eval': 3, 'gpu': 10},
}


def _define_flags() -> None:
  """The command's flags (defined when run as a program, as every command)."""
  config_flags.DEFINE_config_file(
      'config', 'configs/smp_pan.py:resnet101',
      'train, infer: config file[:arg] of the measured network (default: '
      "smp.PAN's architecture, as the peer's).", lock_config=True)
  config_flags.DEFINE_config_file(
      'eval_config', 'configs/voc.py',
      "eval: config file[:arg] of the evaluated network (default: the "
      "paper's ResNet-101 PAN).", lock_config=True)
  config_flags.DEFINE_config_file(
      'loop_config', 'configs/smoke.py',
      'loop: config file[:arg] of the training run (python -m pan_jax.main '
      '--config); skipped when its dataset is not prepared in its '
      'data.data_dir.', lock_config=True)
  flags.DEFINE_integer(
      'batch', None, 'Images per step (default: train 2, infer 1, data 8, '
      'eval one per device; eval rounds up to a multiple of the devices).')
  flags.DEFINE_integer('size', 512,
                       'train, infer: image side; data: crop side.')
  flags.DEFINE_integer('classes', 21, 'train, infer, eval: classes.')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                    'train, infer, eval: compute dtype.')
  flags.DEFINE_integer(
      'warmup', None, 'Untimed steps before timing (default: train and infer '
      '2, data 3 (at least 1), eval 1 after the compiling one).')
  flags.DEFINE_integer('iters', None, 'Timed steps (default: train and infer '
                       '5, data 20, eval 3).')
  flags.DEFINE_integer('rounds', 2, 'train, infer with --peer: alternating '
                       'pan_jax / peer rounds.')
  flags.DEFINE_boolean(
      'peer', False, 'train, infer: also measure the PyTorch peer '
      f'(smp.PAN, PEER_DIR/{harness.PEER_SCRIPT}) side by side; needs '
      '--peer_dir.')
  flags.DEFINE_string('peer_dir', None, f'With --peer: the folder of the '
                      f"peer's {harness.PEER_SCRIPT}, e.g. ../shared/peer.")
  flags.DEFINE_list('peer_layouts', ['nchw'], "With --peer: the peer's "
                    'memory formats, each measured every round: nchw, '
                    'channels_last.')
  flags.DEFINE_string('peer_python', sys.executable, 'With --peer: a Python '
                      'with torch and segmentation_models_pytorch.')
  flags.DEFINE_integer('threads', os.cpu_count() or 1,
                       'With --peer: PyTorch threads.')
  flags.DEFINE_integer('images', 64,
                       'data: records in the temporary VOC-sized dataset.')
  flags.DEFINE_list('workers', ['0', '1', '2'],
                    'data: the worker process counts to measure.')
  flags.DEFINE_list('settings', ['single', 'multi'],
                    'eval: single (one scale), multi (--scales + flip), '
                    'slide (windows of eval.window_size).')
  flags.DEFINE_integer('canvas', 512, 'eval: side of the padded canvas.')
  flags.DEFINE_list('image_size', ['375', '500'],
                    'eval: height,width of the valid image on the canvas.')
  flags.DEFINE_list('scales', [str(s) for s in eval_bench.MULTI_SCALES],
                    'eval: the scales of the multi setting.')
  flags.DEFINE_integer('steps', 30, 'loop: training steps.')
  flags.DEFINE_boolean('bare_step', True, 'loop: also time the bare train '
                       "step at the loop's shapes (loop_over_bare).")
  flags.DEFINE_integer('log_every', 10,
                       'loop: steps per logged (timed) interval.')
  flags.DEFINE_list('infer_batches', ['1', '8'],
                    'gpu: the inference batches (--batch is the train one).')
  flags.DEFINE_boolean('smp', True, 'gpu: also measure smp.PAN with PyTorch '
                       '(AMP bfloat16 + channels_last, same shapes).')
  flags.DEFINE_boolean('smp_compile', True, "gpu: also smp.PAN's train "
                       'step under torch.compile (the last row).')
  flags.DEFINE_float('budget_s', 480., 'gpu: wall-clock budget; rows left '
                     'when it is spent are reported as skipped.')
  flags.DEFINE_string('dump_dir', None, 'memory: keep the XLA dump here '
                      '(default: a temporary folder, removed).')
  flags.DEFINE_integer('top', 12, 'memory: rows per ranking.')
  flags.DEFINE_boolean(
      'cpu_tuning', True, 'Measure with runtime.cpu_env() (XLA CPU flags, '
      "glibc huge pages); false: XLA's CPU defaults.")
  flags.DEFINE_string('json', None, 'Append the records (JSON lines) here.')
  flags.DEFINE_boolean('one', False, 'Internal: measure train, infer or one '
                       'eval setting in this process (what every measurement '
                       'subprocess runs).')
  flags.DEFINE_boolean('torch', False, 'Internal, with --one: measure '
                       'smp.PAN with PyTorch (bench/torch_peer.py), as the '
                       'gpu suite does.')
  flags.register_multi_flags_validator(
      ['peer', 'peer_dir'], _check_peer,
      message=f'--peer needs --peer_dir=DIR, the folder with the PyTorch '
      f"peer's {harness.PEER_SCRIPT} (e.g. --peer_dir=../shared/peer)")
  for name, kind, check in (
      ('workers', 'integers >= 0', lambda v: v.isdigit()),
      ('infer_batches', 'integers > 0', lambda v: v.isdigit() and int(v)),
      ('peer_layouts', 'names out of nchw,channels_last',
       lambda v: v in ('nchw', 'channels_last')),
      ('image_size', 'two integers > 0', lambda v: v.isdigit() and int(v)),
      ('scales', 'numbers > 0', _positive_number),
      ('settings', f'names out of {",".join(eval_bench.SETTINGS)}',
       lambda v: v in eval_bench.SETTINGS)):
    flags.register_validator(
        name, lambda values, check=check, name=name: (
            all(check(v) for v in values) and
            (name != 'image_size' or len(values) == 2)),
        message=f'--{name} takes a comma-separated list of {kind}')


def _check_peer(values: Dict[str, object]) -> bool:
  """--peer has a --peer_dir holding the peer's script."""
  if not values['peer']:
    return True
  if not values['peer_dir']:
    return False
  script = os.path.join(values['peer_dir'], harness.PEER_SCRIPT)
  if not os.path.isfile(script):
    raise flags.ValidationError(
        f'--peer_dir={values["peer_dir"]} has no {harness.PEER_SCRIPT} '
        f'(looked for {os.path.abspath(script)})')
  return True


def _positive_number(text: str) -> bool:
  try:
    return float(text) > 0
  except ValueError:
    return False


def _per_mode(name: str, mode: str) -> int:
  """--batch, --warmup or --iters, or its default for `mode`."""
  value = getattr(FLAGS, name)
  return MODE_DEFAULTS[name][mode] if value is None else value


def _config_args(name: str, child_name: str) -> List[str]:
  """The config flag `name` as command-line flags of a child process.

  Args:
    name: a config flag of this command ('config', 'eval_config', ...).
    child_name: the child's name for it.

  Returns:
    `--child_name=path[:arg]`, then one `--child_name.x=y` per override.
  """
  flag = FLAGS[name]
  args = [f'--{child_name}={config_flags.get_config_filename(flag)}']
  for path in config_flags.get_override_values(flag):
    # A tuple override serializes as one repeated flag per line.
    for arg in FLAGS[f'{name}.{path}'].serialize().splitlines():
      args.append(re.sub(rf'^--(no)?{name}\.', rf'--\g<1>{child_name}.', arg))
  return args


def _flag_args(names: Sequence[str]) -> List[str]:
  """`--name=value` of each flag, for a child process."""
  return [FLAGS[name].serialize() for name in names]


def _train_or_infer(mode: str, env: Dict[str, str]) -> List[dict]:
  """Measures `mode` (and the peer with --peer) in subprocesses."""
  batch, warmup, iters = (_per_mode(n, mode)
                          for n in ('batch', 'warmup', 'iters'))
  child_args = (_config_args('config', 'config') +
                _flag_args(['size', 'classes', 'dtype']) +
                [f'--batch={batch}', f'--warmup={warmup}', f'--iters={iters}'])
  command = harness.bench_command(mode, child_args)
  peers = {}
  if FLAGS.peer:
    peer_dir = os.path.abspath(FLAGS.peer_dir)  # The peer runs in it.
    for layout in FLAGS.peer_layouts:
      peer_command = harness.peer_command(
          peer_dir, FLAGS.peer_python, mode,
          encoder=FLAGS.config.model.backbone, batch=batch, size=FLAGS.size,
          classes=FLAGS.classes, warmup=warmup, iters=iters,
          threads=FLAGS.threads, channels_last=layout == 'channels_last')
      side = 'smp' if layout == 'nchw' else f'smp_{layout}'
      peers[side] = functools.partial(harness.run_child, peer_command, env,
                                      peer_dir)
  return harness.side_by_side(
      mode, functools.partial(harness.run_child, command, env), peers,
      FLAGS.rounds)


def _data() -> List[dict]:
  """The data benchmark (in this process; the pipeline starts its workers)."""
  rows = data_bench.run(
      images=FLAGS.images, batch=_per_mode('batch', 'data'),
      iters=_per_mode('iters', 'data'), warmup=_per_mode('warmup', 'data'),
      size=FLAGS.size, workers=[int(w) for w in FLAGS.workers])
  return [{'mode': 'data', 'rows': rows}]


def _eval(env: Dict[str, str]) -> List[dict]:
  """The eval benchmark, one subprocess per setting."""
  batch, warmup, iters = (_per_mode(n, 'eval')
                          for n in ('batch', 'warmup', 'iters'))
  child_args = (_config_args('eval_config', 'eval_config') +
                _flag_args(['canvas', 'image_size', 'classes', 'dtype',
                            'scales']) +
                [f'--batch={batch}', f'--warmup={warmup}', f'--iters={iters}'])
  rows = eval_bench.run(
      FLAGS.settings,
      lambda setting: harness.run_child(harness.bench_command(
          'eval', child_args + [f'--settings={setting}']), env),
      config_name=config_flags.get_config_filename(FLAGS['eval_config']),
      canvas=FLAGS.canvas, image_size=[int(v) for v in FLAGS.image_size],
      iters=iters, warmup=warmup)
  return [{'mode': 'eval', 'rows': rows}]


def _loop(env: Dict[str, str]) -> List[dict]:
  """The training-loop benchmark (pan_jax.main in a subprocess)."""
  config_args = _config_args('loop_config', 'config')
  bare_step = None
  if FLAGS.bare_step and not loop.missing_dataset(FLAGS.loop_config):
    batch, size, classes = loop.step_shapes(FLAGS.loop_config)
    bare_step = functools.partial(harness.run_child, harness.bench_command(
        'train', config_args + [
            f'--batch={batch}', f'--size={size}', f'--classes={classes}',
            f'--warmup={_per_mode("warmup", "train")}',
            f'--iters={_per_mode("iters", "train")}']), env)
  row = loop.run(
      FLAGS.loop_config, config_args,
      config_name=config_flags.get_config_filename(FLAGS['loop_config']),
      steps=FLAGS.steps, log_every=FLAGS.log_every, env=env,
      bare_step=bare_step)
  return [dict(mode='loop', **row)] if row else []


def _gpu(env: Dict[str, str]) -> List[dict]:
  """The accelerator suite: every row in a fresh subprocess, one table."""
  warmup, iters = _per_mode('warmup', 'gpu'), _per_mode('iters', 'gpu')
  config_args = _config_args('config', 'config')
  # PyTorch's process keeps JAX off the GPU: its memory is PyTorch's alone.
  torch_env = dict(env, JAX_PLATFORMS='cpu')

  def measure(row):
    args = [f'--batch={row["batch"]}', f'--warmup={warmup}',
            f'--iters={iters}', f'--dtype={row["dtype"]}',
            *_flag_args(['size', 'classes'])]
    if row['side'] == 'pan_jax':
      return harness.run_child(
          harness.bench_command(row['mode'], config_args + args), env)
    return harness.run_child(
        [FLAGS.peer_python, '-m', 'pan_jax.bench', row['mode'], '--one',
         '--torch', *config_args, *args,
         f'--smp_compile={row["compile"]}'], torch_env)

  rows = gpu.plan(_per_mode('batch', 'gpu'),
                  [int(b) for b in FLAGS.infer_batches], FLAGS.smp,
                  FLAGS.smp_compile)
  results = gpu.run(rows, measure, budget_s=FLAGS.budget_s)
  summary = {'mode': 'gpu', 'size': FLAGS.size, 'rows': results,
             'config': config_flags.get_config_filename(FLAGS['config'])}
  print(json.dumps(summary), flush=True)
  return [summary]


def _memory(env: Dict[str, str]) -> List[dict]:
  """The train step's buffers live at XLA's peak, ranked (buffers.py)."""
  dump_dir = FLAGS.dump_dir or tempfile.mkdtemp(prefix='pan_jax_xla_dump_')
  try:
    dump_env = dict(env, XLA_FLAGS=(
        f'{env.get("XLA_FLAGS", "")} --xla_dump_to={dump_dir} '
        '--xla_dump_hlo_module_re=jit_train_step').strip())
    record = harness.run_child(harness.bench_command(
        'train', _config_args('config', 'config') +
        _flag_args(['size', 'classes', 'dtype']) +
        [f'--batch={_per_mode("batch", "train")}', '--warmup=0',
         '--iters=1']), dump_env)
    live = buffers.peak_buffers(dump_dir)
  finally:
    if not FLAGS.dump_dir:
      shutil.rmtree(dump_dir, ignore_errors=True)
  print(buffers.report(live, FLAGS.top), flush=True)
  mib = 2**20
  summary = {'mode': 'memory', 'config': record['config'],
             'batch': record['batch'], 'size': record['size'],
             'xla_temp_mib': record.get('xla_temp_mib'),
             'xla_argument_mib': record.get('xla_argument_mib'),
             'peak_live_mib': sum(b.size for b in live) / mib}
  for name, key in (('by_kind', buffers.kind), ('by_part', buffers.part)):
    totals = {}
    for b in live:
      totals[key(b)] = totals.get(key(b), 0) + b.size / mib
    summary[name] = dict(sorted(totals.items(), key=lambda kv: -kv[1]))
  return [summary]


def _measure_here(mode: str) -> dict:
  """`--one`: one train / infer / eval measurement in this process."""
  if mode in step.MODES:
    return step.measure(
        FLAGS.config, mode,
        config_name=config_flags.get_config_filename(FLAGS['config']),
        batch=_per_mode('batch', mode), size=FLAGS.size,
        classes=FLAGS.classes, dtype=FLAGS.dtype,
        warmup=_per_mode('warmup', mode), iters=_per_mode('iters', mode))
  if FLAGS.torch and mode in step.MODES:
    return torch_peer.measure(
        mode, encoder=FLAGS.config.model.backbone,
        batch=_per_mode('batch', mode), size=FLAGS.size,
        classes=FLAGS.classes, warmup=_per_mode('warmup', mode),
        iters=_per_mode('iters', mode), amp=FLAGS.dtype == 'bfloat16',
        compile_model=FLAGS.smp_compile)
  if mode == 'eval' and len(FLAGS.settings) == 1:
    return eval_bench.measure(
        FLAGS.eval_config, FLAGS.settings[0],
        config_name=config_flags.get_config_filename(FLAGS['eval_config']),
        canvas=FLAGS.canvas, image_size=[int(v) for v in FLAGS.image_size],
        batch=_per_mode('batch', mode), iters=_per_mode('iters', mode),
        warmup=_per_mode('warmup', mode), classes=FLAGS.classes,
        dtype=FLAGS.dtype, scales=[float(s) for s in FLAGS.scales])
  raise app.UsageError('--one measures train, infer, or eval with one '
                       f'--settings (got {mode} --settings='
                       f'{",".join(FLAGS.settings)})')


def _append_json(path: str, records: Sequence[dict]) -> None:
  with open(path, 'a') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')


def main(argv: Sequence[str]) -> None:
  """Runs the benchmark of the mode in argv (all modes for 'all')."""
  if len(argv) != 2 or argv[1] not in MODES + SUITES + ('all',):
    raise app.UsageError(f'give one mode out of '
                         f'{"|".join(MODES + SUITES)}|all '
                         f'(got {" ".join(argv[1:]) or "none"})')
  mode = argv[1]
  if FLAGS.one:
    record = _measure_here(mode)
    if FLAGS.json:
      _append_json(FLAGS.json, [record])
    print(json.dumps(record))
    return
  env = harness.cpu_environment(FLAGS.cpu_tuning)
  records = []
  for each in MODES if mode == 'all' else (mode,):
    if each in step.MODES:
      records += _train_or_infer(each, env)
    elif each == 'data':
      records += _data()
    elif each == 'eval':
      records += _eval(env)
    elif each == 'gpu':
      records += _gpu(env)
    elif each == 'memory':
      records += _memory(env)
    else:
      records += _loop(env)
  if FLAGS.json:
    _append_json(FLAGS.json, [dict(r, time=time.time()) for r in records])


def cli() -> None:
  """The console script pan-jax-bench (= python -m pan_jax.bench)."""
  _define_flags()
  runtime.run(main)


if __name__ == '__main__':
  cli()
