"""Findings: does a run show the paper's CL-vs-MIM difference, beyond noise and architecture?

A *finding* is a result on which the paper finds contrastive (CL) and masked-image (MIM) models
apart (`core.Result.cl_direction`). It compares the run's first CL model with its first MIM
model on the mean over the later half of the curve (`later_half`), with s = +1 when the paper
finds CL higher and -1 when lower:

  gap            s * (CL - MIM)                       > 0: the paper's direction
  untrained gap  s * (CL's untrained copy - MIM's)    what the architectures show before any
                                                      training (0 when both share one copy)
  CL shift       s * (CL - CL's untrained copy)       > 0: training moved CL the paper's way
  MIM shift      s * (MIM's untrained copy - MIM)     > 0: training moved MIM the paper's way

Each comes with a 95 % bootstrap interval over images (`clmim.analysis.bootstrap`; the draws are
shared by all models, so differences are resampled paired). The verdict, first rule that applies
(docs/definitions.md "Verdicts" says why):

  1. no interval (the run had config.intervals.folds = 0, or the analysis is not resampled)
     -> inconclusive
  2. the gap's interval lies below 0                                 -> not reproduced
  3. the gap's interval includes 0                                   -> inconclusive
  4. no untrained copies (config.include_untrained = False)          -> inconclusive
  5. untrained gap > gap / 2 (the architectures alone hold more than half of it)
                                                                     -> architectural
  6. both shifts' intervals lie above 0                              -> reproduced
  7. otherwise (training moved a model against the paper's direction, or not beyond its
     interval)                                                       -> inconclusive
"""
from __future__ import annotations

import numpy as np

from clmim.analysis import bootstrap

VERDICTS = ("reproduced", "architectural", "not reproduced", "inconclusive")


def later_half(result, values) -> float:
  """Mean of a depth curve over the later half of the blocks (a stage curve's embedding entry,
  stage 0, is not a block); of another curve (e.g. over noise bands), over its second half."""
  return float(later_half_rows(result, np.asarray(result.series(values), np.float64)[None])[0])


def later_half_rows(result, table) -> np.ndarray:
  """`later_half` of each row of a [R, positions] table of curves (e.g. bootstrap replicates)."""
  table = np.asarray(table, np.float64)
  if result.x == "stage":
    table = table[:, 1:]
  later = table[:, table.shape[1] // 2:]
  with np.errstate(all="ignore"):
    finite = np.isfinite(later)
    counts = finite.sum(axis=1)
    sums = np.where(finite, later, 0).sum(axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def untrained_copy(results: dict, name: str):
  """The name of the untrained copy of model `name`'s architecture in this run, or None."""
  for other, info in results["model_info"].items():
    if info.get("family") == "random" and (info.get("architecture_of") == name or
                                           name in (info.get("shared_by") or ())):
      return other
  return None


def pair(results: dict) -> tuple:
  """(first CL model, first MIM model) of the run, either None: the pair the findings compare."""
  info = results["model_info"]
  first = lambda family: next((n for n in results["models"] if info[n]["family"] == family), None)
  return first("cl"), first("mim")


def _interval(rows):
  if rows is None:
    return None
  low, high = bootstrap.percentile_interval(rows)
  return None if not np.isfinite([low, high]).all() else [float(low), float(high)]


def decide(gap, gap_interval, untrained_gap, shift_intervals) -> tuple[str, str]:
  """(verdict, reason) by the rule of the module doc. `gap_interval` is None without intervals;
  `untrained_gap` None without untrained copies; `shift_intervals` {"CL": (low, high),
  "MIM": (low, high)} (None entries where unknown)."""
  if gap_interval is None:
    return "inconclusive", "no bootstrap interval"
  low, high = gap_interval
  if high < 0:
    return "not reproduced", "the gap is on the opposite side of the paper's, beyond its interval"
  if low <= 0:
    return "inconclusive", "the gap's interval includes 0"
  if untrained_gap is None:
    return "inconclusive", "no untrained copies: nothing separates training from architecture"
  if untrained_gap > gap / 2:
    share = untrained_gap / gap if gap else float("inf")
    return "architectural", (f"the untrained copies already differ in the paper's direction by "
                             f"{share:.0%} of the gap")
  against = [name for name, iv in shift_intervals.items() if iv is None or iv[0] <= 0]
  if not against:
    return "reproduced", ("the gap holds beyond its interval, and training moved both models "
                          "the paper's way beyond theirs")
  return "inconclusive", ("the gap holds, but training did not move "
                          + " and ".join(against)
                          + " the paper's way beyond the interval (see the shifts)")


def findings(results: dict, modules, replicates: dict | None = None) -> list[dict]:
  """One entry per result with a `cl_direction` that some model has: every model's later-half
  value (and interval), the CL/MIM gap, its untrained baseline, both training shifts, the
  verdict and its reason. `replicates` is {model: {key: [R, positions]}} (the session's
  bootstrap curves); without it nothing has an interval."""
  replicates = replicates or {}
  models = results["models"]
  cl, mim = pair(results)
  out = []
  for module in modules:
    for result in module.RESULTS:
      if result.cl_direction is None or result.series is None:
        continue
      values = {n: later_half(result, r[result.key]) for n, r in models.items()
                if r.get(result.key) is not None}
      if not values:
        continue
      rows = {n: later_half_rows(result, replicates[n][result.key])
              for n in values if result.key in replicates.get(n, {})}
      entry = {"key": result.key, "label": result.label, "paper": f"CL {result.cl_direction}",
               "values": values, "intervals": {n: _interval(r) for n, r in rows.items()},
               "cl": cl, "mim": mim, "verdict": None, "reason": "needs a CL and a MIM model"}
      out.append(entry)
      if cl not in values or mim not in values or not np.isfinite(
          [values[cl], values[mim]]).all():
        continue
      s = 1.0 if result.cl_direction == "higher" else -1.0
      both = cl in rows and mim in rows
      entry["gap"] = s * (values[cl] - values[mim])
      entry["gap_interval"] = _interval(s * (rows[cl] - rows[mim])) if both else None
      copies = {"CL": untrained_copy(results, cl), "MIM": untrained_copy(results, mim)}
      entry["untrained"] = copies
      untrained_gap, shifts = None, {}
      if all(c in values for c in copies.values()):
        cu, mu = copies["CL"], copies["MIM"]
        untrained_gap = s * (values[cu] - values[mu])
        entry["untrained_gap"] = untrained_gap
        have = all(n in rows for n in (cl, mim, cu, mu))
        entry["untrained_gap_interval"] = _interval(s * (rows[cu] - rows[mu])) if have else None
        entry["shifts"] = {"CL": s * (values[cl] - values[cu]), "MIM": s * (values[mu] - values[mim])}
        shifts = {"CL": _interval(s * (rows[cl] - rows[cu])) if have else None,
                  "MIM": _interval(s * (rows[mu] - rows[mim])) if have else None}
        entry["shift_intervals"] = shifts
        # Reported beside the rule: how much more training moved CL than MIM the paper's way.
        entry["training_difference"] = entry["gap"] - untrained_gap
        entry["training_difference_interval"] = _interval(
            s * ((rows[cl] - rows[cu]) - (rows[mim] - rows[mu]))) if have else None
      entry["verdict"], entry["reason"] = decide(entry["gap"], entry["gap_interval"],
                                                 untrained_gap, shifts)
  return out


def _number(value, interval=None, signed=False) -> str:
  text = f"{value:+.3f}" if signed else f"{value:.3f}"
  if interval is not None:
    text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
  return text


def headline(entry: dict) -> str:
  """ "verdict: reason" of a finding (or what it needs)."""
  if entry["verdict"] is None:
    return f"no verdict: {entry['reason']}"
  return f"{entry['verdict']}: {entry['reason']}"


def describe(entry: dict) -> list[str]:
  """The lines that back a finding's verdict: both models with intervals, the gap, the
  untrained copies and the training shifts (signed so that > 0 is the paper's way)."""
  if entry.get("gap") is None:
    return []
  cl, mim, iv = entry["cl"], entry["mim"], entry["intervals"]
  lines = [f"CL {cl} {_number(entry['values'][cl], iv.get(cl))}, MIM {mim} "
           f"{_number(entry['values'][mim], iv.get(mim))}; gap (the paper's way > 0) "
           f"{_number(entry['gap'], entry['gap_interval'], signed=True)}"]
  if entry.get("untrained_gap") is None:
    lines.append("no untrained copies in this run")
    return lines
  copies = entry["untrained"]
  shifts, shift_iv = entry["shifts"], entry["shift_intervals"]
  lines.append(f"untrained copies: CL's {_number(entry['values'][copies['CL']])}, MIM's "
               f"{_number(entry['values'][copies['MIM']])}; their gap "
               f"{_number(entry['untrained_gap'], entry.get('untrained_gap_interval'), True)}")
  lines.append(f"training moved CL {_number(shifts['CL'], shift_iv['CL'], True)} and MIM "
               f"{_number(shifts['MIM'], shift_iv['MIM'], True)} the paper's way; CL more than "
               f"MIM by {_number(entry['training_difference'], entry.get('training_difference_interval'), True)}")
  return lines


def interval_record(settings: dict, session) -> dict:
  """results.json["intervals"]: the settings, what was not resampled, and each model's 95 %
  interval at every position of every resampled curve."""
  record = {**settings, "coverage": bootstrap.COVERAGE,
            "not_resampled": dict(sorted(session.not_resampled.items())), "models": {}}
  for name, curves in session.replicates.items():
    record["models"][name] = {}
    for key, table in curves.items():
      low, high = bootstrap.percentile_interval(table)
      record["models"][name][key] = {"low": np.round(low, 6).tolist(),
                                     "high": np.round(high, 6).tolist()}
  return record
