"""Attention rollout (Abnar & Zuidema 2020): where the cls token's information comes from.

Definitions (docs/analyses/rollout.md), per image, on the full [T, T] maps (cls, register
tokens and the N patches; T = N + 1 for the paper's models):
  Â_l = 0.5 · mean_heads(A_l) + 0.5 · I, rows renormalised;  R_0 = I;  R_l = Â_l R_{l−1}.
  r_l = row 0 (cls) of R_l without its cls and register entries (`Batch.layout`), renormalised
  over the N patches (a row with no patch mass counts as uniform).
  rollout_spread[block]  = p · Σ_k r_l[k] ‖pos_k − Σ_j r_l[j] pos_j‖   (pixels; pos in patches)
  rollout_entropy[block] = −Σ_k r_l[k] log r_l[k] / log N               (1 = uniform)
  rollout_map            = r_L as a g × g map for the images at the stream positions of the
                           option `images` (positions past the stream are skipped);
                           rollout_map_images lists the positions actually shown, and
                           rollout_map_pixels those images' normalised input pooled to at most
                           32 px a side (`plots.thumbnails`; [] without pixels).
Registers take part in the products (information can flow through them, as through any
token); only the final read-out drops them. A model without a cls token has no row to roll out:
every result is None for it (no refusal, so runs that mix such models with others still run).
Spread and entropy are averaged over images. They carry no CL/MIM direction: a uniform map (an
untrained cls) is already near the largest spread, and a CL cls focused on the object is
narrower than that (docs/analyses/rollout.md). rollout_map.png draws the inputs and every
model's maps on one colour scale, whose colourbar marks the uniform map 1/N.

Options:
  images: stream positions (0-based) of the images whose last-block map is kept
    (default (0, 1, 2, 3)).

Only the cls rows are needed: row 0 of Â_l ⋯ Â_1 is e_0ᵀ Â_l, then times Â_{l−1}, …, Â_1: l
vector-matrix products, L(L+1)/2 in all, each O(N²) — cheaper than L full O(N³) products for
every depth below N. The products are elementwise multiply-reduces, not einsums, because GPUs run
batched matmuls in reduced (TF32) precision by default.
"""
import math

import jax.numpy as jnp
from jax.scipy.special import xlogy
import numpy as np
from matplotlib.figure import Figure

from clmim.analysis import core, plots
from clmim.analysis.common import grid_side, weighted_sum
from clmim.errors import ClmimError

NAME = "rollout"
# The chosen images' maps are not resampled by the bootstrap (clmim.analysis.bootstrap).
FIXED_SUMS = ("map_sum", "map_count", "pixel_sum")
OPTIONS = {"images": (0, 1, 2, 3)}


def per_block_values(values) -> list:
  """[per block] -> the same floats (the depth curve of a metric without a head axis)."""
  return np.asarray(values, np.float64).reshape(-1).tolist()


def uniform_spread(grid: int, patch_size: int) -> float:
  """Spread (px) of the uniform map on a grid x grid lattice: mean distance to the centre."""
  centre = (grid - 1) / 2
  idx = np.arange(grid * grid)
  return float(patch_size * np.hypot(idx // grid - centre, idx % grid - centre).mean())


def _uniform_reference(results: dict):
  """The uniform map's spread for the run's models, when they all share one grid and patch."""
  values = set()
  for info in results.get("model_info", {}).values():
    image, patch = info.get("image_size"), info.get("patch_size")
    if not image or not patch:
      return None
    values.add(round(uniform_spread(image // patch, patch), 9))
  return values.pop() if len(values) == 1 else None


RESULTS = (
    core.Result(
        "rollout_spread", "rollout spread (px)", "[block]", x="block", series=per_block_values,
        reference=_uniform_reference, reference_label="uniform map",
        title="Attention rollout of cls: spatial spread",
        description="mean distance (px) of the cls token's rolled-out attention from its "
                    "centroid (large = cls gathers from the whole image)"),
    core.Result(
        "rollout_entropy", "rollout entropy / log N", "[block]", x="block",
        series=per_block_values, reference=1.0, reference_label="uniform map",
        title="Attention rollout of cls: entropy",
        description="normalised entropy of the cls token's rolled-out attention over patches "
                    "(1 = uniform)"),
    core.Result("rollout_map", "rollout map of cls", "[image][row][col]", x=None, series=None,
                description="the last block's rolled-out cls-to-patch map of a few images"),
    core.Result("rollout_map_images", "image position", "[image]", x=None, series=None,
                description="stream positions of the images in rollout_map"),
    core.Result("rollout_map_pixels", "input of the rollout map", "[image][row][col][3]",
                x=None, series=None,
                description="the images of rollout_map as the model saw them (normalised, "
                            "pooled to at most 32 px a side), for the figure's input column"),
)


def positions(options: dict) -> tuple:
  """The `images` option as a tuple of non-negative ints, or a ClmimError."""
  value = options.get("images", ())
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    value = (value,)
  try:
    chosen = tuple(value)
  except TypeError:
    chosen = None
  if chosen is None or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0
                           for i in chosen):
    raise ClmimError(f"config.analysis_options.rollout.images: expected image positions "
                     f"(non-negative ints), got {value!r}.")
  return tuple(int(i) for i in chosen)


def check(model, options: dict) -> None:
  """Validates the options before any compute."""
  del model
  positions(options)


def cls_rollout(attns):
  """depth maps [B, H, T, T] -> [depth, B, T]: row 0 (the cls token's) of R_l for l = 1 ..
  depth, every token included (registers too)."""
  t = attns[0].shape[-1]
  eye = jnp.eye(t, dtype=jnp.float32)
  hats = []
  for attn in attns:
    a = 0.5 * jnp.mean(attn.astype(jnp.float32), axis=1) + 0.5 * eye
    hats.append(a / jnp.sum(a, axis=-1, keepdims=True))
  rows = []
  for l in range(len(hats)):
    v = hats[l][:, 0, :]  # e_0ᵀ Â_l
    for m in range(l - 1, -1, -1):
      v = jnp.sum(v[:, :, None] * hats[m], axis=1)  # v Â_m
    rows.append(v)
  return jnp.stack(rows)


def patch_distribution(rows, layout=core.TokenLayout()):
  """[..., T] cls rows -> [..., N] over patches (cls and registers dropped, renormalised; 0 mass
  -> uniform). `layout`: where the tokens are (default: the paper's, cls then the patches)."""
  r = rows[..., layout.prefix:]
  s = jnp.sum(r, axis=-1, keepdims=True)
  return jnp.where(s > 0, r / jnp.where(s > 0, s, 1.0), 1.0 / r.shape[-1])


def spread_and_entropy(r, patch_size):
  """[..., N] distributions on a g × g grid -> (spread in pixels, entropy / log N)."""
  n = r.shape[-1]
  g = grid_side(n, "rollout: attention maps")
  rows = jnp.asarray(np.arange(n) // g, jnp.float32)
  cols = jnp.asarray(np.arange(n) % g, jnp.float32)
  cy = jnp.sum(r * rows, axis=-1, keepdims=True)
  cx = jnp.sum(r * cols, axis=-1, keepdims=True)
  dist = jnp.sqrt(jnp.square(rows - cy) + jnp.square(cols - cx))
  spread = patch_size * jnp.sum(r * dist, axis=-1)
  entropy = -jnp.sum(xlogy(r, r), axis=-1)
  entropy = entropy / math.log(n) if n > 1 else jnp.full_like(entropy, jnp.nan)
  return spread, entropy


def partial_sums(batch: core.Batch, options: dict) -> dict:
  """Per-device sums of spread and entropy per block, and the chosen images' last maps.

  Returns:
    {"spread_sum": [blocks], "entropy_sum": [blocks], "map_sum": [chosen, g, g],
     "map_count": [chosen]}; nothing for a model without a cls token.
  """
  chosen = positions(options)
  if not batch.layout.has_cls:  # no cls row to roll out: finalize reports None
    return {}
  r = patch_distribution(cls_rollout(batch.attns), batch.layout)  # [depth, B, N]
  spread, entropy = spread_and_entropy(r, batch.patch_size)
  spread_sum = jnp.stack([weighted_sum(s, batch.weights) for s in spread])
  entropy_sum = jnp.stack([weighted_sum(e, batch.weights) for e in entropy])
  n = r.shape[-1]
  g = grid_side(n, "rollout: attention maps")
  # Each chosen position matches one image of the whole stream, once: the sums are its map.
  sel = jnp.asarray(np.asarray(chosen, np.int32).reshape(-1))
  match = (batch.index[:, None] == sel[None, :]) & (batch.weights[:, None] > 0)  # [B, chosen]
  last = r[-1].reshape(-1, 1, g, g)
  map_sum = jnp.sum(jnp.where(match[:, :, None, None], last, 0.0), axis=0)
  map_count = jnp.sum(match.astype(jnp.float32), axis=0)
  out = {"spread_sum": spread_sum, "entropy_sum": entropy_sum, "map_sum": map_sum,
         "map_count": map_count}
  if batch.images is not None:  # the chosen inputs, pooled, for the figure's input column
    small = plots.thumbnails(batch.images.astype(jnp.float32), batch.patch_size)[:, None]
    out["pixel_sum"] = jnp.sum(jnp.where(match[:, :, None, None, None], small, 0.0), axis=0)
  return out


def finalize(sums: dict, options: dict) -> dict:
  """Means over images; the maps of the chosen positions that were in the stream (every key
  None for a model without a cls token)."""
  count = float(sums["count"])
  if count <= 0:
    raise ClmimError("rollout: no images were analysed (total weight is 0).")
  if "spread_sum" not in sums:  # a model without a cls token (see partial_sums)
    return {r.key: None for r in RESULTS}
  chosen = positions(options)
  map_sum = np.asarray(sums["map_sum"], np.float64)
  map_count = np.asarray(sums["map_count"], np.float64).reshape(-1)
  kept = [i for i in range(len(chosen)) if map_count[i] > 0]
  pixels = np.asarray(sums["pixel_sum"], np.float64) if "pixel_sum" in sums else None
  return {
      "rollout_spread": (np.asarray(sums["spread_sum"], np.float64) / count).tolist(),
      "rollout_entropy": (np.asarray(sums["entropy_sum"], np.float64) / count).tolist(),
      "rollout_map": [(map_sum[i] / map_count[i]).tolist() for i in kept],
      "rollout_map_images": [chosen[i] for i in kept],
      "rollout_map_pixels": [] if pixels is None else [
          plots.stored_pixels(pixels[i] / map_count[i]) for i in kept],
  }


def figures(results: dict, options: dict) -> dict:
  """"rollout_map.png": images (rows) × the input, then each model (columns), of the last
  block's cls rollout on one shared colour scale with a colourbar marking the uniform map 1/N
  (the spread and entropy depth curves are the shared curve figures)."""
  del options
  models = results.get("models", {}) or {}
  names = [n for n, v in models.items() if isinstance(v, dict) and v.get("rollout_map")]
  if not names:
    return {}
  maps = {n: np.asarray(models[n]["rollout_map"], np.float64) for n in names}
  with_pixels = [n for n in names if models[n].get("rollout_map_pixels")]
  inputs = (plots.display_images(models[with_pixels[0]]["rollout_map_pixels"], results,
                                 with_pixels[0]) if with_pixels else None)
  first = 0 if inputs is None else 1
  rows = max(len(m) for m in maps.values())
  width = first + len(names)
  styles = plots.model_styles(results, names)
  scale = plots.map_norm(plots.map_scale(list(maps.values())))  # one scale for every panel
  figure = Figure(figsize=(2.0 * width + 1.2, 2.0 * rows + 0.5), dpi=plots.DPI,
                  layout="constrained")
  drawn, axes = None, []
  if inputs is not None:
    shown = models[with_pixels[0]].get("rollout_map_images") or list(range(len(inputs)))
    for row, picture in enumerate(inputs):
      axis = figure.add_subplot(rows, width, row * width + 1)
      axis.imshow(picture, interpolation="nearest")
      axis.set_xticks([])
      axis.set_yticks([])
      axes.append(axis)
      if row == 0:
        axis.set_title("input", fontsize=8)
      if row < len(shown):
        axis.set_ylabel(f"image {shown[row]}", fontsize=8)
  for column, name in enumerate(names):
    shown = models[name].get("rollout_map_images") or list(range(len(maps[name])))
    for row, values in enumerate(maps[name]):
      axis = figure.add_subplot(rows, width, row * width + column + first + 1)
      drawn = axis.imshow(values, cmap=plots.MAP_CMAP, norm=scale,
                          interpolation="nearest")
      axis.set_xticks([])
      axis.set_yticks([])
      axes.append(axis)
      if row == 0:
        # The family colour ties the column to the model's curves in the other figures.
        axis.set_title(styles[name]["label"], fontsize=8, color=styles[name]["color"])
      if row < len(shown) and column + first == 0:
        axis.set_ylabel(f"image {shown[row]}", fontsize=8)
  plots.map_colourbar(figure, drawn, axes, "share of cls's rolled-out attention",
                      uniform=1.0 / drawn.get_array().size)
  figure.suptitle("Attention rollout of cls, last block", fontsize=10)
  return {"rollout_map.png": figure}
