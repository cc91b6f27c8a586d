"""The package's structure rules, read from the source (nothing is imported).

Library code never imports configs/ or launch/; pan_jax has no import cycle;
no module uses another's private names; every command starts through
runtime.run and defines absl flags (no argparse); every module says in its
docstring what it owns.
"""

import ast
import os
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, 'pan_jax')


def _modules():
  """{dotted module name: parsed AST} of every file under pan_jax/."""
  found = {}
  for directory, _, names in os.walk(PACKAGE):
    for name in names:
      if not name.endswith('.py'):
        continue
      path = os.path.join(directory, name)
      parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
      if parts[-1] == '__init__':
        parts = parts[:-1]
      with open(path) as f:
        found['.'.join(parts)] = ast.parse(f.read(), path)
  return found


MODULES = _modules()


def _imports(tree):
  """(module, imported name or None) for every import of a module."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, None
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        yield node.module, alias.name


def _edges(name):
  """The pan_jax modules `name` imports."""
  targets = set()
  for module, imported in _imports(MODULES[name]):
    if imported and f'{module}.{imported}' in MODULES:
      targets.add(f'{module}.{imported}')
    elif module in MODULES:
      targets.add(module)
  targets.discard(name)
  return targets


def test_no_import_cycles():
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = 'open'
    for target in sorted(_edges(node)):
      if state.get(target) == 'open':
        cycles.append(stack[stack.index(target):] + [target])
      elif target not in state:
        visit(target, stack + [target])
    state[node] = 'done'

  for name in sorted(MODULES):
    if name not in state:
      visit(name, [name])
  assert not cycles, cycles


def test_library_imports_no_project_code():
  wrong = [(name, module) for name, tree in MODULES.items()
           for module, _ in _imports(tree)
           if module.split('.')[0] in ('configs', 'launch')]
  assert not wrong


def test_no_private_names_from_other_modules():
  wrong = []
  for name, tree in MODULES.items():
    aliases = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and (
          node.module.startswith('pan_jax')):
        for alias in node.names:
          if alias.name.startswith('_'):
            wrong.append((name, f'{node.module}.{alias.name}'))
          aliases[alias.asname or alias.name] = f'{node.module}.{alias.name}'
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr.startswith('_') and
          not node.attr.startswith('__') and
          isinstance(node.value, ast.Name) and node.value.id in aliases and
          aliases[node.value.id] in MODULES):
        wrong.append((name, f'{aliases[node.value.id]}.{node.attr}'))
  assert not wrong


def _is_main_block(node):
  return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and
          isinstance(node.test.left, ast.Name) and
          node.test.left.id == '__name__')


COMMANDS = sorted(name for name, tree in MODULES.items()
                  if any(_is_main_block(node) for node in tree.body))


def test_the_commands_are_found():
  assert {'pan_jax.main', 'pan_jax.evaluate', 'pan_jax.predict',
          'pan_jax.export', 'pan_jax.convert.__main__',
          'pan_jax.data.prepare'} <= set(COMMANDS)


def _calls(body):
  return [ast.unparse(node.value) for node in body
          if isinstance(node, ast.Expr)]


@pytest.mark.parametrize('name', COMMANDS)
def test_every_command_starts_through_runtime(name):
  tree = MODULES[name]
  block = next(node for node in tree.body if _is_main_block(node))
  calls = _calls(block.body)
  if calls == ['cli()']:
    # The console script's entry (pyproject.toml) and `python -m` share it.
    cli = next(node for node in tree.body
               if isinstance(node, ast.FunctionDef) and node.name == 'cli')
    calls = _calls(cli.body)
  assert calls[-1] == 'runtime.run(main)', calls
  assert '_define_flags()' in calls  # Flags defined when run as a program.
  assert 'argparse' not in {module for module, _ in _imports(tree)}


def test_every_command_has_a_console_script():
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    scripts = tomllib.load(f)['project']['scripts']
  assert set(scripts.values()) == {f'{name}:cli' for name in COMMANDS}
  assert all(script.startswith('pan-jax-') for script in scripts)


@pytest.mark.parametrize('name', sorted(MODULES))
def test_every_module_says_what_it_owns(name):
  docstring = ast.get_docstring(MODULES[name])
  assert docstring and docstring.splitlines()[0].strip(), name
