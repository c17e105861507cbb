"""DINOv3's 2-D rotary position embedding (RoPE) of the patch tokens' queries and keys.

DINOv3 has no position table. Each patch token's query and key are rotated by angles that
depend on the patch centre's position in the image, normalised to [-1, 1] on each axis
(centre of patch i on an axis of g patches: 2 (i + 0.5) / g - 1), so the model runs at any
resolution without resampling anything. Prefix tokens (cls, registers) are not rotated.

For head dimension d, the d/4 frequencies are f_j = theta^(-4j/d), j = 0 .. d/4 - 1 (theta =
`rope_theta`, 100 for the released models). The angles of a patch at (y, x) are
[2 pi y f, 2 pi x f] (d/2 values: the y angles, then the x angles), repeated twice to d. A
vector v is rotated as v cos(a) + rotate_half(v) sin(a), where rotate_half(v) = [-v2, v1] for
the two halves v = [v1, v2] of v. Written from DINOv3's definition (the paper and the
transformers port's description); checked against transformers' DINOv3ViTModel in
tests/test_hf_parity.py.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=32)
def patch_rotation(grid: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each [grid * grid, head_dim] float32, for a row-major grid of patches."""
  if head_dim % 4:
    raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}.")
  # float32 throughout, as the reference computes them: the angles reach 2 pi, and their
  # float32 rounding is part of the function the model was trained with.
  freqs = (1.0 / np.float32(theta) ** (np.arange(0, head_dim // 4, dtype=np.float32)
                                        * np.float32(4.0 / head_dim))).astype(np.float32)
  centres = ((np.arange(grid, dtype=np.float32) + np.float32(0.5)) / np.float32(grid)
             * np.float32(2.0) - np.float32(1.0))
  ys, xs = np.meshgrid(centres, centres, indexing="ij")
  coords = np.stack([ys.reshape(-1), xs.reshape(-1)], axis=-1)  # [N, 2] (y, x)
  angles = (np.float32(2 * np.pi) * coords[:, :, None] * freqs[None, None, :]).astype(np.float32)
  angles = np.tile(angles.reshape(grid * grid, head_dim // 2), (1, 2))
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate(x, cos, sin, prefix: int):
  """x [..., T, d] with its last T - prefix tokens rotated by (cos, sin) [T - prefix, d]."""
  head, patches = x[..., :prefix, :], x[..., prefix:, :]
  half = patches.shape[-1] // 2
  turned = jnp.concatenate([-patches[..., half:], patches[..., :half]], axis=-1)
  rotated = patches * cos.astype(x.dtype) + turned * sin.astype(x.dtype)
  return jnp.concatenate([head, rotated], axis=-2)
