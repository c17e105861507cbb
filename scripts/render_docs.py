r"""Fills the numbers the README and docs/ quote from the committed result files they come from.

Markdown files carry two kinds of markers (HTML comments: invisible on GitHub):

  <!-- render:findings docs/demo/results.json -->           a generated block, up to
  ...                                                        <!-- /render -->
  <!-- /render -->
      blocks: "findings FILE" (every finding with intervals, untrained copies and verdict),
      "curve FILE KEY [DECIMALS]" (one row per model of a depth curve), "sweep FILE" (the λ
      sweep's sweep.json), "finetune FILE" (finetune.json's top-1 per step).

  <!-- value:FILE:PATH:FORMAT -->0.080<!-- /value -->      one number in a sentence
      PATH is "/"-separated: "curve/MODEL/KEY/POSITION" (a point of the declared series, the
      position as the summary numbers it: block 1.. or, for stage curves, 0 = embedding),
      "later/MODEL/KEY" (the findings' later-half mean), "finding/KEY/FIELD" (a field of
      results.json["findings"]: verdict, gap, gap_low, gap_high, untrained_gap, ...), or
      "json/a/b/0/c" (a plain path into the file). FORMAT is a Python format spec (".3f",
      ".0%", "d", "s").

  python scripts/render_docs.py            rewrites every marker of README.md and docs/**/*.md
  python scripts/render_docs.py --check    exits 1 listing each marker whose text differs

The staleness test (tests/test_docs.py) runs the check: a quoted number that no longer matches
its file fails the tests, and regenerating a result file means running this script.
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BLOCK = re.compile(r"(<!-- render:(?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /render -->)", re.S)
VALUE = re.compile(r"(<!-- value:(?P<spec>[^>]*?) -->)(?P<body>.*?)(<!-- /value -->)", re.S)


class RenderError(Exception):
  """A marker that names a missing file, key or format."""


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict:
  full = os.path.join(ROOT, path)
  try:
    with open(full) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise RenderError(f"{path}: cannot read it as JSON ({e})") from None


def _declaration(key: str):
  from clmim.jobs import readings
  try:
    return readings.declaration(key)[1]
  except KeyError:
    raise RenderError(f"{key!r} is no result key of any analysis") from None


def _series(results: dict, model: str, key: str) -> list:
  try:
    values = results["models"][model][key]
  except KeyError:
    raise RenderError(f"no {key!r} for model {model!r}") from None
  return [float(v) for v in _declaration(key).series(values)]


def _finding(results: dict, key: str) -> dict:
  for entry in results.get("findings", []):
    if entry["key"] == key:
      return entry
  raise RenderError(f"no finding {key!r} (is results.json from before the verdicts?)")


def value(path: str, spec: str):
  """The number (or word) `spec` ("curve/...", "later/...", "finding/...", "json/...") names in
  the JSON file `path`."""
  results = _load(path)
  kind, *parts = spec.split("/")
  if kind == "curve" and len(parts) == 3:
    model, key, position = parts
    curve = _series(results, model, key)
    index = int(position) - (0 if _declaration(key).x == "stage" else 1)
    if not 0 <= index < len(curve):
      raise RenderError(f"{key} of {model} has no position {position}")
    return curve[index]
  if kind == "later" and len(parts) == 2:
    from clmim.jobs.verdicts import later_half
    model, key = parts
    return later_half(_declaration(key), results["models"][model][key])
  if kind == "finding" and len(parts) == 2:
    entry = _finding(results, parts[0])
    field = parts[1]
    for suffix, index in (("_low", 0), ("_high", 1)):
      if field.endswith(suffix) and entry.get(field[:-len(suffix)] + "_interval"):
        return entry[field[:-len(suffix)] + "_interval"][index]
    if field not in entry or entry[field] is None:
      raise RenderError(f"finding {parts[0]!r} has no {field!r}")
    return entry[field]
  if kind == "json":
    node = results
    for part in parts:
      try:
        node = node[int(part)] if isinstance(node, list) else node[part]
      except (KeyError, IndexError, ValueError):
        raise RenderError(f"{path}: no {spec!r}") from None
    return node
  raise RenderError(f"unknown value path {spec!r} (curve/MODEL/KEY/POS, later/MODEL/KEY, "
                    "finding/KEY/FIELD or json/...)")


def _interval(entry, name) -> str:
  iv = entry["intervals"].get(name)
  return f"{entry['values'][name]:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "")


def findings_block(path: str) -> str:
  """A table: every finding of the file with both models (95 % interval), the untrained copies,
  the gap (signed: > 0 = the paper's way) and the verdict with its reason."""
  results = _load(path)
  rows = ["| finding (paper) | CL | MIM | untrained CL / MIM | gap, paper's way > 0 | verdict |",
          "|---|---|---|---|---|---|"]
  for entry in results.get("findings", []):
    if entry.get("gap") is None:
      continue
    copies = entry.get("untrained") or {}
    untrained = " / ".join(f"{entry['values'][copies[f]]:.3f}" for f in ("CL", "MIM")
                           if copies.get(f) in entry["values"]) or "—"
    gap = f"{entry['gap']:+.3f}"
    if entry.get("gap_interval"):
      gap += f" [{entry['gap_interval'][0]:+.3f}, {entry['gap_interval'][1]:+.3f}]"
    label = entry["label"].replace("|", "\\|")
    rows.append(f"| {label} ({entry['paper']}) | {_interval(entry, entry['cl'])} | "
                f"{_interval(entry, entry['mim'])} | {untrained} | {gap} | "
                f"**{entry['verdict']}**: {entry['reason']} |")
  return "\n".join(rows) + "\n"


def curve_block(path: str, key: str, decimals: str = "3") -> str:
  """A table: one row per model of the file's `key` depth curve."""
  results = _load(path)
  result = _declaration(key)
  names = [n for n, r in results["models"].items() if key in r]
  if not names:
    raise RenderError(f"{path}: no model has {key!r}")
  curves = {n: _series(results, n, key) for n in names}
  length = max(len(c) for c in curves.values())
  heads = (["emb"] + [str(i) for i in range(1, length)]) if result.x == "stage" else \
      [str(i) for i in range(1, length + 1)]
  rows = ["| model | " + " | ".join(heads) + " |", "|---|" + "---|" * length]
  for name, curve in curves.items():
    rows.append(f"| `{name}` | " + " | ".join(f"{v:.{int(decimals)}f}" for v in curve) + " |")
  return "\n".join(rows) + "\n"


def sweep_block(path: str) -> str:
  """The λ sweep's table (sweep.json of `--config.mode=sweep`): last-block probes and the later
  blocks' NMI and ΔlogA per λ, with the untrained copy."""
  sweep = _load(path)
  weights = sweep["weights"]
  rows = ["| λ | " + " | ".join(f"{w:g}" for w in weights) + " | untrained |",
          "|---|" + "---|" * (len(weights) + 1)]
  for key, label, decimals in (
      ("probe_shape_mean_tokens", "shape probe, last block (mean token)", 3),
      ("probe_texture_mean_tokens", "texture probe, last block (mean token)", 3),
      ("nmi", "NMI, later half of the blocks", 3),
      ("fourier", "high-frequency ΔlogA, later half of the blocks", 2)):
    if key not in sweep:
      continue
    cells = [f"{v:.{decimals}f}" for v in sweep[key]]
    if key + "_spread" in sweep:  # several training seeds: mean ± standard deviation
      cells = [f"{c} ± {s:.{decimals}f}" for c, s in zip(cells, sweep[key + "_spread"])]
    untrained = sweep.get(f"{key}_untrained")
    rows.append(f"| {label} | " + " | ".join(cells) + " | "
                + ("—" if untrained is None else f"{untrained:.{decimals}f}") + " |")
  return "\n".join(rows) + "\n"


def finetune_block(path: str) -> str:
  """Fine-tuning top-1 per start and evaluation step (finetune.json)."""
  runs = _load(path)["runs"]
  steps = sorted({e["step"] for entries in runs.values() for e in entries})
  rows = ["| start | " + " | ".join(f"top-1 at step {s:,}" for s in steps) + " |",
          "|---|" + "---|" * len(steps)]
  for name, entries in runs.items():
    by_step = {e["step"]: e["eval_top1"] for e in entries}
    rows.append(f"| `{name}` | " + " | ".join(
        f"{by_step[s]:.3f}" if s in by_step else "—" for s in steps) + " |")
  return "\n".join(rows) + "\n"


BLOCKS = {"findings": findings_block, "curve": curve_block, "sweep": sweep_block,
          "finetune": finetune_block}


def render_text(text: str) -> tuple[str, list[str]]:
  """(the text with every marker filled, [what changed])."""
  changed = []

  def block(match):
    name, *args = match.group("spec").split()
    if name not in BLOCKS:
      raise RenderError(f"unknown block {name!r} (expected {', '.join(BLOCKS)})")
    body = BLOCKS[name](*args)
    if body != match.group("body"):
      changed.append(f"block {match.group('spec')}")
    return match.group(1) + body + match.group(4)

  def inline(match):
    try:
      path, spec, fmt = match.group("spec").split(":")
    except ValueError:
      raise RenderError(f"value marker {match.group('spec')!r}: expected FILE:PATH:FORMAT") \
          from None
    number = value(path, spec)
    try:
      body = format(number, fmt)
    except (TypeError, ValueError):
      raise RenderError(f"value {spec!r} = {number!r} does not take format {fmt!r}") from None
    if body != match.group("body"):
      changed.append(f"value {spec} ({match.group('body')!r} -> {body!r})")
    return match.group(1) + body + match.group(4)

  text = BLOCK.sub(block, text)
  return VALUE.sub(inline, text), changed


def documents() -> list[str]:
  """README.md and every markdown file under docs/."""
  return [os.path.join(ROOT, "README.md")] + sorted(
      glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true",
                      help="change nothing; exit 1 when a marker's text differs from its file")
  parser.add_argument("files", nargs="*", help="markdown files (default: README.md, docs/)")
  args = parser.parse_args(argv)
  stale = []
  for path in args.files or documents():
    with open(path) as f:
      text = f.read()
    try:
      new, changed = render_text(text)
    except RenderError as e:
      print(f"{os.path.relpath(path, ROOT)}: {e}", file=sys.stderr)
      return 2
    stale += [f"{os.path.relpath(path, ROOT)}: {c}" for c in changed]
    if changed and not args.check:
      with open(path, "w") as f:
        f.write(new)
  for line in stale:
    print(("stale: " if args.check else "updated: ") + line)
  return 1 if (stale and args.check) else 0


if __name__ == "__main__":
  sys.exit(main())
