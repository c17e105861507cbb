"""What a person reads after an analysis run: the printed summary, report.md and report.html.

Everything here is derived from results.json and the analysis modules' declarations
(`clmim.analysis.core.Result`): a table per depth curve, and one entry per *finding* — a result
on which the paper finds CL and MIM apart (`cl_direction`) — with the first CL and MIM models'
values over the later half of their blocks, their untrained copies, bootstrap intervals and a
verdict (`clmim.jobs.verdicts`: reproduced, architectural, not reproduced or inconclusive).
report.html is self-contained (figures embedded), report.md links the figures beside it.
"""
from __future__ import annotations

import base64
import html
import json
import os
import time

import numpy as np

from clmim.analysis import core
from clmim.atomic import write_atomic
from clmim.jobs import verdicts
from clmim.jobs.verdicts import later_half  # noqa: F401 (the report's reading of a curve)


def curve_tables(results: dict, modules) -> list[tuple[str, list, list]]:
  """(title, column names, rows of (model, family, values)) per depth-curve result."""
  tables = []
  for module in modules:
    for result in module.RESULTS:
      names = [n for n, r in results["models"].items() if r.get(result.key) is not None]
      if result.series is None or not names:
        continue
      rows = [(n, results["model_info"][n]["family"],
               [float(v) for v in result.series(results["models"][n][result.key])])
              for n in names]
      length = max(len(v) for _, _, v in rows)
      columns = (["emb"] + [str(i) for i in range(1, length)]) if result.x == "stage" else \
          [str(i) for i in range(1, length + 1)]
      what = {"stage": "by stage, emb = embedding", "block": "by block"}.get(
          result.x, f"by {result.x}")
      labels = result.columns(results) if result.columns is not None else None
      if labels is not None and len(labels) == length:
        columns = list(labels)
      if result.layout.endswith("[head]"):
        what = "mean over heads, " + what
      reference = core.reference_value(result, results)
      if reference is not None:
        what += f"; {result.reference_label or 'reference'}: {reference:.3g}"
      tables.append((f"{result.label} ({what})", columns, rows))
  return tables


def findings(results: dict, modules) -> list[dict]:
  """The run's findings of `modules` (`clmim.jobs.verdicts`): those results.json recorded, with
  their bootstrap intervals, or, for a results dict without them (an older run), computed
  afresh without intervals (every verdict then "inconclusive")."""
  keys = {r.key for m in modules for r in m.RESULTS}
  recorded = results.get("findings")
  if recorded is None:
    recorded = verdicts.findings(results, modules)
  return [f for f in recorded if f["key"] in keys]


def _table_lines(columns, rows, width=7) -> list[str]:
  name_width = max([len("model")] + [len(n) for n, _, _ in rows])
  lines = [f"  {'model':<{name_width}}  {'family':<6} " + " ".join(f"{c:>{width}}" for c in columns)]
  for name, family, values in rows:
    cells = [f"{v:{width}.3f}" for v in values] + [" " * width] * (len(columns) - len(values))
    lines.append(f"  {name:<{name_width}}  {family:<6} " + " ".join(cells))
  return lines


def summary(results: dict, modules) -> str:
  """The printed text: a table per depth curve, then the findings."""
  lines = [f"{results['num_images']} images per model; {results.get('compilations', '?')} "
           f"compilation(s) of the analysis step"]
  for title, columns, rows in curve_tables(results, modules):
    lines.append(f"{title}:")
    lines += _table_lines(columns, rows)
  found = findings(results, modules)
  if found:
    lines.append("Findings (mean over the later half of the blocks; of noise bands: the higher "
                 "half; [95 % bootstrap interval over images]; verdict rule: docs/"
                 "definitions.md \"Verdicts\"):")
    for f in found:
      lines.append(f"  {f['label']} (paper: {f['paper']}) -> {verdicts.headline(f)}")
      lines += [f"      {line}" for line in verdicts.describe(f)]
  return "\n".join(lines)


def _blocks(results: dict, modules) -> list[tuple]:
  """The report as blocks: ("h1"|"h2"|"p"|"code", text), ("table", header, rows), ("img", file)."""
  blocks = [("h1", "clmim analysis report"),
            ("p", f"{results['num_images']} images per model, "
                  f"{len(results['models'])} models, analyses: "
                  f"{', '.join(m.NAME for m in modules)}. Written "
                  f"{time.strftime('%Y-%m-%d %H:%M')}."),
            ("code", (results.get("run") or {}).get("command") or "(run from Python)")]
  found = findings(results, modules)
  if found:
    cell = lambda f, name: "" if name not in f["values"] else \
        f"{f['values'][name]:.3f}" + (f" [{f['intervals'][name][0]:.3f}, "
                                      f"{f['intervals'][name][1]:.3f}]"
                                      if f["intervals"].get(name) else "")
    rows = []
    for f in found:
      copies = f.get("untrained") or {}
      gap = "" if f.get("gap") is None else verdicts.describe(f)[0].split("; gap ")[-1]
      rows.append([f["label"], f["paper"], cell(f, f["cl"]), cell(f, f["mim"]),
                   cell(f, copies.get("CL")), cell(f, copies.get("MIM")), gap,
                   f"**{f['verdict'] or '—'}**: {f['reason']}"])
    blocks += [("h2", "Findings"),
               ("p", "Each value is the mean over the later half of the blocks (over noise "
                     "bands: the higher-frequency half) with its 95 % bootstrap interval over "
                     "images. The gap is signed so that > 0 is the paper's direction. The "
                     "verdict follows the rule of docs/definitions.md \"Verdicts\": reproduced "
                     "needs the gap beyond its interval, untrained copies that do not already "
                     "hold half of it, and training that moved both models the paper's way."),
               ("table", ["finding", "paper", "CL", "MIM", "CL untrained", "MIM untrained",
                          "gap", "verdict"], rows)]
  figures = list(results.get("figures", []))
  for module in modules:
    blocks.append(("h2", module.NAME))
    blocks += [("p", f"**{r.label}** — {r.description}") for r in module.RESULTS
               if r.description]
    mine = [f for f in figures if f.startswith(module.NAME) or any(
        f.startswith(r.key) for r in module.RESULTS)]
    blocks += [("img", f) for f in mine]
    figures = [f for f in figures if f not in mine]
  blocks += [("img", f) for f in figures]
  info = results["model_info"]
  blocks += [("h2", "Models"), ("table", ["model", "family", "source", "method", "steps",
                                          "image size / patch", "depth × heads"],
                                [[n, i.get("family"), i.get("source"), i.get("method"),
                                  i.get("steps"), f"{i.get('image_size')} / {i.get('patch_size')}",
                                  f"{i.get('depth')} × {i.get('num_heads')}"]
                                 for n, i in info.items()])]
  blocks += [("h2", "Versions"), ("code", json.dumps(results.get("versions", {}))),
             ("h2", "Config"), ("code", json.dumps(results.get("config", {}), indent=1))]
  return blocks


def markdown(results: dict, modules) -> str:
  out = []
  for block in _blocks(results, modules):
    kind = block[0]
    if kind in ("h1", "h2"):
      out.append(("# " if kind == "h1" else "## ") + block[1])
    elif kind == "p":
      out.append(block[1])
    elif kind == "code":
      out.append("```\n" + block[1] + "\n```")
    elif kind == "img":
      out.append(f"![{block[1]}]({block[1]})")
    else:
      header, rows = block[1], block[2]
      cell = lambda c: str(c).replace("|", "\\|")  # a label such as |mean d| is not a column
      out.append("\n".join(["| " + " | ".join(map(cell, header)) + " |",
                            "|" + "---|" * len(header)] +
                           ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]))
  return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
  parts = html.escape(text).split("**")
  return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def html_page(results: dict, modules, workdir: str) -> str:
  body = []
  for block in _blocks(results, modules):
    kind = block[0]
    if kind in ("h1", "h2"):
      body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
    elif kind == "p":
      body.append(f"<p>{_inline(block[1])}</p>")
    elif kind == "code":
      body.append(f"<pre>{html.escape(block[1])}</pre>")
    elif kind == "img":
      with open(os.path.join(workdir, block[1]), "rb") as f:
        data = base64.b64encode(f.read()).decode()
      body.append(f'<figure><img alt="{html.escape(block[1])}" '
                  f'src="data:image/png;base64,{data}"><figcaption>{html.escape(block[1])}'
                  f"</figcaption></figure>")
    else:
      header = "".join(f"<th>{html.escape(str(c))}</th>" for c in block[1])
      rows = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>"
                     for row in block[2])
      body.append(f"<table><tr>{header}</tr>{rows}</table>")
  style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
           "text-align:left}img{max-width:100%}pre{background:#f4f4f4;padding:8px;"
           "overflow-x:auto}")
  return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>clmim report</title>"
          f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def write(results: dict, modules, workdir: str) -> None:
  """Writes report.md and the self-contained report.html into `workdir` (figures already there)."""
  write_atomic(os.path.join(workdir, "report.md"),
               lambda f: f.write(markdown(results, modules).encode()))
  write_atomic(os.path.join(workdir, "report.html"),
               lambda f: f.write(html_page(results, modules, workdir).encode()))
