"""The command python -m pan_jax.convert (see pan_jax/convert/__init__.py).

    python -m pan_jax.convert --format=torchvision|timm|mmseg|smp
        --input=FILE --output=DIR [--arch=NAME]
"""

from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from pan_jax import convert
from pan_jax import runtime
from pan_jax.convert import archs


def _define_flags() -> None:
  """The command's flags (defined when run as a program, as every command)."""
  flags.DEFINE_enum('format', None, archs.FORMATS,
                    'Library the file comes from.')
  flags.DEFINE_string('input', None, '.pth / .pt / .safetensors file.')
  flags.DEFINE_string('output', None, 'Directory to create.')
  flags.DEFINE_string(
      'arch', None, 'Architecture, e.g. resnet101, resnet101d (timm), '
      'resnet101_v1c (mmseg); default: inferred from the keys.')


def main(argv: Sequence[str]) -> None:
  """Converts --input into --output (see the module docstring)."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  flag_values = flags.FLAGS
  for name in ('format', 'input', 'output'):
    if not flag_values[name].value:
      raise app.UsageError(f'--{name} is required')
  if not flag_values['verbosity'].present:
    # The summary is what matters; INFO lines would bury it.
    logging.set_verbosity(logging.WARNING)
  # A file that cannot be converted is a ConversionError (a UserError):
  # runtime.run prints its message alone.
  print(convert.convert(flag_values.format, flag_values.input,
                        flag_values.output, flag_values.arch))


def cli() -> None:
  """The console script pan-jax-convert (= python -m pan_jax.convert)."""
  _define_flags()
  runtime.run(main)


if __name__ == '__main__':
  cli()
