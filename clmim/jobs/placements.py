"""Where each model sits between the run's CL and MIM references, finding by finding.

For a finding (a result the paper compares CL and MIM on, see `verdicts`) with the run's CL
reference's later-half value c and its MIM reference's m, a model with value v is placed at

  placement = (v - m) / (c - m)      0 = where the MIM reference is, 1 = where the CL one is,

below 0 beyond the MIM reference, above 1 beyond the CL one. The references are the run's first
model of family "cl" and first of family "mim" (the pair the findings compare). The 95 % interval
comes from the same bootstrap replicates as the findings' (paired: every model and both
references resampled with the same draws). A placement is left out (None, with the reason) when
the references do not differ beyond their interval: a position between two points that may be
one point means nothing.
"""
from __future__ import annotations

import numpy as np

from clmim.analysis import bootstrap
from clmim.jobs import verdicts


def placements(results: dict, modules, replicates: dict | None = None) -> dict | None:
  """{"cl_reference", "mim_reference", "findings": {key: {...}}} for a run with a CL and a MIM
  model; None otherwise."""
  replicates = replicates or {}
  cl, mim = verdicts.pair(results)
  if cl is None or mim is None:
    return None
  models = results["models"]
  out = {"cl_reference": cl, "mim_reference": mim, "findings": {}}
  for module in modules:
    for result in module.RESULTS:
      if result.cl_direction is None or result.series is None:
        continue
      values = {n: verdicts.later_half(result, r[result.key]) for n, r in models.items()
                if r.get(result.key) is not None}
      if cl not in values or mim not in values:
        continue
      rows = {n: verdicts.later_half_rows(result, np.asarray(replicates[n][result.key]))
              for n in values if result.key in replicates.get(n, {})}
      entry = {"label": result.label, "paper": f"CL {result.cl_direction}", "models": {}}
      out["findings"][result.key] = entry
      span = values[cl] - values[mim]
      have = cl in rows and mim in rows
      spans = rows[cl] - rows[mim] if have else None
      separated = _separated(span, spans)
      if separated is not True:
        entry["reason"] = separated
      for name, value in values.items():
        record = {"value": value, "placement": None, "interval": None}
        if separated is True:
          record["placement"] = float((value - values[mim]) / span)
          if have and name in rows:
            with np.errstate(divide="ignore", invalid="ignore"):
              draws = (rows[name] - rows[mim]) / spans
            low, high = bootstrap.percentile_interval(draws)
            if np.isfinite([low, high]).all():
              record["interval"] = [float(low), float(high)]
        entry["models"][name] = record
  return out


def _separated(span, spans):
  """True when the references differ beyond their interval (or, without intervals, at all);
  else the reason a placement means nothing."""
  if not np.isfinite(span) or span == 0:
    return "the CL and MIM references have the same value"
  if spans is None:
    return True
  low, high = bootstrap.percentile_interval(spans)
  if not np.isfinite([low, high]).all() or low <= 0 <= high:
    return "the CL and MIM references do not differ beyond their 95 % interval"
  return True


def _number(value: float) -> str:
  """Two decimals, without a "-0.00" for a value that rounds to zero."""
  return f"{round(value, 2) + 0.0:.2f}"


def markdown(placed: dict) -> str:
  """The table: one row per model, one column per finding, "placement [interval]"."""
  keys = list(placed["findings"])
  lines = [f"# Placement between the CL and MIM references",
           "",
           f"0 = where the MIM reference (**{placed['mim_reference']}**) is, 1 = where the CL "
           f"reference (**{placed['cl_reference']}**) is, on the mean over the later half of "
           f"each curve; 95 % bootstrap interval in brackets. Below 0 / above 1: beyond the "
           f"reference. — : the references do not differ there (see the reason).",
           "",
           "| model | " + " | ".join(placed["findings"][k]["label"].replace("|", "\\|")
                                     for k in keys) + " |",
           "|---|" + "---|" * len(keys)]
  names = list(dict.fromkeys(n for k in keys for n in placed["findings"][k]["models"]))
  for name in names:
    cells = []
    for key in keys:
      record = placed["findings"][key]["models"].get(name)
      if record is None or record["placement"] is None:
        cells.append("—")
      else:
        interval = record["interval"]
        cells.append(_number(record["placement"]) + (
            f" [{_number(interval[0])}, {_number(interval[1])}]" if interval else ""))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  reasons = [f"- {placed['findings'][k]['label']}: {placed['findings'][k]['reason']}"
             for k in keys if "reason" in placed["findings"][k]]
  if reasons:
    lines += ["", "Not placed:"] + reasons
  return "\n".join(lines) + "\n"
