"""Per-layer linear probing: what each block's representation can tell apart, and on cue-conflict
images whether it decides by shape or by texture.

Definition (docs/analyses/probing.md):
- Features: for every block b = 1 .. depth, its output zs[2b] gives two features per image, the
  cls token and the mean of the patch tokens (register tokens left out, `Batch.layout`), each
  normalised like a LayerNorm without affine parameters (zero mean, unit variance over the D
  channels, eps 1e-6). A model without a cls token has the mean patch token only: its "cls"
  results are left out (`probing_details["omitted_features"]` says why), and a run that asks for
  the cls feature only is refused for it before any compute.
- Probe: per block, feature and target, a linear classifier fitted by closed-form ridge
  regression on one-hot targets (`clmim.analysis.linear_probe`), from moments streamed over the
  training images on all devices: memory is depth x 2 x D² per set, whatever the number of
  images. The ridge α (relative to the features' mean variance) is chosen from `ridge_grid` by
  the squared error on a held-out part of the training images (image i is held out when the
  fractional part of i·φ, φ the golden ratio, is below `holdout_fraction`: spread evenly over a
  class-sorted folder), then the probe is refitted on all of them.
- Top-1: the share of evaluation images whose arg-max class is their label.
- Shape bias (Geirhos et al. 2019): on cue-conflict images (shape of one class, texture of
  another), of the decisions that name the shape class or the texture class, the share that
  names the shape: shape / (shape + texture). The deciding probe has classes that are both
  (`clmim.data.labelled`: on the procedural data the probe fitted on the "aligned" training set,
  where class k is shape k with texture k).

Data (`clmim.data.labelled`): the probes are fitted on config.probe_data.split (synthetic, tfds)
or config.probe_data.path (image_folder), config.probe_data.num_images of them, and tested on
config.data's own images. Targets: "shape" and "texture" on the procedural data, "label"
otherwise.

Options:
  features: "cls,mean_tokens" (default), "cls" or "mean_tokens".
  holdout_fraction: 0.1: the share of training images that chooses the ridge.
  ridge_grid: the relative ridge values α to choose from; one value: no choice (then
    holdout_fraction may be 0).
  cue_conflict: True: also measure the shape bias (synthetic data, or a folder in
    config.probe_data.cue_conflict_path).
  knn_k: 20: the weighted k-NN probe's k (`clmim.analysis.knn_probe`, DINO's evaluation);
    0: no k-NN probe.
  knn_temperature: 0.07: its vote temperature T (weights exp(cosine / T)).
  knn_train_images: 10000: its memory, the first that many training images (0: all of them).

Results: "probe_<target>_<feature>": [block] top-1; "knn_<target>_<feature>": [block] the
k-NN probe's top-1; "shape_bias_<feature>": [block];
"probing_details": the classes, chance level, chosen ridge per block and feature, image counts
and data of every probe, and the deciding probe's own top-1 ("decision_top1").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from clmim.analysis import core
from clmim.analysis import knn_probe
from clmim.analysis import linear_probe as lp
from clmim.errors import ClmimError

NAME = "probing"
OPTIONS = {"features": "cls,mean_tokens", "holdout_fraction": 0.1,
           "ridge_grid": lp.DEFAULT_RIDGE_GRID, "cue_conflict": True, **knn_probe.OPTIONS}
KINDS = ("cls", "mean_tokens")
TARGETS = ("shape", "texture", "label")
_GOLDEN = (5 ** 0.5 - 1) / 2
# Moments and probe scores in full float32: GPUs otherwise multiply in TF32 (~1e-3 relative).
_HIGHEST = jax.lax.Precision.HIGHEST
_KIND_LABEL = {"cls": "cls token", "mean_tokens": "mean patch token"}


def _chance(target):
  """Reference line: 1 / number of classes of `target` (from any model's details)."""
  def reference(results):
    for values in results.get("models", {}).values():
      details = (values.get("probing_details") or {}).get("targets", {}).get(target)
      if details:
        return details["chance"]
    return None
  return reference


def _series(values):
  return np.asarray(values, np.float64).tolist()


_DIRECTION = {"shape": "higher", "texture": "lower", "label": "higher"}
# What a sweep over models (the hybrid's λ, Sec. 5) reads of the linear probes: the last block's
# shape and texture top-1 on the mean patch token.
_SWEEP_SUMMARIES = {("probe", "shape", "mean_tokens"), ("probe", "texture", "mean_tokens")}


def _top1_results(prefix: str, probe: str, what: str, tail: str, title: str) -> tuple:
  """One top-1 Result per target and feature kind of a probe (`prefix`_<target>_<kind>)."""
  return tuple(
      core.Result(f"{prefix}_{t}_{k}", f"{t} {probe} top-1 ({_KIND_LABEL[k]})", "[block]",
                  series=_series, reference=_chance(t), reference_label="chance",
                  cl_direction=_DIRECTION[t],
                  summary="last" if (prefix, t, k) in _SWEEP_SUMMARIES else None,
                  summary_label=f"{t} {probe}, last block",
                  description=f"{what} of the {t} label on each block's {_KIND_LABEL[k]}, {tail}",
                  title=f"{title} of the {t} label ({_KIND_LABEL[k]})")
      for t in TARGETS for k in KINDS)


RESULTS = _top1_results(
    "probe", "probe", "linear (ridge) probe", "top-1 on the evaluation images", "Linear probe"
) + tuple(
    core.Result(f"shape_bias_{k}", f"shape bias ({_KIND_LABEL[k]})", "[block]",
                series=_series, reference=0.5, reference_label="no preference",
                cl_direction="higher",
                description=f"cue-conflict images: shape / (shape + texture) decisions of the "
                            f"deciding probe on each block's {_KIND_LABEL[k]}",
                title=f"Shape bias per block ({_KIND_LABEL[k]})")
    for k in KINDS) + _top1_results(
    "knn", "k-NN", "weighted k-NN probe (DINO's: k=20, T=0.07 by default)", "top-1",
    "k-NN probe") + (
    core.Result("probing_details", "probe details", "{...}", x=None, series=None,
                description="classes, chance, chosen ridge, image counts of every probe"),)


def feature_kinds(options) -> tuple:
  """The feature kinds of option `features`, in canonical order."""
  given = options["features"]
  names = [s.strip() for s in given.split(",")] if isinstance(given, str) else list(given)
  if not names or any(n not in KINDS for n in names):
    raise ClmimError(f"config.analysis_options.{NAME}.features: expected a comma-separated "
                     f"subset of {', '.join(KINDS)}; got {given!r}.")
  return tuple(k for k in KINDS if k in names)


def check_options(options, where=NAME) -> None:
  """Rejects bad probe options (one line each)."""
  if "features" in options:
    feature_kinds(options)
  fraction = options["holdout_fraction"]
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
      or not 0 <= fraction < 1:
    raise ClmimError(f"config.analysis_options.{where}.holdout_fraction={fraction!r}: expected "
                     "a number in [0, 1).")
  grid = options["ridge_grid"]
  grid = (grid,) if isinstance(grid, (int, float)) else grid
  try:
    values = [float(a) for a in grid]
  except (TypeError, ValueError):
    values = []
  if not values or not all(np.isfinite(a) and a >= 0 for a in values):
    raise ClmimError(f"config.analysis_options.{where}.ridge_grid={options['ridge_grid']!r}: "
                     "expected one or more numbers >= 0.")
  if "knn_k" in options:  # robustness shares these checks without a k-NN probe
    knn_probe.check_options(options, where)
  if len(values) > 1 and fraction == 0:
    raise ClmimError(f"config.analysis_options.{where}: holdout_fraction=0 leaves no images to "
                     "choose among several ridge_grid values; give one value or a fraction > 0.")


def ridge_grid(options) -> list:
  grid = options["ridge_grid"]
  return [float(a) for a in ((grid,) if isinstance(grid, (int, float)) else grid)]


def normalised(v):
  """LayerNorm without affine parameters over the last axis (float32)."""
  v = v.astype(jnp.float32)
  mean = v.mean(-1, keepdims=True)
  var = jnp.square(v - mean).mean(-1, keepdims=True)
  return (v - mean) * jax.lax.rsqrt(var + 1e-6)


def model_kinds(layout) -> tuple:
  """The feature kinds a model of token `layout` has, in canonical order (no "cls" without a
  cls token): the kinds axis of every probe pass of that model."""
  return tuple(k for k in KINDS if k != "cls" or layout.has_cls)


def _layout_of(model) -> core.TokenLayout:
  """The token layout of a registry Model, a bare ViT, or None (the paper's)."""
  return core.TokenLayout.of(getattr(model, "vit", model))


def block_features(zs, kinds=KINDS, blocks=None, layout=core.TokenLayout()):
  """[blocks, kinds, b, D] float32: each block output's cls token / mean patch token (registers
  left out), normalised. `blocks` (1-based) defaults to every block; `layout`: where the tokens
  are (default: the paper's, cls then the patches)."""
  depth = (len(zs) - 1) // 2
  blocks = range(1, depth + 1) if blocks is None else blocks
  # Only the kinds asked for are read: `layout.cls` refuses a model without a cls token.
  parts = {"cls": layout.cls,
           "mean_tokens": lambda z: layout.patches(z).astype(jnp.float32).mean(1)}
  out = []
  for b in blocks:
    z = zs[2 * b]
    out.append(jnp.stack([normalised(parts[k](z)) for k in kinds]))
  return jnp.stack(out)


def layout_features(zs, layout):
  """`block_features` of every kind a model of `layout` has (the probe passes' features)."""
  return block_features(zs, model_kinds(layout), layout=layout)


# ---------------------------------------------------------------- stage 1: training moments

def _fit_sums(targets, batch, options):
  """Moments per partition (0 = fit, 1 = held out) of the features and one-hot targets.
  Labels: column 0 the partition, then one column per target."""
  x = layout_features(batch.zs, batch.layout)
  part = batch.labels[:, 0]
  out = {}
  for p in (0, 1):
    w = batch.weights * (part == p)
    xw = x * w[None, None, :, None]
    out[f"n{p}"] = w.sum()
    out[f"sx{p}"] = xw.sum(2)
    out[f"sxx{p}"] = jnp.einsum("lkbd,lkbe->lkde", xw, x, precision=_HIGHEST)
    for t, (name, classes) in enumerate(targets):
      y = jax.nn.one_hot(batch.labels[:, 1 + t], classes, dtype=jnp.float32)
      out[f"sxy{p}_{name}"] = jnp.einsum("lkbd,bc->lkdc", xw, y, precision=_HIGHEST)
      out[f"sy{p}_{name}"] = (y * w[:, None]).sum(0)
  return out


def fit_stage(targets) -> core.Stage:
  """The stage that streams the training moments of `targets` ((name, classes) pairs)."""
  targets = tuple(targets)
  # The fit is held fixed in the bootstrap: intervals are over evaluation images, given the probe.
  return core.Stage(f"{NAME}_fit", ("probe_fit", targets),
                    lambda batch, options: _fit_sums(targets, batch, options), BOOTSTRAP=False)


def holdout_rows(n: int, fraction: float) -> np.ndarray:
  """1 for the held-out images among n (see the module docstring), else 0."""
  return ((np.arange(n) * _GOLDEN) % 1.0 < fraction).astype(np.int64)


def _moments(sums, p, name, l, k) -> lp.Moments:
  n = float(sums[f"n{p}"])
  return lp.Moments(n, sums[f"sx{p}"][l, k], sums[f"sxx{p}"][l, k], sums[f"sxy{p}_{name}"][l, k],
                    sums[f"sy{p}_{name}"], n)


def fitted_probes(passes, data, pairing: str, targets, options) -> dict:
  """{target: {"weights" [L, K, D, C], "bias" [L, K, C], "ridge" [L][K], ...}} fitted on the
  `pairing` training set; cached per model, so probing and robustness share one pass. K indexes
  the model's `model_kinds` (no cls for a model without a cls token)."""
  key = ("probes", pairing, tuple(targets), float(options["holdout_fraction"]),
         tuple(ridge_grid(options)))
  if key in passes.cache:
    return passes.cache[key]
  train = data.train(pairing)
  classes = [(t, len(train.labels.classes[t])) for t in targets]
  rows = np.concatenate([holdout_rows(len(train.labels.values), options["holdout_fraction"])
                         [:, None]] + [train.column(t)[:, None] for t in targets], axis=1)
  sums = passes.run(fit_stage(classes), train.images, rows, None, f"probe fit ({pairing})")
  depth, kinds = sums["sx0"].shape[:2]
  out = {}
  for name, count in classes:
    probes = [[lp.select(_moments(sums, 0, name, l, k), _moments(sums, 1, name, l, k),
                         ridge_grid(options)) for k in range(kinds)] for l in range(depth)]
    out[name] = {
        "weights": np.asarray([[p.weights for p in row] for row in probes], np.float32),
        "bias": np.asarray([[p.bias for p in row] for row in probes], np.float32),
        "ridge": [[p.ridge for p in row] for row in probes],
        "classes": list(train.labels.classes[name]), "chance": 1.0 / count,
        "train_images": int(round(float(sums["n0"] + sums["n1"]))),
        "holdout_images": int(round(float(sums["n1"]))), "train_data": train.description}
  passes.cache[key] = out
  return out


# ---------------------------------------------------------------- stage 2: evaluation counts

def _eval_sums(pairs, batch, options):
  """Per (target, label column) pair: how often the target's probe predicts that column's
  class [L, K], and the images with a label in that column."""
  x = layout_features(batch.zs, batch.layout)
  predictions = {}
  out = {}
  for index, (target, column) in enumerate(pairs):
    if target not in predictions:
      w, b = batch.context[target]["weights"], batch.context[target]["bias"]
      logits = jnp.einsum("lkbd,lkdc->lkbc", x, w, precision=_HIGHEST) + b[:, :, None, :]
      predictions[target] = jnp.argmax(logits, axis=-1)
    y = batch.labels[:, column]
    valid = batch.weights * (y >= 0)
    out[f"hits{index}"] = ((predictions[target] == y[None, None, :]) * valid).sum(-1)
    out[f"count{index}"] = valid.sum()
  return out


def eval_stage(pairs) -> core.Stage:
  """The stage that counts, for each (target, label column) pair, the probe's hits."""
  pairs = tuple(pairs)
  return core.Stage(f"{NAME}_eval", ("probe_eval", pairs),
                    lambda batch, options: _eval_sums(pairs, batch, options))


def probe_context(probes: dict, targets) -> dict:
  return {t: {"weights": probes[t]["weights"], "bias": probes[t]["bias"]} for t in targets}


def _rates(sums, index):
  count = float(sums[f"count{index}"])
  return np.asarray(sums[f"hits{index}"], np.float64) / max(count, 1.0), int(round(count))


# ---------------------------------------------------------------- the analysis

def check(model, options) -> None:
  check_options(options)
  if not any(k in model_kinds(_layout_of(model)) for k in feature_kinds(options)):
    raise ClmimError(f"config.analysis_options.{NAME}.features={options['features']!r}: this "
                     "model has no cls token (class_token=False); add 'mean_tokens'.")


def check_training_set(data, options, where=NAME) -> None:
  """The training images leave at least one image to fit and, when the ridge is chosen, one to
  choose it with (checked before any compute)."""
  count = len(data.train().labels.values)
  held = int(holdout_rows(count, options["holdout_fraction"]).sum())
  if count - held < 1 or (len(ridge_grid(options)) > 1 and held < 1):
    raise ClmimError(f"config.data: {count} probe training image(s) leave {count - held} to fit "
                     f"and {held} to choose the ridge (config.analysis_options.{where}."
                     f"holdout_fraction={options['holdout_fraction']}); use more training images "
                     "(config.probe_data.num_images) or a single ridge_grid value.")
  if "knn_k" in options:
    knn_probe.check_training_set(count, options, where)


def check_data(data, options) -> None:
  """Opens the training, evaluation and (when asked) cue-conflict images: before any compute."""
  check_options(options)
  check_training_set(data, options)
  data.evaluation()
  if options["cue_conflict"] and data.cue_conflict() is not None:
    pairing, _ = data.decision
    data.train(pairing)
    data.evaluation(pairing)


def measure(model, data, passes, options) -> dict:
  """Fits the probes and measures top-1 (and shape bias); returns the applicable RESULTS keys
  (no cls ones for a model without a cls token)."""
  available = model_kinds(_layout_of(model))
  kinds = tuple(k for k in feature_kinds(options) if k in available)
  if not kinds:
    raise ClmimError(f"{NAME}: the model has none of the features {options['features']!r} "
                     "(no cls token).")
  picked = [available.index(k) for k in kinds]  # positions on the probes' kinds axis
  probes = fitted_probes(passes, data, "independent", data.targets, options)
  evaluation = data.evaluation()
  columns = evaluation.labels.columns
  pairs = [(t, columns.index(t)) for t in data.targets]
  sums = passes.run(eval_stage(pairs), evaluation.images, evaluation.labels.values,
                    probe_context(probes, data.targets), "probe evaluation")
  out, details = {}, {"features": list(kinds), "evaluation_data": evaluation.description,
                      "targets": {}}
  omitted = [k for k in feature_kinds(options) if k not in kinds]
  if omitted:
    details["omitted_features"] = {k: "the model has no cls token (class_token=False)"
                                   for k in omitted}
  for index, target in enumerate(data.targets):
    top1, count = _rates(sums, index)
    for k, kind in zip(picked, kinds):
      out[f"probe_{target}_{kind}"] = top1[:, k].tolist()
    entry = {key: value for key, value in probes[target].items()
             if key not in ("weights", "bias")}
    entry["ridge"] = [[row[k] for k in picked] for row in entry["ridge"]]
    details["targets"][target] = {**entry, "evaluation_images": count}
  if options["knn_k"]:
    top1, details["knn"] = knn_probe.measure(passes, data, options, layout_features)
    for target, values in top1.items():
      out.update({f"knn_{target}_{kind}": values[:, k].tolist() for k, kind in zip(picked, kinds)})
  conflict = data.cue_conflict() if options["cue_conflict"] else None
  if conflict is not None:
    out.update(_shape_bias(data, passes, options, conflict, kinds, picked, details))
  out["probing_details"] = details
  out["num_images"] = details["targets"][data.targets[0]]["evaluation_images"]
  return out


def _shape_bias(data, passes, options, conflict, kinds, picked, details) -> dict:
  """Shape bias per block of the deciding probe on the cue-conflict images."""
  pairing, target = data.decision
  probes = fitted_probes(passes, data, pairing, (target,), options)
  context = probe_context(probes, (target,))
  values = conflict.labels.values.copy()
  values[values[:, 0] == values[:, 1]] = -1  # shape and texture agree: no conflict to decide
  sums = passes.run(eval_stage([(target, 0), (target, 1)]), conflict.images, values, context,
                    "cue-conflict decisions")
  shape_hits = np.asarray(sums["hits0"], np.float64)
  texture_hits = np.asarray(sums["hits1"], np.float64)
  decided = shape_hits + texture_hits
  bias = np.where(decided > 0, shape_hits / np.maximum(decided, 1), np.nan)
  entry = {"pairing": pairing, "target": target, "data": conflict.description,
           "images": int(round(float(sums["count0"]))),
           "decided_share": (decided / max(float(sums["count0"]), 1.0))[:, picked].tolist()}
  if pairing != "independent":  # the deciding probe is not one of the probes above: its top-1
    own = data.evaluation(pairing)
    column = own.labels.columns.index(target)
    top = passes.run(eval_stage([(target, column)]), own.images, own.labels.values, context,
                     "deciding probe evaluation")
    entry["decision_top1"] = _rates(top, 0)[0][:, picked].tolist()
    entry["decision_ridge"] = [[row[k] for k in picked] for row in probes[target]["ridge"]]
  details["cue_conflict"] = entry
  return {f"shape_bias_{kind}": bias[:, k].tolist() for k, kind in zip(picked, kinds)}
