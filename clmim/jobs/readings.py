"""Readings: what a notebook prints under a figure, computed from the run's results.

The notebooks' markdown says what a figure is, what the paper reports and how to read it; what
*this* run shows is printed by a reading, built here from the results dict alone (results.json,
`clmim.jobs.analyze.run`'s return value) and the analysis modules' declarations
(`clmim.analysis.core.Result`: label, series, reference, the paper's CL-vs-MIM direction). Nothing
is known in advance about the models, so a reading holds for the demo models, the official
ViT-B checkpoints, any depth, one model alone or no untrained copies.

A reading's first line names the results.json keys it quotes, `[reading: key, ...] title`; its
other lines are indented and it ends at a blank line. Every number it quotes is a value of those
keys in results.json, a point of a declared series of them (e.g. the mean over heads), the
later-half mean, interval or gap of the findings (`clmim.jobs.report.findings`, stored in
results.json["findings"]) or a declared reference, printed
to 3 decimals as the summary tables print them (tests/test_colabs.py checks this on the executed
notebooks). Block numbers and counts are integers.

For a depth curve a reading states each model's curve with its highest and lowest point; where
the run's first CL model is above or below its first MIM model (the pair the findings compare)
and where that is the paper's direction; their later-half verdict; each trained model against
its untrained copy (what training changed); and where the trained models lie against the
reference (uniform attention, chance, ...).
"""
from __future__ import annotations

import functools

import numpy as np

from clmim.analysis import core
from clmim.jobs import report, verdicts

FAMILIES = {"cl": "CL", "mim": "MIM", "random": "untrained", "other": "other"}


def fmt(value) -> str:
  """How a reading quotes a number: 3 decimals, as the summary tables."""
  return f"{float(value):.3f}"


@functools.lru_cache(maxsize=None)
def _declarations() -> dict:
  """{results key: (analysis module, Result)} over every analysis module."""
  out = {}
  for name in core.available():
    module = core.load(name)
    for result in module.RESULTS:
      out[result.key] = (module, result)
  return out


def declaration(key: str):
  """(module, Result) declaring the results key `key`; KeyError for an unknown key."""
  return _declarations()[key]


def _family(results: dict, name: str) -> str:
  family = results["model_info"].get(name, {}).get("family", "other")
  return FAMILIES.get(family, family)


pair = verdicts.pair  # (first CL model, first MIM model): the pair the findings compare
untrained_copy = verdicts.untrained_copy


def _series(result, values) -> list:
  return [float(v) for v in result.series(values)]


def position_names(result, length: int, results: dict) -> list:
  """What each point of a curve is called: "block 3", "the embedding", or a column label."""
  if result.x == "stage":
    return ["the embedding"] + [f"block {i}" for i in range(1, length)]
  if result.x == "block":
    return [f"block {i}" for i in range(1, length + 1)]
  labels = result.columns(results) if result.columns is not None else None
  if labels is not None and len(labels) == length:
    return [f"{result.x} {label}" for label in labels]
  return [f"{result.x} {i}" for i in range(1, length + 1)]


def _and(items: list) -> str:
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def where(result, indices, length: int, results: dict) -> str:
  """Names a set of curve points, e.g. "blocks 1, 2 and 5-6", "the embedding and blocks 1-3",
  "every block"."""
  indices = sorted(indices)
  if not indices:
    return "no position"
  noun = {"stage": "stage", "block": "block"}.get(result.x)
  if len(indices) == length and length > 1:
    return f"every {noun or result.x}"
  if noun is None:
    return _and([position_names(result, length, results)[i] for i in indices])
  parts = []
  if result.x == "stage" and indices[0] == 0:
    parts.append("the embedding")
    indices = indices[1:]
  blocks = [i + (0 if result.x == "stage" else 1) for i in indices]
  runs = []
  for b in blocks:  # consecutive blocks as one range
    if runs and b == runs[-1][1] + 1:
      runs[-1][1] = b
    else:
      runs.append([b, b])
  texts = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs]
  if blocks:
    parts.append(("block " if len(blocks) == 1 else "blocks ") + _and(texts))
  return _and(parts)


def _sides(a: list, b: list) -> tuple:
  """Indices where a is above b, below b, and equal at the printed precision (NaN left out)."""
  above, below, equal = [], [], []
  for i, (x, y) in enumerate(zip(a, b)):
    if not np.isfinite([x, y]).all():
      continue
    if fmt(x) == fmt(y):
      equal.append(i)
    else:
      (above if x > y else below).append(i)
  return above, below, equal


def _compare(result, a: list, b: list, results: dict, higher="higher", lower="lower") -> str:
  """ "higher in blocks 1-2, lower in block 3" for curve a against curve b."""
  above, below, equal = _sides(a, b)
  parts = [f"{word} in {where(result, idx, len(a), results)}"
           for word, idx in ((higher, above), (lower, below), ("equal (to 3 decimals)", equal))
           if idx]
  return ", ".join(parts) if parts else "no comparable position"


def _extremes(result, curve: list, results: dict) -> str:
  finite = [i for i, v in enumerate(curve) if np.isfinite(v)]
  if len(finite) < 2:
    return ""
  names = position_names(result, len(curve), results)
  top = max(finite, key=lambda i: curve[i])
  low = min(finite, key=lambda i: curve[i])
  if fmt(curve[top]) == fmt(curve[low]):
    return " (flat to 3 decimals)"
  return f" (highest at {names[top]}, lowest at {names[low]})"


def _title(result, results: dict) -> str:
  what = {"stage": "by stage", "block": "by block"}.get(result.x, f"by {result.x}")
  if result.layout.endswith("[head]"):
    what = "mean over heads, " + what
  paper = f"; the paper: CL {result.cl_direction} than MIM" if result.cl_direction else ""
  options = results.get("config", {}).get("analysis_options", {}).get("feature_variance", {})
  if result.key == "feature_variance" and options.get("normalize"):
    what += ", normalised (the share of a map's energy that varies over positions)"
  return f"{result.label}, {what}{paper}"


def curve(results: dict, key: str) -> list[str]:
  """The body lines of a depth curve's reading (no header): see the module docstring."""
  module, result = declaration(key)
  # A model without the quantity (None: no registers, no cls token) has no curve to read.
  models = [n for n, r in results["models"].items() if r.get(key) is not None]
  curves = {n: _series(result, results["models"][n][key]) for n in models}
  lines = [f"  {n} [{_family(results, n)}]: " + ", ".join(fmt(v) for v in c)
           + _extremes(result, c, results) for n, c in curves.items()]
  cl, mim = pair(results)
  if cl in curves and mim in curves:
    a, b = curves[cl], curves[mim]
    if len(a) == len(b):
      several = sum(results["model_info"][n]["family"] in ("cl", "mim") for n in curves) > 2
      lines.append(f"  CL ({cl}) against MIM ({mim}"
                   + ("; the first of each, as in the findings" if several else "") + "): CL "
                   + _compare(result, a, b, results) + ".")
      if result.cl_direction:
        wanted = _sides(a, b)[0 if result.cl_direction == "higher" else 1]
        other = [i for i in range(len(a)) if i not in wanted and np.isfinite([a[i], b[i]]).all()]
        holds = f"holds in {where(result, wanted, len(a), results)}" if wanted else \
            "holds nowhere"
        lines.append(f"  The paper's direction (CL {result.cl_direction}) {holds}"
                     + (f", not in {where(result, other, len(a), results)}." if other and wanted
                        else "."))
    else:
      lines.append(f"  {cl} and {mim} have curves of different lengths ({len(a)} and {len(b)} "
                   "points): compared over the later half only.")
    entry = next((f for f in report.findings(results, [module]) if f["key"] == key), None)
    if entry is not None and entry["verdict"] is not None:
      half = "Later half of the blocks" if result.x in ("block", "stage") else \
          f"Second half of the {result.x}s"
      lines.append(f"  {half} (the findings' verdict): {verdicts.headline(entry)}.")
      lines += [f"    {line}." for line in verdicts.describe(entry)]
  else:
    missing = " and ".join(f for f, n in (("CL", cl), ("MIM", mim)) if n not in curves)
    lines.append(f"  No CL-MIM comparison: this run has no {missing} model with {key} "
                 "(families: CL = contrastive, MIM = masked image modelling).")
  trained = [n for n in models if results["model_info"][n]["family"] != "random"]
  against = []
  for name in trained:
    copy = untrained_copy(results, name)
    if copy in curves and len(curves[copy]) == len(curves[name]):
      against.append(f"{name} " + _compare(result, curves[name], curves[copy], results))
  if against:
    lines.append("  What training changed, each trained model against its untrained copy: "
                 + "; ".join(against) + ".")
  elif trained and not any(results["model_info"][n]["family"] == "random" for n in models):
    lines.append("  No untrained copies in this run (config.include_untrained = False): "
                 "nothing shows what the architecture does before training.")
  reference = core.reference_value(result, results)
  if reference is not None and np.isfinite(reference) and trained:
    label = result.reference_label or "reference"
    sides = "; ".join(f"{n} " + _compare(result, curves[n], [reference] * len(curves[n]),
                                        results, "above it", "below it") for n in trained)
    lines.append(f"  Against the reference, {label} ({fmt(reference)}): {sides}.")
  return lines


def attention_maps(results: dict) -> tuple[list[str], list[str]]:
  """(keys quoted, body lines) of the attention-map reading, per model and kept block: whether
  the maps move with the query (where the kept images' head-mean maps peak; the queries' map
  similarity over every image), how local they are, and, where the run measured them, how
  uniform the attention is and how much of it lands on the object."""
  models = [n for n, r in results["models"].items() if "attention_maps" in r]
  others = [("query_map_similarity", "queries' maps alike (cosine)"),
            ("attention_entropy", "attention entropy"),
            ("object_attention_cls", "cls attention on the object"),
            ("object_attention_patches", "patch attention on the object")]
  keys = ["attention_maps"] + [k for k, _ in others
                               if any(k in results["models"][n] for n in models)]
  lines = []
  for name in models:
    kept = results["models"][name]["attention_maps"]
    queries = [tuple(q) for q in kept["queries"]]
    count = len(kept["images"])
    maps = np.asarray(kept["maps"], np.float64)  # [image][query][block][head][g][g]
    for b, block in enumerate(kept["blocks"]):
      mean = maps[:, :, b].mean(axis=2)  # [image, query, g, g], mean over heads
      grid = mean.shape[-1]
      # (x, y) = (column, row) of each map's highest patch, as the queries are written.
      peaks = [[divmod(int(np.argmax(mean[i, q])), grid)[::-1] for q in range(len(queries))]
               for i in range(count)]
      same = sum(len(set(p)) == 1 for p in peaks)
      (qx, qy) = queries[0]
      near = sum(max(abs(p[0][0] - qx), abs(p[0][1] - qy)) <= 1 for p in peaks)
      lines.append(
          f"  {name} [{_family(results, name)}], block {block}: the {len(queries)} queries' "
          f"maps peak at the same patch in {same} of {count} images; query {queries[0]}'s map "
          f"peaks on or next to the query in {near} of {count} "
          f"(at {', '.join(str(p[0]) for p in peaks)}).")
      values = []
      for key, what in others:
        if key in results["models"][name]:
          curve_ = _series(declaration(key)[1], results["models"][name][key])
          if block <= len(curve_):
            values.append(f"{what} {fmt(curve_[block - 1])}")
      if values:
        lines.append("    " + "; ".join(values) + ".")
  for key in ("object_attention_cls",):
    if key in keys:
      result = declaration(key)[1]
      reference = core.reference_value(result, results)
      if reference is not None:
        lines.append(f"  Attention spread evenly over the image puts {fmt(reference)} on the "
                     f"object (the {result.reference_label}).")
  return keys, lines


def _per_model(results: dict, key: str, what: str, pick) -> list[str]:
  """One line "what: model value, ..." over the models that have `key` ([] when none has)."""
  have = [n for n, r in results["models"].items() if r.get(key) not in (None, [], {})]
  if not have:
    return []
  return [f"  {what}: " + ", ".join(f"{n} {pick(results['models'][n][key])}" for n in have)
          + "."]


def _extra(results: dict, key: str) -> tuple[list[str], list[str]]:
  """Keys and lines a curve's reading adds for the notebooks' other panels of its figure."""
  options = results.get("config", {}).get("analysis_options", {})
  state = options.get("tsne", {}).get("state", "last")
  state = {"last": "the last block's output",
           "official": "the official notebook's state, at its relative depth"}.get(
               state, f"state {state}")
  block = options.get("svd", {}).get("block", "last")
  block = "the last block" if block == "last" else f"block {block}"
  extra = {
      "tsne_knn_image_accuracy": [
          ("tsne_knn_image_accuracy_state", f"The k-NN image accuracy of the state t-SNE embeds "
           f"({state}), in token space", fmt),
          ("tsne_knn_image_accuracy_2d", "The same in the 2-D t-SNE embedding", fmt)],
      "effective_rank": [
          ("singular_values", "The first singular value's share of the spectrum after the "
           "last block", lambda v: fmt(v[-1][0]))],
      "token_shift_ratio": [
          ("svd_shift_ratio", f"Shift ratio of the projected image(s) in {block}",
           lambda v: ", ".join(fmt(x) for x in v))],
      "cka_adjacent": [
          ("cka_mean_tokens", "CKA between the embedding and the last stage (mean patch "
           "token)", lambda v: fmt(v[0][-1]))],
  }.get(key, [])
  keys, lines = [], []
  for other, what, pick in extra:
    found = _per_model(results, other, what, pick)
    if found:
      keys.append(other)
      lines += found
  return keys, lines


def reading(results: dict, key: str) -> str:
  """The reading of results key `key` (a depth curve, or "attention_maps"), ending in a blank
  line; see the module docstring."""
  if not any(key in r for r in results["models"].values()):
    return f"[reading: {key}] not in this run's results (is its analysis in config.analyses?)\n"
  if all(r.get(key) is None for r in results["models"].values()):
    return (f"[reading: {key}] no model of this run has it (None for every model: e.g. "
            f"attention on registers when no model has registers)\n")
  if key == "attention_maps":
    keys, lines = attention_maps(results)
    return f"[reading: {', '.join(keys)}] attention maps of query patches\n" + \
        "\n".join(lines) + "\n"
  _, result = declaration(key)
  if result.series is None:
    raise ValueError(f"{key!r} is no curve; readings exist for curves and attention_maps.")
  keys, extra = _extra(results, key)
  lines = curve(results, key) + extra
  return f"[reading: {', '.join([key] + keys)}] {_title(result, results)}\n" + \
      "\n".join(lines) + "\n"


def show(results: dict, *keys: str) -> None:
  """Prints the readings of `keys`, each followed by a blank line."""
  for key in keys:
    print(reading(results, key))
