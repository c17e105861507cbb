"""What a newcomer reads is not stale: every link and path the README and docs/ cite exists, and the
README's table of analysis config fields lists every field with the default the code has."""
import os
import re

import pytest

from clmim import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(
    os.path.relpath(os.path.join(folder, name), ROOT)
    for folder, _, names in os.walk(os.path.join(ROOT, "docs")) for name in names
    if name.endswith(".md"))


def _read(path):
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    return f.read()


@pytest.mark.parametrize("path", DOCS)
def test_every_relative_link_resolves(path):
  """[text](target) links and ![figure](target) images that point into the repository."""
  text = _read(path)
  folder = os.path.dirname(os.path.join(ROOT, path))
  missing = []
  for target in re.findall(r"\]\(([^)\s]+)\)", text):
    target = target.split("#", 1)[0]
    if not target or re.match(r"[a-z]+:", target):  # an anchor, http:, https:, mailto:
      continue
    if not os.path.exists(os.path.normpath(os.path.join(folder, target))):
      missing.append(target)
  assert not missing, f"{path} links to missing files: {missing}"


def test_every_docs_path_cited_anywhere_exists():
  """`docs/...` paths named in code, configs, notebooks and docs (e.g. a config comment that
  sends the reader to docs/analyses/probing.md)."""
  cited = {}
  for folder in ("clmim", "configs", "benchmarks", "scripts", "colabs", "docs", "tests"):
    for base, _, names in os.walk(os.path.join(ROOT, folder)):
      for name in names:
        if name.endswith((".py", ".md", ".ipynb")):
          path = os.path.join(base, name)
          with open(path, encoding="utf-8") as f:
            for target in re.findall(r"(?<![\w/.])docs/[\w/.-]*\w\.(?:md|png|json|txt|html)",
                                     f.read()):
              cited.setdefault(target, os.path.relpath(path, ROOT))
  for target in re.findall(r"(?<![\w/.])docs/[\w/.-]*\w\.(?:md|png|json|txt|html)",
                           _read("README.md")):
    cited.setdefault(target, "README.md")
  missing = {t: where for t, where in cited.items() if not os.path.exists(os.path.join(ROOT, t))}
  assert len(cited) > 20 and not missing, missing


def _table_rows(section_title):
  """(fields, default) per row of the first table under `section_title` in the README."""
  text = _read("README.md")
  start = text.index(section_title)
  rows = []
  for line in text[start:].splitlines()[1:]:
    if line.startswith("#"):
      break
    cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
    if len(cells) >= 3 and cells[0].startswith("`"):
      rows.append((re.findall(r"`([^`]+)`", cells[0]), cells[1]))
  return rows


def _literal(cell):
  """A table default as a value, or None where it is prose ("per file", "each module's ...")."""
  if cell.strip("`") in ("True", "False"):
    return cell.strip("`") == "True"
  quoted = re.fullmatch(r"`([^`]*)`", cell)
  if quoted:
    return {'""': ""}.get(quoted.group(1), quoted.group(1))
  for kind in (int, float):
    try:
      return kind(cell)
    except ValueError:
      pass
  return None


def _leaves(config, prefix=""):
  for key, value in config.items():
    if key == "analysis_options":  # documented by each analysis module and the Analyses table
      continue
    if hasattr(value, "items"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


def test_the_analysis_config_table_lists_every_field_with_its_default():
  config = config_lib.analysis_base("demo", name="nmi", analyses="nmi")
  values = dict(_leaves(config))
  # tests/conftest.py points the compilation cache at a session folder (CLMIM_COMPILATION_CACHE).
  values["compilation_cache"] = config_lib.DEFAULT_COMPILATION_CACHE
  rows = _table_rows("### Analysis configs")
  documented = {}
  for fields, default in rows:
    for field in fields:
      if field.startswith("analysis_options."):  # the analyses' own options: each module's
        continue
      # "`data.mean`, `data.std`" and "`model.width`, `depth`": later names share the prefix.
      if "." not in field and "." in fields[0] and field not in values:
        field = fields[0].rsplit(".", 1)[0] + "." + field
      documented[field] = default
  assert sorted(set(values) - set(documented)) == [], "fields the README's table leaves out"
  assert sorted(set(documented) - set(values)) == [], "rows for fields the config does not have"
  wrong = {}
  for field, default in documented.items():
    literal = _literal(default)
    if literal is not None and literal != values[field]:
      wrong[field] = (default, values[field])
  assert not wrong, f"README default vs config_lib.analysis_base: {wrong}"


def test_rendered_numbers_match_their_result_files(tmp_path):
  """scripts/render_docs.py --check: every marked number of README.md and docs/ equals its
  committed result file; a changed number in a copy is caught."""
  import subprocess
  import sys as _sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = os.path.join(root, "scripts", "render_docs.py")
  done = subprocess.run([_sys.executable, script, "--check"], capture_output=True, text=True)
  assert done.returncode == 0, done.stdout + done.stderr
  with open(os.path.join(root, "docs", "analyses", "svd.md")) as f:
    text = f.read()
  marker = "finding/effective_rank/verdict:s -->"
  assert marker in text
  copy = tmp_path / "svd.md"
  copy.write_text(text.replace(marker, marker + "stale"))
  done = subprocess.run([_sys.executable, script, "--check", str(copy)], capture_output=True,
                        text=True)
  assert done.returncode == 1 and "stale" in done.stdout
