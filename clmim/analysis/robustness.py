"""Robustness of a probed classifier to noise: which frequencies does the representation rely on?

Definition (docs/analyses/robustness.md; the Fourier-noise test of Park & Kim, "How do vision
transformers work?", 2022):
- Classifier: the linear probe of `probing` (same moments, same ridge choice, one shared pass
  when both analyses run) on one block's feature, fitted on clean training images.
- Band noise: Gaussian noise restricted to the square annulus of frequencies whose radius
  max(|ky|, |kx|) lies in [f - w/2, f + w/2)·π, scaled to the same root-mean-square `band_rms`
  for every band (pixel units, images in [0, 1]; `clmim.analysis.noise`), added to every evaluation
  image before the model's normalisation; one condition per centre f of `bands`.
- White noise: i.i.d. Gaussian of standard deviation s for each s of `white_rms`.
- Drop: clean top-1 minus top-1 under the noise (higher = hurt more), per condition. The noise
  of image i in a condition depends only on (seed, condition, i), so the result does not depend
  on batching or devices. All conditions run in the same step as the clean forward (a scan over
  conditions), so every image is read and decoded once.

Options:
  target: "auto" (default: "shape" on the procedural data, "label" otherwise) or a target name
    ("shape", "texture", "label").
  block: the probed block, 1 .. depth, or -1 (default) for the last.
  feature: "mean_tokens" (default: the mean of the patch tokens, register tokens left out) or
    "cls" (refused before any compute for a model without a cls token).
  bands: band centres in units of π, each in (0, 1); default 0.1, 0.2, ..., 0.9.
  band_width: in units of π, default 0.1.
  band_rms: the band noise's root-mean-square in pixel units, default 0.1.
  white_rms: white-noise standard deviations in pixel units, default (0.02, 0.05, 0.1, 0.2).
  seed: the noise seed.
  holdout_fraction, ridge_grid: the probe's, as in `probing`.

Results: "robustness_clean_top1": the probe's top-1 on the clean evaluation images (what every
drop is measured from: a drop of 0.3 means little at a clean top-1 of 0.3); "band_noise_drop":
[band] top-1 drop; "white_noise_drop": [strength] top-1 drop; "robustness_details": the clean
and noisy top-1, the conditions, the probe's block, feature, target, ridge and data. The
summary prints the clean top-1 as its own table and robustness.png writes it in each model's
legend entry.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from clmim.analysis import core, plots, probing
from clmim.analysis import noise
from clmim.errors import ClmimError

NAME = "robustness"
OPTIONS = {"target": "auto", "block": -1, "feature": "mean_tokens",
           "bands": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), "band_width": 0.1,
           "band_rms": 0.1, "white_rms": (0.02, 0.05, 0.1, 0.2), "seed": 0,
           "holdout_fraction": probing.OPTIONS["holdout_fraction"],
           "ridge_grid": probing.OPTIONS["ridge_grid"]}


def _columns(option, unit):
  """Column heads of a curve over the conditions: the option's values (from results.json)."""
  def columns(results):
    values = results.get("analyses", {}).get(NAME, {}).get("options", {}).get(option)
    return None if values is None else [f"{v:g}{unit}" for v in values]
  return columns


def _identity(values):
  return np.asarray(values, np.float64).tolist()


def _clean_column(results):
  """The clean top-1's one column head."""
  del results
  return ["clean"]


RESULTS = (
    core.Result("robustness_clean_top1", "clean top-1 of the noise probe", "[]", x="condition",
                series=lambda value: [float(value)],
                description="the probe's top-1 on the evaluation images without noise: what "
                            "every drop below is measured from",
                columns=_clean_column),
    core.Result("band_noise_drop", "top-1 drop under band noise", "[band]", x="band",
                series=_identity, cl_direction="lower",
                description="clean top-1 minus top-1 with noise of one frequency band added "
                            "(same energy per band); the finding averages the higher half of "
                            "the bands",
                title="Accuracy drop under frequency-band noise",
                columns=_columns("bands", "π")),
    core.Result("white_noise_drop", "top-1 drop under white noise", "[strength]",
                x="strength", series=_identity,
                description="clean top-1 minus top-1 with white Gaussian noise of each "
                            "strength added",
                columns=_columns("white_rms", "")),
    core.Result("robustness_details", "robustness details", "{...}", x=None, series=None,
                description="clean and noisy top-1, conditions, probe block/feature/target"),
)


def _where(option: str) -> str:
  return f"config.analysis_options.{NAME}.{option}"


def _block(model, options) -> int:
  depth = model.vit.depth
  block = options["block"]
  if isinstance(block, bool) or not isinstance(block, int) or not (
      block == -1 or 1 <= block <= depth):
    raise ClmimError(f"{_where('block')}={block!r}: expected a block 1 .. {depth} of model "
                     f"{model.name!r}, or -1 for the last.")
  return depth if block == -1 else block


def _target(data, options) -> str:
  target = options["target"]
  if target == "auto":
    return data.targets[0]
  if target not in data.targets:
    raise ClmimError(f"{_where('target')}={target!r}: the data has the targets "
                     f"{', '.join(data.targets)} (or 'auto').")
  return target


def _conditions(image_size: int, options) -> dict:
  """The noise conditions as arrays (kind, low, high, rms), band first, then white."""
  limits = noise.check_bands(image_size, options["bands"], options["band_width"],
                             _where("bands"))
  strengths = noise.check_strengths(options["white_rms"], _where("white_rms"))
  rms = options["band_rms"]
  if isinstance(rms, bool) or not isinstance(rms, (int, float)) or not 0 < rms < np.inf:
    raise ClmimError(f"{_where('band_rms')}={rms!r}: expected a positive number (pixel units).")
  kinds = [noise.BAND] * len(limits) + [noise.WHITE] * len(strengths)
  lows = [low for low, _ in limits] + [0.0] * len(strengths)
  highs = [high for _, high in limits] + [0.0] * len(strengths)
  return {"kind": np.asarray(kinds, np.int32), "low": np.asarray(lows, np.float32),
          "high": np.asarray(highs, np.float32),
          "rms": np.asarray([float(rms)] * len(limits) + strengths, np.float32),
          "id": np.arange(len(kinds), dtype=np.int32)}


def check(model, options) -> None:
  _block(model, options)
  if options["feature"] not in probing.KINDS:
    raise ClmimError(f"{_where('feature')}={options['feature']!r}: expected one of "
                     f"{', '.join(probing.KINDS)}.")
  if options["feature"] not in probing.model_kinds(core.TokenLayout.of(model.vit)):
    raise ClmimError(f"{_where('feature')}={options['feature']!r}: model {model.name!r} has no "
                     "cls token (class_token=False); use 'mean_tokens'.")
  if not isinstance(options["seed"], int) or isinstance(options["seed"], bool):
    raise ClmimError(f"{_where('seed')}={options['seed']!r}: expected an integer.")
  probing.check_options(options, NAME)
  _conditions(model.vit.image_size, options)


def check_data(data, options) -> None:
  """The classifier is a probe: it needs labelled training and evaluation images."""
  _target(data, options)
  probing.check_training_set(data, options, NAME)
  data.evaluation()


def _noisy_sums(block, kind, seed, batch, options):
  """Clean hits and hits under every condition of the context (a scan: one forward each)."""
  context = batch.context
  w, b = context["weights"], context["bias"]
  y = batch.labels[:, 0]
  valid = batch.weights * (y >= 0)

  def hits(zs):
    x = probing.block_features(zs, kinds=(kind,), blocks=(block,), layout=batch.layout)[0, 0]
    scores = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST) + b
    return ((jnp.argmax(scores, axis=-1) == y) * valid).sum()

  index = jnp.maximum(batch.index, 0)  # padding (-1) has weight 0; any key will do
  shape = batch.images.shape[1:]

  def one(condition):
    extra = noise.batch_perturbation(seed, index, condition["id"], condition["kind"],
                                     condition["low"], condition["high"], condition["rms"],
                                     shape) / context["std"]
    return hits(batch.forward(batch.images + extra)[0])

  noisy = jax.lax.map(one, {key: context[key] for key in ("kind", "low", "high", "rms", "id")})
  return {"clean": hits(batch.zs), "noisy": noisy, "labelled_count": valid.sum()}


def noisy_stage(block: int, kind: str, seed: int) -> core.Stage:
  return core.Stage(f"{NAME}_eval", ("noisy_eval", block, kind, seed),
                    lambda batch, options: _noisy_sums(block, kind, seed, batch, options))


def measure(model, data, passes, options) -> dict:
  target, block = _target(data, options), _block(model, options)
  kind = options["feature"]
  probes = probing.fitted_probes(passes, data, "independent", data.targets, options)[target]
  # The probes' kinds axis holds the model's kinds only (no cls without a cls token).
  k = probing.model_kinds(core.TokenLayout.of(model.vit)).index(kind)
  evaluation = data.evaluation()
  conditions = _conditions(model.vit.image_size, options)
  context = {"weights": probes["weights"][block - 1, k], "bias": probes["bias"][block - 1, k],
             "std": np.asarray(evaluation.images.std, np.float32), **conditions}
  column = evaluation.labels.columns.index(target)
  sums = passes.run(noisy_stage(block, kind, int(options["seed"])), evaluation.images,
                    evaluation.labels.values[:, column], context, "noise robustness")
  count = max(float(sums["labelled_count"]), 1.0)
  clean = float(sums["clean"]) / count
  noisy = np.asarray(sums["noisy"], np.float64) / count
  bands = len(options["bands"])
  return {
      "num_images": int(round(float(sums["labelled_count"]))),
      "robustness_clean_top1": clean,
      "band_noise_drop": (clean - noisy[:bands]).tolist(),
      "white_noise_drop": (clean - noisy[bands:]).tolist(),
      "robustness_details": {
          "target": target, "block": block, "feature": kind, "clean_top1": clean,
          "band_top1": noisy[:bands].tolist(), "white_top1": noisy[bands:].tolist(),
          "band_centres": [float(c) for c in options["bands"]],
          "band_width": float(options["band_width"]), "band_rms": float(options["band_rms"]),
          "white_rms": [float(s) for s in options["white_rms"]],
          "ridge": probes["ridge"][block - 1][k], "chance": probes["chance"],
          "evaluation_images": int(round(float(sums["labelled_count"]))),
          "train_data": probes["train_data"], "evaluation_data": evaluation.description}}


def figures(results: dict, options: dict) -> dict:
  """robustness.png: the drop per band centre (Park & Kim's Fourier-noise plot) and per
  white-noise strength, one line per model; each legend entry gives the model's clean top-1."""
  names = [n for n, r in results.get("models", {}).items() if r.get("band_noise_drop")]
  if not names:
    return {}
  styles = plots.model_styles(results, names)
  fig = Figure(figsize=(10.4, 3.8))
  ax_band, ax_white = fig.subplots(1, 2)
  for name in names:
    details = results["models"][name]["robustness_details"]
    style = styles[name]
    # The clean top-1 every drop starts from (results.json's of older runs: in the details).
    clean = results["models"][name].get("robustness_clean_top1", details.get("clean_top1"))
    label = style["label"] + ("" if clean is None else f", clean top-1 {clean:.3f}")
    kw = dict(color=style["color"], linestyle=style["linestyle"], label=label,
              marker="o", markersize=3.5, linewidth=1.8)
    ax_band.plot(details["band_centres"], results["models"][name]["band_noise_drop"], **kw)
    ax_white.plot(details["white_rms"], results["models"][name]["white_noise_drop"], **kw)
    for ax, key, x in ((ax_band, "band_noise_drop", details["band_centres"]),
                       (ax_white, "white_noise_drop", details["white_rms"])):
      band = plots.interval_band(results, name, key, len(x))
      if band is not None:  # the bootstrap interval over images
        ax.fill_between(x, *band, color=style["color"], alpha=0.18, linewidth=0)
  details = results["models"][names[0]]["robustness_details"]
  for ax in (ax_band, ax_white):
    ax.axhline(0.0, color="k", linewidth=0.8, linestyle=":")
  ax_band.set_xticks(details["band_centres"],
                     [f"{c:g}π" for c in details["band_centres"]], fontsize=8)
  plots.finish_axes(ax_band, "Noise frequency (band centre)", "Top-1 drop",
                    f"Band noise (rms {details['band_rms']:g}, width {details['band_width']:g}π)",
                    legend=False)
  ax_white.set_xscale("log")
  ax_white.minorticks_off()
  ax_white.set_xticks(details["white_rms"], [f"{s:g}" for s in details["white_rms"]], fontsize=8)
  plots.finish_axes(ax_white, "White noise std (pixel units)", "Top-1 drop",
                    f"White noise ({details['target']} probe, block {details['block']})")
  fig.tight_layout()
  return {"robustness.png": fig}
