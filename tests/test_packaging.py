"""The package as users install it: pyproject.toml, the lock, the commands.

The install itself (`pip install .` into a fresh venv, then the console
scripts from outside the repository) is the CI step launch/check_install.sh,
which needs the network or a filled pip cache; these tests read the files and
run the commands of this checkout.
"""

import os
import re
import subprocess
import sys
import tomllib

from packaging import requirements
from packaging import version
import pytest

import pan_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ('pan_jax.main', 'pan_jax.evaluate', 'pan_jax.predict',
            'pan_jax.export', 'pan_jax.convert', 'pan_jax.data.prepare',
            'pan_jax.bench')


def _pyproject():
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)['project']


def _pins():
  """{normalised name: version} of constraints.txt."""
  pins = {}
  with open(os.path.join(REPO, 'constraints.txt')) as f:
    for line in f:
      line = line.split('#')[0].strip()
      if line:
        name, pinned = line.split('==')
        pins[_normalise(name)] = version.Version(pinned)
  return pins


def _normalise(name):
  return re.sub(r'[-_.]+', '-', name).lower()


def test_the_lock_pins_every_dependency_within_its_range():
  project, pins = _pyproject(), _pins()
  wanted = [requirements.Requirement(r) for r in project['dependencies']]
  for extra in ('torch', 'gcs', 'dev'):
    wanted += [requirements.Requirement(r)
               for r in project['optional-dependencies'][extra]]
  for requirement in wanted:
    name = _normalise(requirement.name)
    assert name in pins, f'{name} is not pinned in constraints.txt'
    assert requirement.specifier.contains(pins[name], prereleases=True), (
        f'constraints.txt pins {name}=={pins[name]} outside '
        f'{requirement.specifier}')
  # The accelerator extras are jax's own, at the pinned jax.
  for extra in ('tpu', 'cuda12', 'cuda13'):
    (spec,) = project['optional-dependencies'][extra]
    requirement = requirements.Requirement(spec)
    assert requirement.name == 'jax' and requirement.extras == {extra}
    assert requirement.specifier.contains(pins['jax'])


def test_ceilings_only_where_a_minor_release_can_break_us():
  ceilings = {requirements.Requirement(r).name
              for r in _pyproject()['dependencies'] if '<' in r}
  assert ceilings == {'jax', 'jaxlib', 'orbax-checkpoint'}


def test_this_environment_is_the_lock():
  # The tests run on the locked versions (setup_env.sh installs with -c):
  # a drift means constraints.txt no longer says what was tested.
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  pins = _pins()
  for name in ('jax', 'jaxlib', 'flax', 'orbax-checkpoint', 'optax', 'grain',
               'tensorflow-datasets', 'numpy', 'safetensors'):
    assert version.Version(metadata.version(name)) == pins[name], name


def test_metadata_agrees():
  project = _pyproject()
  assert project['name'] == 'pan-jax'
  with open(os.path.join(REPO, 'CITATION.cff')) as f:
    citation = f.read()
  assert re.search(r'^version: (\S+)$', citation, re.M).group(1) == (
      pan_jax.__version__)
  assert 'arXiv:1805.10180' in citation
  with open(os.path.join(REPO, 'LICENSE')) as f:
    assert 'Apache License' in f.read(200)
  for name in ('requirements.txt', 'requirements-test.txt',
               'requirements-torch.txt', 'requirements-gcs.txt'):
    with open(os.path.join(REPO, name)) as f:
      lines = [l for l in f.read().splitlines() if not l.startswith('#')]
    # Thin wrappers: the package (its pyproject extras) under the lock.
    assert lines[0] == '-c constraints.txt' and lines[1].startswith('-e .')


def test_import_pan_jax_is_light():
  result = subprocess.run(
      [sys.executable, '-c', 'import sys, pan_jax; '
       'print("jax" in sys.modules, callable(pan_jax.load))'],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
  assert result.stdout.split() == ['False', 'True']


@pytest.fixture(scope='module')
def helps():
  """{command: its --help output}, the commands started in parallel."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  running = {c: subprocess.Popen(
      [sys.executable, '-m', c, '--help'], cwd=REPO, env=env, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for c in COMMANDS}
  try:
    return {c: p.communicate(timeout=300)[0] for c, p in running.items()}
  finally:
    for process in running.values():
      process.kill()


@pytest.mark.parametrize('command', COMMANDS)
def test_help_reads_well(helps, command):
  text = helps[command]
  assert f'python -m {command}' in text  # The module's docstring.
  assert re.search(r'^  --\w+', text, re.M)  # Its flags.
  # No runs of spaces inside a line (backslash continuations in docstrings,
  # aligned columns); two before an inline # comment are fine.
  runs = [line for line in text.splitlines() if re.search(r'\S {3,}\S', line)]
  assert not runs, runs
