"""Attention maps of one query patch, as in the paper's attention figures.

`query_attention_map` follows paper.md: drop the cls row and column, renormalise the rows, take
row y*g + x and reshape it to g x g. `plot_query_attention` draws, for a few images, each model's
map (mean over heads) next to the image with the query patch marked at patch size.
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


def plot_query_attention(images, maps: dict, x: int, y: int, patch_size: int, path: str,
                         title: str = "") -> str:
  """images [B, H, W, 3] in [0, 1]; maps {model name: [B, heads, g, g]}. Writes `path`."""
  batch = len(images)
  columns = 1 + len(maps)
  figure = Figure(figsize=(2.2 * columns, 2.2 * batch + 0.4), dpi=150)
  for row in range(batch):
    axis = figure.add_subplot(batch, columns, row * columns + 1)
    axis.imshow(np.clip(images[row], 0, 1), interpolation="nearest")
    axis.add_patch(Rectangle((x * patch_size - 0.5, y * patch_size - 0.5), patch_size, patch_size,
                             fill=False, edgecolor="red", linewidth=1.5))
    axis.set_axis_off()
    for column, (name, values) in enumerate(maps.items()):
      axis = figure.add_subplot(batch, columns, row * columns + column + 2)
      axis.imshow(values[row].mean(0), cmap="inferno", interpolation="nearest")
      axis.plot([x], [y], marker="s", color="cyan", markersize=3)
      axis.set_axis_off()
      if row == 0:
        axis.set_title(name, fontsize=8)
  if title:
    figure.suptitle(title, fontsize=9)
  figure.tight_layout()
  save_figure_atomic(figure, path)
  return path
