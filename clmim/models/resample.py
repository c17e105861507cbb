"""Resampling a position-embedding table of patch tokens to another grid, in numpy.

Loading a checkpoint at an image size (or patch size) other than the one it was trained at
needs its absolute position table resized to the new grid. The libraries the checkpoints come
from do it with torch's `interpolate(mode="bicubic", align_corners=False)` on the table laid out
as an image [1, D, g, g], but not all the same way: Hugging Face transformers' ViTs
(`interpolate_pos_encoding`) call it without antialiasing, timm's `resample_abs_pos_embed` with
`antialias=True`. To reproduce either library's table (to float32 round-off; exactly in float64)
`resample_grid` implements both from their definitions, with no torch dependency:

- antialias=False: cubic convolution (Keys, A = -0.75), four taps around the source
  coordinate s = (i + 0.5) * in / out - 0.5, taps clamped to the border (edge replication).
- antialias=True: the PIL-style filter (cubic with a = -0.5) stretched by the scale when
  shrinking, so every input pixel under the output pixel's footprint counts; weights cut at the
  border and renormalised to sum to 1. When enlarging it is still a = -0.5, not -0.75, so the two
  modes differ even when upsampling.

torch (2.13, CPU) gets one case wrong: an antialiased resize to an output width of 1 (with the
height changing) repeats the first output row down the column (bilinear too). This function
returns the correct filter there; no ViT grid is one patch wide.

Both are separable: each axis is a dense [out, in] matrix (built in float64), applied as
W_rows @ T @ W_cols^T per channel.
"""
import math

import numpy as np

from clmim.errors import ClmimError


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter `a` (support [-2, 2])."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _weights(size_in: int, size_out: int, antialias: bool, offset: float = 0.0) -> np.ndarray:
  """The [size_out, size_in] float64 weight matrix resampling one axis."""
  if size_in == size_out:
    return np.eye(size_in)  # both modes reduce to the identity (a cubic is 1 at 0, 0 at +-1, +-2)
  scale = size_in / (size_out + offset)
  w = np.zeros((size_out, size_in), np.float64)
  for i in range(size_out):
    if antialias:
      support = 2.0 * max(scale, 1.0)
      center = scale * (i + 0.5)
      # int() truncates toward zero, as C's cast does; max/min then clip to the image.
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), size_in)
      j = np.arange(lo, hi)
      taps = _cubic((j - center + 0.5) / max(scale, 1.0), -0.5)
      w[i, lo:hi] = taps / taps.sum()
    else:
      s = (i + 0.5) * scale - 0.5
      x0 = math.floor(s)
      t = s - x0
      taps = _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)
      for k, tap in enumerate(taps):
        w[i, min(max(x0 - 1 + k, 0), size_in - 1)] += tap
  return w


def resample_grid(table: np.ndarray, to_grid: "tuple[int, int] | int",
                  antialias: bool = False, offset: float = 0.0) -> np.ndarray:
  """Resamples a [g*g, D] table of patch-token rows (row-major grid) to [h*w, D] float32.

  Matches `torch.nn.functional.interpolate(t, size=(h, w), mode="bicubic",
  align_corners=False, antialias=antialias)` on the table as [1, D, g, g]: antialias=False as
  Hugging Face transformers resamples ViT position embeddings, antialias=True as timm does.
  `offset` > 0 reproduces a call with `scale_factor=((h + offset) / g, (w + offset) / g)` instead
  of `size` (the output size is the same, the source coordinates are stretched by the offset):
  the official DINOv2 code resamples this way, with offset 0.1, to avoid a floating-point
  rounding of the output size. A grid that does not change is returned as it is (DINOv2 skips the
  call then). `to_grid` is (h, w) or one int for a square grid. Prefix (cls / register) rows are not part of
  the grid: split them off first. Raises ClmimError when the rows do not form a square grid or a
  target side is < 1.
  """
  table = np.asarray(table)
  if table.ndim != 2:
    raise ClmimError(f"resample_grid: expected a [tokens, dim] table, got shape {table.shape}")
  n, dim = table.shape
  g = math.isqrt(n)
  if n < 1 or g * g != n:
    raise ClmimError(
        f"resample_grid: {n} position rows do not form a square grid of patches; "
        "split off any cls / register rows first")
  h, w = (to_grid, to_grid) if isinstance(to_grid, (int, np.integer)) else tuple(to_grid)
  if h < 1 or w < 1:
    raise ClmimError(f"resample_grid: the target grid must be at least 1x1, got {h}x{w}")
  grid = table.astype(np.float64).reshape(g, g, dim)
  out = np.einsum("ha,abd,wb->hwd", _weights(g, h, antialias, offset), grid,
                  _weights(g, w, antialias, offset))
  return out.reshape(h * w, dim).astype(np.float32)
