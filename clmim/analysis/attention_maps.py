"""Attention maps of chosen query patches, as in the paper's attention figures; an analysis.

`query_attention_map` follows docs/definitions.md: keep the patch queries over the patch keys
(the cls and register rows and columns dropped, as the token layout says), renormalise the rows
over the N patch keys, take row y*g + x and reshape it to g x g. Patch tokens only: the maps
and `query_map_similarity` are the same on every token layout (with or without cls, with or
without registers). `plot_query_attention` draws, for a few images,
each model's map next to the image with the query patch marked at patch size: the mean over heads
(default), one head (the official notebook shows head 0) or every head in its own column.

As an analysis (docs/analyses/attention_maps.md), options config.analysis_options.
attention_maps.<option>:
  images: stream positions of the images whose maps are kept ((0, 1, 2, 3)).
  queries: "centre_corner" (patches (g//2, g//2) and (1, 1) of the g x g grid; (0, 0) for the
    corner when g <= 3) or a tuple of at least two distinct (x, y) patch positions (x = column,
    y = row, 0-based).
  blocks: "last" or a tuple of 1-based block numbers whose maps are kept.
  heads: what the figures draw, as `panels` accepts: an int head index (default 0, the head of
    the official figure), "mean" (the mean over heads) or "all" (every head in its column).
Results: "attention_maps" {"images", "queries", "blocks",
"maps": [image][query][block][head][g][g], "pixels": [image][row][col][3]} (the chosen images,
picked on device by stream position: exact, whatever the batching; "pixels" is their
normalised model input pooled to at most 32 px a side, `plots.thumbnails`, two decimals;
absent when the stream gives no pixels), and "query_map_similarity" [block]: the cosine
similarity between the maps of two different chosen queries, averaged over query pairs, heads
and all images (CL ~1, MIM lower).
The figures draw, per query, the input (query outlined at patch size) and every model's map on
one shared colour scale with a colourbar marking uniform attention 1/N; the notebook draws maps
next to its own pictures with `plot_query_attention`.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from clmim.analysis import core, plots
from clmim.analysis.common import grid_side, weighted_sum
from clmim.atomic import save_figure_atomic
from clmim.errors import ClmimError


def query_attention_map(attn, x: int, y: int, layout=core.TokenLayout()) -> np.ndarray:
  """[B, heads, T, T] attention (tokens laid out as `layout` says; default: the paper's, cls then
  the N patches) -> [B, heads, g, g] map of query patch (column x, row y)."""
  attn = layout.patch_attention(np.asarray(attn, np.float64))
  grid = grid_side(attn.shape[-1], "attention maps")
  if not (0 <= x < grid and 0 <= y < grid):
    raise ClmimError(f"query patch ({x}, {y}) is outside the {grid}x{grid} grid.")
  rows = attn[:, :, y * grid + x, :]
  rows = rows / rows.sum(-1, keepdims=True)
  return rows.reshape(*rows.shape[:2], grid, grid)


def _head_index(heads, num_heads: int, name: str) -> int:
  """Validates an int `heads` against a model with `num_heads` heads."""
  # bool is an int subclass; True would silently mean head 1.
  if isinstance(heads, bool) or not isinstance(heads, (int, np.integer)):
    raise ClmimError(f"heads={heads!r}: expected 'mean', 'all' or an int head index.")
  if not 0 <= heads < num_heads:
    raise ClmimError(f"heads={heads!r}: model {name!r} has {num_heads} heads; expected 'mean', "
                     f"'all' or an int head index 0..{num_heads - 1}.")
  return int(heads)


def panels(maps: dict, heads="mean") -> list:
  """The map columns to draw: [(column title, [B, g, g] array)], in model order.

  Args:
    maps: {model name: [B, heads, g, g]} as returned by `query_attention_map`.
    heads: "mean" (average over heads, one column per model), an int head index (that head, one
      column per model) or "all" (one column per head per model, titled with the head number).
  """
  if isinstance(heads, str) and heads not in ("mean", "all"):
    raise ClmimError(f"heads={heads!r}: expected 'mean', 'all' or an int head index.")
  columns = []
  for name, values in maps.items():
    values = np.asarray(values)
    if values.ndim != 4:
      raise ClmimError(f"maps[{name!r}]: expected [images, heads, g, g], got shape "
                       f"{values.shape}.")
    if isinstance(heads, str) and heads == "mean":
      columns.append((name, values.mean(1)))
    elif isinstance(heads, str):  # "all"
      columns += [(f"{name}, head {h}", values[:, h]) for h in range(values.shape[1])]
    else:
      h = _head_index(heads, values.shape[1], name)
      columns.append((f"{name}, head {h}", values[:, h]))
  return columns


def query_attention_figure(images, maps: dict, x: int, y: int, patch_size: int,
                           title: str = "", heads="mean", vmax: Optional[float] = None) -> Figure:
  """The figure `plot_query_attention` saves: one row per image, the image then `panels`.

  Every map shares one colour scale, 0 .. `vmax` (default: the largest value drawn), with a
  colourbar of the attention probability on which uniform attention 1/N is marked: a
  near-uniform map then looks flat, not stretched to full contrast. `images` may be None: then
  only the maps are drawn (one row per map row); the query is outlined on the image at patch
  size (in pixels of `images`) and on every map's own cell.
  """
  columns = panels(maps, heads)
  batch = len(images) if images is not None else len(columns[0][1]) if columns else 0
  first = 0 if images is None else 1
  width = first + len(columns)
  if not batch or not width:
    raise ClmimError("query attention figure: no maps to draw (maps is empty).")
  top = plots.map_scale([values for _, values in columns]) if vmax is None else float(vmax)
  scale = plots.map_norm(top)  # one norm object: every panel on the same colour scale
  figure = Figure(figsize=(2.2 * width + 1.2, 2.2 * batch + 0.5), dpi=150, layout="constrained")
  grid = figure.subplots(batch, width, squeeze=False)
  drawn = None
  for row in range(batch):
    if images is not None:
      axis = grid[row, 0]
      axis.imshow(np.clip(images[row], 0, 1), interpolation="nearest")
      # The query outlined at its true size and place in pixels, not a fixed-size marker.
      axis.add_patch(Rectangle((x * patch_size - 0.5, y * patch_size - 0.5), patch_size,
                               patch_size, fill=False, edgecolor="red", linewidth=1.5))
      axis.set_axis_off()
      if row == 0:
        axis.set_title("input, query outlined", fontsize=8)
    for column, (name, values) in enumerate(columns):
      axis = grid[row, column + first]
      drawn = axis.imshow(values[row], cmap=plots.MAP_CMAP, norm=scale,
                          interpolation="nearest")
      # One map cell is one patch: the outline is the query at its true place and size.
      axis.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="cyan",
                               linewidth=1.2))
      axis.set_axis_off()
      if row == 0:
        axis.set_title(name, fontsize=8)
  if drawn is not None:
    cells = np.asarray(columns[0][1]).shape[-2:]
    plots.map_colourbar(figure, drawn, grid.ravel().tolist(),
                        "attention probability (query → patch)",
                        uniform=1.0 / (cells[0] * cells[1]))
  if title:
    figure.suptitle(title, fontsize=9)
  return figure


def plot_query_attention(images, maps: dict, x: int, y: int, patch_size: int, path: str,
                         title: str = "", heads="mean", vmax: Optional[float] = None) -> str:
  """images [B, H, W, 3] in [0, 1]; maps {model name: [B, heads, g, g]}. Writes `path`.

  `heads`: "mean" (default), an int head index or "all"; see `panels`. `vmax`: the top of the
  shared colour scale (default: the largest value drawn); give several figures the same one to
  compare them.
  """
  figure = query_attention_figure(images, maps, x, y, patch_size, title, heads, vmax=vmax)
  save_figure_atomic(figure, path)
  return path


# ---------------------------------------------------------------- the analysis module

NAME = "attention_maps"
# The chosen images' maps are not resampled by the bootstrap (clmim.analysis.bootstrap).
FIXED_SUMS = ("maps", "found", "pixels")
OPTIONS = {"images": (0, 1, 2, 3), "queries": "centre_corner", "blocks": "last", "heads": 0}


def _as_list(values):
  return list(values)


RESULTS = (
    core.Result(key="attention_maps", label="attention of a query patch",
                layout="{images, queries, blocks, maps: [image][query][block][head][g][g], "
                       "pixels: [image][row][col][3]}",
                x=None, series=None, description="maps of the chosen queries and images"),
    core.Result(key="query_map_similarity", label="cosine similarity of two queries' maps",
                # No reference line: uniform attention scores 1, exactly like a full collapse.
                layout="[block]", series=_as_list, cl_direction="higher",
                title="Do different queries attend alike?",
                description="mean cosine similarity between the maps of different query patches"),
)


def _bad(option, expected, value):
  return ClmimError(f"config.analysis_options.{NAME}.{option}: expected {expected}, got "
                    f"{value!r}.")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _distinct_ints(option, value, low, high, expected, wrap=False):
  """A non-empty tuple of distinct ints in [low, high] (an int alone if `wrap`) or an error."""
  items = (value,) if wrap and _is_int(value) else value
  if (not isinstance(items, (tuple, list)) or not items or len(set(items)) != len(items)
      or not all(_is_int(i) and low <= i <= high for i in items)):
    raise _bad(option, expected, value)
  return tuple(int(i) for i in items)


def _images(options) -> tuple:
  return _distinct_ints("images", options["images"], 0, np.inf,
                        "a non-empty tuple of distinct stream positions >= 0", wrap=True)


def _queries(options, g: int) -> tuple:
  """((x, y), ...) of option `queries` on a g x g grid."""
  value = options["queries"]
  if isinstance(value, str) and value == "centre_corner":
    # On grids of 3 or fewer patches (1, 1) is the centre: the corner query is (0, 0) there.
    corner = (1, 1) if g >= 4 else (0, 0)
    value = ((g // 2, g // 2), corner)
  expected = (f"'centre_corner' or a tuple of at least two distinct (x, y) patch positions "
              f"with 0 <= x, y < {g}")
  if not isinstance(value, (tuple, list)) or len(value) < 2 or not all(
      isinstance(q, (tuple, list)) and len(q) == 2 and all(_is_int(c) and 0 <= c < g for c in q)
      for q in value):
    raise _bad("queries", expected, options["queries"])
  queries = tuple((int(x), int(y)) for x, y in value)
  if len(set(queries)) != len(queries):
    raise _bad("queries", expected, options["queries"])
  return queries


def _blocks(options, depth: int) -> tuple:
  """1-based block numbers of option `blocks` for a depth-`depth` model."""
  if isinstance(options["blocks"], str) and options["blocks"] == "last":
    return (depth,)
  return _distinct_ints("blocks", options["blocks"], 1, depth,
                        f"'last' or a tuple of distinct block numbers 1..{depth}", wrap=True)


def _heads(options, num_heads: int):
  value = options["heads"]
  if isinstance(value, str) and value in ("mean", "all"):
    return value
  if not _is_int(value) or not 0 <= value < num_heads:
    raise _bad("heads", f"'mean', 'all' or a head index 0..{num_heads - 1}", value)
  return int(value)


def check(model, options: dict) -> None:
  """Rejects bad options before any compute (queries, blocks and heads must exist in `vit`)."""
  vit = getattr(model, "vit", model)  # the registry Model, or a bare ViT
  _images(options)
  _queries(options, vit.image_size // vit.patch_size)
  _blocks(options, vit.depth)
  _heads(options, vit.num_heads)


def query_similarity(rows):
  """[B, H, Q, N] query rows -> [B]: cosine similarity of every pair of different queries,
  averaged over pairs and heads (an all-zero row counts as similarity 0)."""
  norm = jnp.sqrt(jnp.sum(rows * rows, axis=-1, keepdims=True))
  unit = rows / jnp.where(norm > 0, norm, 1)
  q = rows.shape[2]
  # Elementwise multiply-reduce, not einsum: GPUs run batched matmuls in reduced precision.
  pairs = [jnp.sum(unit[:, :, i] * unit[:, :, j], axis=-1) for i in range(q)
           for j in range(i + 1, q)]
  return jnp.mean(jnp.stack(pairs), axis=(0, 2))


def partial_sums(batch: core.Batch, options: dict):
  """Per-device sums: the query similarity of every block over all images, and the chosen
  images' renormalised query rows of the chosen blocks, picked by stream position."""
  attns, weights, index, layout = batch.attns, batch.weights, batch.index, batch.layout
  g = grid_side(layout.num_patches(attns[0].shape[-1]), "attention_maps: attention maps")
  images, queries = _images(options), _queries(options, g)
  blocks = _blocks(options, len(attns))
  _heads(options, attns[0].shape[1])
  # Query patch (x, y) is token prefix + y*g + x; its row over the patch keys only.
  rows_at = np.array([layout.prefix + y * g + x for x, y in queries])
  rows = [attn[:, :, rows_at, layout.prefix:].astype(jnp.float32)
          for attn in attns]  # [B, H, Q, N]
  # Cosines ignore each row's scale: the mass on cls and registers need not be renormalised away.
  sims = [weighted_sum(query_similarity(r), weights) for r in rows]
  # Definition of the map: the cls and register columns dropped, the row renormalised, no
  # epsilon.
  kept = jnp.stack([rows[b - 1] / jnp.sum(rows[b - 1], -1, keepdims=True) for b in blocks], 1)
  picked = [(index == c)[:, None, None, None, None] for c in images]
  # A where-sum, so the other images (and padding) add exact zeros, never NaN * 0.
  maps = jnp.stack([jnp.sum(jnp.where(p, kept, 0), axis=0) for p in picked])
  found = jnp.stack([jnp.sum(p[:, 0, 0, 0, 0].astype(jnp.float32)) for p in picked])
  out = {"similarity_sum": jnp.stack(sims), "maps": maps, "found": found}
  if batch.images is not None:  # the chosen inputs, pooled, for the figures' image column
    small = plots.thumbnails(batch.images.astype(jnp.float32), batch.patch_size)
    out["pixels"] = jnp.stack([jnp.sum(jnp.where(p[:, :, :, :, 0], small, 0), axis=0)
                               for p in picked])
  return out


def finalize(sums: dict, options: dict):
  """{"attention_maps": {...}, "query_map_similarity": [block]} (see the module doc)."""
  count = float(sums["count"])
  if count <= 0:
    raise ClmimError("attention_maps: no images were analysed (total weight is 0).")
  images = _images(options)
  missing = [i for i, f in zip(images, np.asarray(sums["found"])) if f != 1]
  if missing:
    raise _bad("images", f"stream positions of the {int(count)} images analysed", missing[0])
  maps = np.asarray(sums["maps"], np.float64)  # [image, block, head, query, N]
  g = grid_side(maps.shape[-1], "attention_maps: attention maps")
  similarity = np.asarray(sums["similarity_sum"], np.float64) / count
  maps = maps.transpose(0, 3, 1, 2, 4)  # [image, query, block, head, N]
  maps = maps.reshape(maps.shape[:-1] + (g, g))
  entry = {"images": list(images), "queries": [list(q) for q in _queries(options, g)],
           "blocks": list(_blocks(options, len(similarity))), "maps": maps.tolist()}
  if "pixels" in sums:
    entry["pixels"] = plots.stored_pixels(sums["pixels"])
  return {"attention_maps": entry, "query_map_similarity": similarity.tolist()}


def figures(results: dict, options: dict) -> dict:
  """attention_maps_x<x>y<y>[_block<b>].png per query (and block, if several): every model's
  maps side by side, one row per chosen image; and query_map_similarity.png."""
  options = {**OPTIONS, **options}
  groups, images, inputs = {}, [], None  # (x, y, block) -> {model: [images, heads, g, g]}
  for name, values in (results.get("models") or {}).items():
    entry = values.get("attention_maps") if isinstance(values, dict) else None
    if not entry:
      continue
    images = entry["images"]  # the same for every model of a run: one option set
    maps = np.asarray(entry["maps"], np.float64)
    if inputs is None and entry.get("pixels"):
      inputs = plots.display_images(entry["pixels"], results, name)
    for qi, (x, y) in enumerate(entry["queries"]):
      for bi, block in enumerate(entry["blocks"]):
        groups.setdefault((x, y, block), {})[name] = maps[:, qi, bi]
  if not groups:
    return {}
  several = len({block for _, _, block in groups}) > 1
  out = {}
  for (x, y, block), by_model in groups.items():
    title = (f"Attention of query patch (x={x}, y={y}), block {block}; rows: images "
             f"{', '.join(str(i) for i in images)}")
    file = f"attention_maps_x{x}y{y}" + (f"_block{block}" if several else "") + ".png"
    # A thumbnail pools whole pixel blocks of a patch: a patch is a whole number of its pixels.
    patch = inputs.shape[1] // next(iter(by_model.values())).shape[-1] if inputs is not None \
        else 1
    out[file] = query_attention_figure(inputs, by_model, x, y, patch, title, options["heads"])
  out["query_map_similarity.png"] = plots.curve_figure(results, RESULTS[1])
  return out
