"""The shape the README's "Architecture" section states, checked on the source: the layers import
downward only, preflight knows no component by name, and which source a run reads is never
decided by comparing its name outside clmim/data/sources/."""
import ast
import os
import re

import clmim
from clmim.analysis import core
from clmim.data import sources
from clmim.train import objectives

ROOT = os.path.dirname(clmim.__file__)
# What each package below the jobs may import from clmim (besides itself and the leaf modules
# errors, suggestions, atomic, config_checks, host_memory).
ALLOWED = {
    "models": set(),
    "data": {"models"},
    "checkpoints": {"models", "data"},
    "analysis": {"models"},
    "train": {"models", "data", "checkpoints"},
}
LEAVES = {"errors", "suggestions", "atomic", "config_checks", "host_memory"}


def _imports(path):
  """The clmim modules a file imports (top-level and inside functions)."""
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clmim"):
      if node.module == "clmim":  # from clmim import jobs, ...
        yield from (f"clmim.{a.name}" for a in node.names)
      else:
        yield node.module
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith("clmim"))


def _package_files(package):
  folder = os.path.join(ROOT, package)
  for base, _, files in os.walk(folder):
    yield from (os.path.join(base, f) for f in files if f.endswith(".py"))


def test_no_package_below_the_jobs_imports_upward():
  wrong = []
  for package, allowed in ALLOWED.items():
    for path in _package_files(package):
      for name in _imports(path):
        parts = name.split(".")
        if len(parts) < 2 or parts[1] == package or parts[1] in LEAVES | allowed:
          continue
        wrong.append(f"{os.path.relpath(path, ROOT)} imports {name}")
  assert not wrong, wrong


def test_preflight_names_no_objective_source_or_analysis():
  tree = ast.parse(open(os.path.join(ROOT, "preflight.py")).read())
  literals = {node.value for node in ast.walk(tree)
              if isinstance(node, ast.Constant) and isinstance(node.value, str)}
  words = {w for text in literals for w in re.findall(r"[a-z_0-9]+", text)}
  components = set(objectives.NAMES) | set(sources.NAMES) | set(core.available())
  assert not words & components, words & components


def test_no_branch_on_the_source_name_outside_the_sources():
  found = []
  for package in ("analysis", "checkpoints", "data", "jobs", "models", "train"):
    for path in _package_files(package):
      if f"{os.sep}data{os.sep}sources{os.sep}" in path:
        continue
      for number, line in enumerate(open(path), 1):
        if re.search(r"source\s*[!=]=", line):
          found.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
  assert not found, found
