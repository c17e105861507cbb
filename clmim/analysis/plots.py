"""Figures in the paper's style, drawn from the numbers in results.json.

`results` is the analysis job's dict: {"models": {name: {key: values}}, "model_info": {name:
{"family": "cl" | "mim" | "random" | "other", ...}}}. Which curves exist, their labels and
reference lines come from the analysis modules' `core.Result` declarations. Colours say the
family: contrastive models in blues, masked-image models in reds/oranges, untrained baselines
grey and dashed.

Figures are built on `matplotlib.figure.Figure` directly (no pyplot), so nothing touches global
state or the interactive backend, and each file is written atomically: a temporary file in the
same folder, renamed over the target only once complete.

Map figures (attention maps, rollout) share one colour scale per figure, from 0 to the largest
value drawn, with a colourbar that names the quantity and marks uniform attention 1/N, so that
a near-uniform map looks flat beside a focused one; the input images come from results.json as
pooled thumbnails of the model's normalised input (`thumbnails`, `display_images`).
"""
import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from clmim.atomic import save_figure_atomic
from clmim.errors import ClmimError

DPI = 150
FAMILIES = ("cl", "mim", "random", "other")
_PALETTES = {
    "cl": ("#1f4e9c", "#4a90d9", "#0b2f66", "#7fb8ea", "#2f6db5"),
    "mim": ("#d62728", "#ff7f0e", "#a50f15", "#f6a04d", "#e8575a"),
    "random": ("#7f7f7f", "#b0b0b0", "#4d4d4d"),
    "other": ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"),
}
_FAMILY_LABEL = {"cl": "CL", "mim": "MIM", "random": "", "other": ""}

Reference = Union[None, float, Sequence[float]]
# Legend handles this many font sizes long: a dashed handle shows about three dash periods.
HANDLE_LENGTH = 3.2
HEAD_DOTS_LABEL = "single heads (lines: mean over heads)"
MAP_CMAP = "inferno"
MAP_GAMMA = 0.5  # map figures' colour scale: square root (see `map_norm`)
# Input thumbnails in results.json are at most this many pixels on a side (see `thumbnails`):
# every model of a run stores its own, so they are kept small (the demo's 32 px stay whole;
# a 224 px ViT-B/16 input becomes 28 px, 2 px per patch).
MAX_THUMBNAIL = 32


def family(results: dict, name: str) -> str:
  """The family tag of model `name` ("other" when missing or unknown)."""
  tag = str(results.get("model_info", {}).get(name, {}).get("family", "other")).lower()
  return tag if tag in FAMILIES else "other"


def model_styles(results: dict, names: Sequence[str]) -> Dict[str, dict]:
  """Line style per model: colour by family (shades cycle within a family), dashes for random."""
  counts = {f: 0 for f in FAMILIES}
  styles = {}
  for name in names:
    fam = family(results, name)
    palette = _PALETTES[fam]
    tag = _FAMILY_LABEL[fam]
    styles[name] = {
        "color": palette[counts[fam] % len(palette)],
        "linestyle": "--" if fam == "random" else "-",
        "label": f"{name} ({tag})" if tag else name,
    }
    counts[fam] += 1
  return styles


def models_with(results: dict, key: str) -> List[str]:
  """Names of the models whose entry has non-empty values under `key`, in results order."""
  models = results.get("models", {}) or {}
  return [n for n, v in models.items() if isinstance(v, dict) and v.get(key) is not None
          and len(v[key]) > 0]


def _per_layer(results: dict, name: str, key: str) -> List[np.ndarray]:
  """Values of one model as a list (per layer) of 1-D float arrays (per head)."""
  try:
    return [np.atleast_1d(np.asarray(layer, np.float64)).ravel()
            for layer in results["models"][name][key]]
  except (TypeError, ValueError) as e:
    raise ClmimError(f"results['models'][{name!r}][{key!r}]: expected a list (per layer) of "
                     f"numbers or lists of per-head numbers ({e}).") from e


def stage_rows(results: dict, name: str) -> np.ndarray:
  """ΔlogA of one model as an array [stages, frequencies]."""
  try:
    rows = np.asarray(results["models"][name]["fourier"], np.float64)
  except (TypeError, ValueError) as e:
    raise ClmimError(f"results['models'][{name!r}]['fourier']: expected a rectangular list "
                     f"[stage][frequency] of numbers ({e}).") from e
  if rows.ndim != 2 or rows.shape[1] == 0:
    raise ClmimError(f"results['models'][{name!r}]['fourier']: expected [stage][frequency] "
                     f"numbers, got shape {rows.shape}.")
  return rows


def save(fig: Figure, path) -> str:
  """Writes `fig` as PNG to `path` atomically; on any failure no file (partial or temp) stays."""
  return save_figure_atomic(fig, path, dpi=DPI, bbox_inches="tight")


def legend_handles(ax):
  """(handles, labels) of `ax`'s legend entries, drawn as the figure draws them.

  A curve's handle is its line without markers: a marker in the middle of a short handle hides
  the gaps of a dashed line, so an untrained (dashed) curve looked solid in the legend. Marker-
  only entries (e.g. the per-head dots) keep their marker.
  """
  handles, labels = ax.get_legend_handles_labels()
  drawn = []
  for handle in handles:
    if isinstance(handle, Line2D) and handle.get_linestyle() not in ("None", "", " "):
      handle = Line2D([], [], color=handle.get_color(), linestyle=handle.get_linestyle(),
                      linewidth=handle.get_linewidth(), alpha=handle.get_alpha())
    drawn.append(handle)
  return drawn, labels


def add_legend(ax, **kwargs):
  """`ax.legend` with `legend_handles` and handles long enough to show a dashed line."""
  handles, labels = legend_handles(ax)
  return ax.legend(handles, labels, handlelength=HANDLE_LENGTH, **kwargs)


def finish_axes(ax, xlabel: str, ylabel: str, title: str, legend: bool = True):
  """Labels, title, grid and (outside the axes, on the right) the legend of a curve panel."""
  ax.set_xlabel(xlabel, fontsize=11)
  ax.set_ylabel(ylabel, fontsize=11)
  ax.set_title(title, fontsize=12)
  ax.tick_params(labelsize=9)
  ax.grid(alpha=0.25, linewidth=0.6)
  ax.spines[["top", "right"]].set_visible(False)
  if legend:
    # Outside the axes: with several models an inside legend always hides some curve.
    add_legend(ax, fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def interval_band(results: dict, name: str, key: str, length: int):
  """(low, high) arrays of model `name`'s bootstrap interval of curve `key`
  (results["intervals"], `clmim.analysis.bootstrap`), or None when the run has none."""
  entry = ((results.get("intervals") or {}).get("models") or {}).get(name, {}).get(key)
  if not entry or len(entry["low"]) != length:
    return None
  return (np.asarray(entry["low"], np.float64), np.asarray(entry["high"], np.float64))


def curve_figure(results: dict, result) -> Figure:
  """One `core.Result`'s depth curve for every model that has it: `result.series(values)`
  against depth (blocks 1..L, or stages 0..L with 0 = the embedding), one line per model, small
  dots for the heads of "[block][head]" results (a legend entry says so: the line is the
  result's series, e.g. the mean over heads), a shaded band for the bootstrap interval where
  the run has one, the reference (if any) dotted."""
  from clmim.analysis import core
  key = result.key
  names = models_with(results, key)
  if not names:
    raise ClmimError(f"results has no model with values for {key!r}: nothing to plot.")
  styles = model_styles(results, names)
  fig = Figure(figsize=(5.2, 3.8))
  ax = fig.add_subplot()
  first = 0 if result.x == "stage" else 1
  dots = banded = False
  for name in names:
    style = styles[name]
    values = results["models"][name][key]
    try:
      curve = np.asarray(result.series(values), np.float64)
    except (TypeError, ValueError, IndexError) as e:
      raise ClmimError(f"results['models'][{name!r}][{key!r}]: not the layout "
                       f"{result.layout} ({e}).") from e
    depth = np.arange(first, first + len(curve))
    if result.layout.endswith("[head]"):
      for x, heads in zip(depth, _per_layer(results, name, key)):
        if heads.size > 1:
          ax.scatter(np.full(heads.size, x), heads, s=7, color=style["color"], alpha=0.3,
                     linewidths=0, zorder=1)
          dots = True
    ax.plot(depth, curve, marker="o", markersize=3.5, linewidth=1.8, zorder=2,
            color=style["color"], linestyle=style["linestyle"], label=style["label"])
    band = interval_band(results, name, key, len(curve))
    if band is not None:
      ax.fill_between(depth, band[0], band[1], color=style["color"], alpha=0.18, linewidth=0,
                      zorder=1)
      banded = True
  if banded:
    ax.fill_between([], [], [], color="0.45", alpha=0.3, linewidth=0,
                    label=f"{results['intervals']['coverage']:.0%} interval over images")
  if dots:
    # The dots say nothing without a word: one legend entry names them (the line is the mean).
    ax.plot([], [], linestyle="None", marker="o", markersize=3, color="0.45", alpha=0.6,
            label=HEAD_DOTS_LABEL)
  reference = core.reference_value(result, results)
  if reference is not None:
    ax.axhline(reference, color="k", linestyle=":", linewidth=1.1,
               label=result.reference_label or "reference")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  finish_axes(ax, "Depth" + (" (0 = embedding)" if result.x == "stage" else ""), result.label,
               result.title or result.label)
  return fig


# ---------------------------------------------------------------- map figures


def thumbnail_factor(image_size: int, patch_size: int, width: Optional[int] = None) -> int:
  """The pooling factor of `thumbnails`: the smallest divisor of the patch size that divides
  the image's sides and brings them to at most MAX_THUMBNAIL pixels (a patch stays a whole
  number of pixels); 1 when no divisor does both."""
  width = image_size if width is None else width
  fits = [f for f in range(1, max(int(patch_size), 1) + 1)
          if patch_size % f == 0 and image_size % f == 0 and width % f == 0]
  small = [f for f in fits if max(image_size, width) // f <= MAX_THUMBNAIL]
  return small[0] if small else fits[-1]


def thumbnails(images, patch_size: int):
  """[B, H, W, C] -> [B, H/f, W/f, C], the mean of f x f pixel blocks (`thumbnail_factor`).

  Array methods only, so it runs on numpy arrays and inside jit on jax arrays alike.
  """
  b, h, w, c = images.shape
  f = thumbnail_factor(h, patch_size, w)
  return images.reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))


def stored_pixels(pixels) -> list:
  """Thumbnails as results.json keeps them: nested lists, two decimals of the normalised input
  (after un-normalising, at most 0.0025 off for a std of 0.5: below a display's 1/255)."""
  return np.round(np.asarray(pixels, np.float64), 2).tolist()


def _input_stats(results: dict, name: str):
  """(mean, std) the analysis normalised model `name`'s input with, or None when unknown: the
  run's config.data.mean/std, else the model's own preprocessing (as the evaluation data
  resolves them)."""
  from clmim.models.input_stats import resolve_stats
  info = (results.get("model_info") or {}).get(name)
  if not isinstance(info, dict):
    return None
  data = ((results.get("config") or {}).get("data") or {})
  own = info.get("preprocessing") or {}
  try:
    return tuple(np.asarray(resolve_stats(
        data.get(field) or own.get(field, "imagenet"), field, "config.data"), np.float64)
                 for field in ("mean", "std"))
  except ClmimError:
    return None


def display_images(pixels, results: dict, name: str) -> np.ndarray:
  """Model `name`'s normalised input thumbnails [B, h, w, 3] as RGB in [0, 1] for display.

  Undoes the normalisation recorded for the model; without a record, each image is stretched
  to [0, 1] (the colours are then only approximate).
  """
  pixels = np.asarray(pixels, np.float64)
  stats = _input_stats(results, name)
  if stats is not None:
    return np.clip(pixels * stats[1] + stats[0], 0, 1)
  low = pixels.min(axis=(1, 2, 3), keepdims=True)
  span = pixels.max(axis=(1, 2, 3), keepdims=True) - low
  return (pixels - low) / np.where(span > 0, span, 1)


def map_scale(arrays) -> float:
  """The top of a figure's one colour scale (its bottom is 0): the largest finite value of any
  map drawn. One scale for every panel, so that a near-uniform map looks flat beside a
  focused one instead of being stretched to the full colour range."""
  top = max((float(np.nanmax(a)) for a in arrays if np.size(a) and np.isfinite(a).any()),
            default=1.0)
  return top if top > 0 else 1.0


def map_norm(top: float):
  """The one colour scale of a map figure: 0 .. `top` on a square-root scale (PowerNorm 0.5),
  so that one very focused map does not turn every other map black; the colourbar shows it."""
  from matplotlib.colors import PowerNorm
  return PowerNorm(MAP_GAMMA, vmin=0.0, vmax=top)


def map_colourbar(figure: Figure, image, axes, label: str, uniform: Optional[float] = None):
  """A colourbar for the shared scale of `image` beside `axes`, labelled with its quantity;
  `uniform` (attention spread evenly over N patches, 1/N) is marked by a line and a tick."""
  bar = figure.colorbar(image, ax=axes, shrink=0.9, aspect=30, pad=0.02)
  gamma = getattr(image.norm, "gamma", 1.0)
  bar.set_label(label + (", square-root scale" if gamma == 0.5 else ""), fontsize=8)
  bar.ax.tick_params(labelsize=7)
  low, high = image.norm.vmin, image.norm.vmax
  if uniform is not None and low <= uniform <= high:
    bar.ax.axhline(uniform, color="cyan", linewidth=1.2)
    bar.ax.set_yticks([uniform], [f"uniform 1/N = {uniform:.3g}"], minor=True)
    bar.ax.tick_params(which="minor", labelsize=7, colors="teal", length=4)
  return bar


def analysis_figures(results: dict, module, options: dict) -> Dict[str, Figure]:
  """{file name: Figure} of one analysis module: one depth-curve figure per Result that has a
  series over blocks or stages and values in `results` ("<key>.png"), plus the module's own
  `figures`, which replace a curve figure of the same name (e.g. fourier.png's two panels)."""
  out = {f"{r.key}.png": curve_figure(results, r) for r in module.RESULTS
         if r.series is not None and r.x in ("block", "stage") and models_with(results, r.key)}
  if hasattr(module, "figures"):
    out.update(module.figures(results, options))
  return out


def write_figures(results: dict, modules, options: dict, workdir) -> List[str]:
  """Writes the figures of every analysis module into `workdir`; returns the paths written.

  `options` is {analysis name: options}. File names must be unique across analyses.
  """
  written = []
  for module in modules:
    for name, fig in analysis_figures(results, module, options.get(module.NAME, {})).items():
      path = os.path.join(os.fspath(workdir), name)
      if path in written:
        raise ClmimError(f"two analyses both draw {name}; figure names must be unique.")
      written.append(save(fig, path))
  return written
