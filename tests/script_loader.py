"""Imports a file under scripts/ as a module (scripts/ is not a package)."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
  """scripts/<name>.py, executed as a fresh module."""
  spec = importlib.util.spec_from_file_location(
      f'script_{name}', os.path.join(REPO, 'scripts', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
