"""Attention maps of one query patch, as in the paper's attention figures.

`query_attention_map` follows docs/definitions.md: drop the cls row and column, renormalise the
rows, take row y*g + x and reshape it to g x g. `plot_query_attention` draws, for a few images,
each model's map next to the image with the query patch marked at patch size: the mean over heads
(default), one head (the official notebook shows head 0) or every head in its own column.
"""
from __future__ import annotations


import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from clmim.analysis.common import grid_side
from clmim.atomic import save_figure_atomic
from clmim.errors import ClmimError


def query_attention_map(attn, x: int, y: int) -> np.ndarray:
  """[B, heads, N+1, N+1] attention -> [B, heads, g, g] map of query patch (column x, row y)."""
  attn = np.asarray(attn, np.float64)[:, :, 1:, 1:]
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
                           title: str = "", heads="mean") -> Figure:
  """The figure `plot_query_attention` saves: one row per image, the image then `panels`."""
  columns = panels(maps, heads)
  batch, width = len(images), 1 + len(columns)
  figure = Figure(figsize=(2.2 * width, 2.2 * batch + 0.4), dpi=150)
  for row in range(batch):
    axis = figure.add_subplot(batch, width, row * width + 1)
    axis.imshow(np.clip(images[row], 0, 1), interpolation="nearest")
    # The query outlined at its true size and place in pixels, not a fixed-size marker.
    axis.add_patch(Rectangle((x * patch_size - 0.5, y * patch_size - 0.5), patch_size, patch_size,
                             fill=False, edgecolor="red", linewidth=1.5))
    axis.set_axis_off()
    for column, (name, values) in enumerate(columns):
      axis = figure.add_subplot(batch, width, row * width + column + 2)
      axis.imshow(values[row], cmap="inferno", interpolation="nearest")
      axis.plot([x], [y], marker="s", color="cyan", markersize=3)
      axis.set_axis_off()
      if row == 0:
        axis.set_title(name, fontsize=8)
  if title:
    figure.suptitle(title, fontsize=9)
  figure.tight_layout()
  return figure


def plot_query_attention(images, maps: dict, x: int, y: int, patch_size: int, path: str,
                         title: str = "", heads="mean") -> str:
  """images [B, H, W, 3] in [0, 1]; maps {model name: [B, heads, g, g]}. Writes `path`.

  `heads`: "mean" (default), an int head index or "all"; see `panels`.
  """
  save_figure_atomic(query_attention_figure(images, maps, x, y, patch_size, title, heads), path)
  return path
