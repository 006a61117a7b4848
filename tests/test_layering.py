"""The package's floors, read from its imports with ``ast`` (nothing is imported or run).

- models/, data/ and metrics/ import nothing of birefnet_jax above them: only their own
  subpackage and the leaf modules in LEAVES (function-level imports count too).
- No module imports a command-line module: one with an ``if __name__ == '__main__':`` block
  (predict, export, evaluate, main, ...), found here from the source, not listed by hand.

A command line that lives inside a lower floor (data/write_examples) is itself on the top floor:
the floor rule applies to the library modules of models/, data/ and metrics/.
"""

import ast
from pathlib import Path

PACKAGE = 'birefnet_jax'
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

# The floors that import nothing above them.
LOWER_FLOORS = ('models', 'data', 'metrics')
# Leaf utility modules every floor may import (they import nothing of the package but leaves).
LEAVES = frozenset({'birefnet_jax.errors'})
# (importer, command-line module) pairs known to break the rule, to be removed when fixed. Each
# must still be a violation, so the list only shrinks (empty now).
KNOWN_CLI_IMPORTS = frozenset()


def module_name(path: Path, package_dir: Path) -> str:
  parts = list(path.relative_to(package_dir.parent).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def package_modules(package_dir: Path = PACKAGE_DIR) -> dict:
  """{module name: parsed tree} for every .py file of the package."""
  return {module_name(p, package_dir): ast.parse(p.read_text(), str(p))
          for p in sorted(package_dir.rglob('*.py'))}


def is_command_line(tree: ast.Module) -> bool:
  """Whether the module has a top-level ``if __name__ == '__main__':`` block."""
  for node in tree.body:
    if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name) and node.test.left.id == '__name__'
        and any(isinstance(c, ast.Constant) and c.value == '__main__'
                for c in node.test.comparators)):
      return True
  return False


def imported_modules(name: str, tree: ast.Module, modules) -> set:
  """The package modules ``name`` imports, anywhere in its body (``from birefnet_jax import x``
  counts as importing the module ``birefnet_jax.x`` when x is one)."""
  is_package = any(m.startswith(name + '.') for m in modules)
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:   # relative: resolve against this module's package
        anchor = name.split('.')
        anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
        base = '.'.join(anchor + ([base] if base else []))
      targets = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base
                 for alias in node.names]
    else:
      continue
    for target in targets:
      # `import birefnet_jax.data.pipeline` names its module; keep the longest known prefix.
      while target and target not in modules:
        target = target.rpartition('.')[0]
      if target.startswith(PACKAGE) and target != name:
        found.add(target)
  return found


def floor_of(name: str):
  parts = name.split('.')
  return parts[1] if len(parts) > 2 and parts[1] in LOWER_FLOORS else None


def violations(package_dir: Path = PACKAGE_DIR):
  """(floor violations, command-line imports): lists of (importer, imported) pairs."""
  modules = package_modules(package_dir)
  command_lines = {name for name, tree in modules.items() if is_command_line(tree)}
  climbs, cli_imports = [], []
  for name, tree in modules.items():
    for target in sorted(imported_modules(name, tree, modules)):
      if target in command_lines:
        cli_imports.append((name, target))
      floor = floor_of(name)
      if (floor and name not in command_lines and target not in LEAVES
          and not target.startswith(f'{PACKAGE}.{floor}.')
          and target != f'{PACKAGE}.{floor}'):
        climbs.append((name, target))
  return climbs, cli_imports


def test_command_lines_are_found_from_their_main_blocks():
  modules = package_modules()
  command_lines = {name for name, tree in modules.items() if is_command_line(tree)}
  assert {'birefnet_jax.predict', 'birefnet_jax.export', 'birefnet_jax.evaluate',
          'birefnet_jax.main', 'birefnet_jax.data.write_examples'} <= command_lines
  assert 'birefnet_jax.inference' not in command_lines
  assert 'birefnet_jax.train' not in command_lines


def test_leaves_import_nothing_of_the_package_but_leaves():
  modules = package_modules()
  for leaf in LEAVES:
    assert imported_modules(leaf, modules[leaf], modules) <= LEAVES, leaf


def test_models_data_metrics_import_nothing_above_them():
  climbs, _ = violations()
  assert not climbs, ('a lower floor imports a module above it (move the code down, or to a '
                      f'leaf module): {climbs}')


def test_no_module_imports_a_command_line_module():
  _, cli_imports = violations()
  unexpected = sorted(set(cli_imports) - KNOWN_CLI_IMPORTS)
  assert not unexpected, ('a module imports a command-line module (move what it needs into a '
                          f'library module, e.g. inference.py): {unexpected}')
  fixed = sorted(KNOWN_CLI_IMPORTS - set(cli_imports))
  assert not fixed, f'fixed: remove {fixed} from KNOWN_CLI_IMPORTS'


def test_the_rules_see_imports_in_every_form(tmp_path):
  """The checker itself: plain, from, relative and function-level imports all count."""
  package = tmp_path / PACKAGE
  (package / 'models').mkdir(parents=True)
  (package / '__init__.py').write_text('')
  (package / 'errors.py').write_text('')
  (package / 'losses.py').write_text('')
  (package / 'predict.py').write_text("if __name__ == '__main__':\n  pass\n")
  (package / 'train.py').write_text('from birefnet_jax import predict\n')
  (package / 'models' / '__init__.py').write_text('')
  (package / 'models' / 'a.py').write_text('from birefnet_jax import errors\nfrom . import b\n')
  (package / 'models' / 'b.py').write_text('def f():\n  from .. import losses\n')
  (package / 'models' / 'c.py').write_text('import birefnet_jax.losses\n')
  climbs, cli_imports = violations(package)
  assert climbs == [('birefnet_jax.models.b', 'birefnet_jax.losses'),
                    ('birefnet_jax.models.c', 'birefnet_jax.losses')]
  assert cli_imports == [('birefnet_jax.train', 'birefnet_jax.predict')]
