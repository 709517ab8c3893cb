"""The package's shape: imports flow one way, functions stay readable, TensorFlow loads on use."""

import ast
import os
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'efficientnet_jax'
MAX_FUNCTION_LINES = 80


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The package modules `path` imports, at module level or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f'{node.module}.{alias.name}' for alias in node.names]
    else:
      continue
    found.update(name for name in names if name in modules)
  return found


def _graph() -> dict[str, set[str]]:
  files = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
  modules = set(files)
  # a package's __init__ is its own node; importing `pkg.mod` is an edge to `pkg.mod`
  return {name: _imports(path, modules) - {name} for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle_among_the_package_modules():
  graph = _graph()
  # package __init__ files re-export their submodules; an edge from a submodule
  # to its own package's __init__ is not a cycle of ours to break
  for name in list(graph):
    graph[name] = {m for m in graph[name] if not name.startswith(m + '.')}
  assert _cycle(graph) is None, ' -> '.join(_cycle(graph))


def test_no_function_longer_than_80_lines():
  long = []
  for path in PACKAGE.rglob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_FUNCTION_LINES:
          long.append(f'{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines})')
  assert not long, long


def test_model_state_steps_and_train_import_without_tensorflow():
  code = ('import sys, efficientnet_jax, efficientnet_jax.model, efficientnet_jax.state, '
          'efficientnet_jax.steps, efficientnet_jax.train, efficientnet_jax.experiment; '
          "print('tensorflow' in sys.modules)")
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       check=True, env=env, cwd=PACKAGE.parent)
  assert out.stdout.strip() == 'False'
