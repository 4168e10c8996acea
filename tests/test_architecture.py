"""The house rules, checked: one direction of imports, short functions, imports at the top, and
one home for the run directory's layout."""

import ast
import glob
import os
import re
import subprocess
import sys

from tests.helpers import REPO

SOURCES = sorted(glob.glob(os.path.join(REPO, "mdlm", "**", "*.py"), recursive=True))
MAX_FUNCTION_LINES = 80
# Imports that stay inside a function, and why: an optional extra, and a plotting stack that only
# the plot command needs (and whose backend that command sets).
LAZY_IMPORTS = {("mdlm/data/sources.py", "datasets"), ("mdlm/scaling/__main__.py", "matplotlib"),
                ("mdlm/scaling/__main__.py", "mdlm.scaling.plot"),
                # optional extra `convert` (mdlm.convert, tokenizer.kind=gpt2)
                ("mdlm/convert.py", "safetensors"), ("mdlm/data/tokenizers.py", "tokenizers")}


def _rel(path):
  return os.path.relpath(path, REPO)


def test_layers_are_kept():
  """The layer contract in pyproject.toml ([tool.importlinter]), checked by import-linter."""
  exe = os.path.join(os.path.dirname(sys.executable), "lint-imports")
  proc = subprocess.run([exe, "--config", os.path.join(REPO, "pyproject.toml")], cwd=REPO,
                        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 0 and "1 kept, 0 broken" in proc.stdout, proc.stdout[-3000:]


def test_no_function_is_long():
  long = []
  for path in SOURCES:
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_FUNCTION_LINES:
          long.append(f"{_rel(path)}:{node.lineno} {node.name}: {lines} lines")
  assert not long, "\n".join(long)


def test_imports_are_at_the_top():
  inner = []
  for path in SOURCES:
    for node in ast.walk(ast.parse(open(path).read())):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for sub in ast.walk(node):
        if isinstance(sub, (ast.Import, ast.ImportFrom)):
          names = [sub.module] if isinstance(sub, ast.ImportFrom) else [a.name for a in sub.names]
          for name in names:
            if (_rel(path), name) not in LAZY_IMPORTS:
              inner.append(f"{_rel(path)}:{sub.lineno} imports {name} inside {node.name}")
  assert not inner, "\n".join(inner)


def test_the_run_layout_has_one_home():
  """The run directory's file names are spelled out in mdlm/rundir.py only."""
  names = re.compile(r"""["'](config\.yaml|status\.json|metrics\.jsonl|checkpoints_unreadable|"""
                     r"""init_from\.json|overrides\.yaml)["']""")
  spelled = []
  for path in SOURCES + sorted(glob.glob(os.path.join(REPO, "experiments", "**", "*.py"),
                                         recursive=True)):
    if _rel(path) == os.path.join("mdlm", "rundir.py"):
      continue
    for i, line in enumerate(open(path), 1):
      if names.search(line) and not line.lstrip().startswith("#"):
        spelled.append(f"{_rel(path)}:{i}: {line.strip()}")
  assert not spelled, "\n".join(spelled)
