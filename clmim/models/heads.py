"""Heads that sit on a ViT during pretraining: MoCo v3 projector/predictor and SimMIM's pixel head.

Parameter names follow the official files where one exists (see docs/checkpoints.md), so the
converters can fill them: the MoCo MLP layers are `linear_{i}` (no bias) and `bn_{i}`.
"""
from __future__ import annotations

import flax.linen as nn


class BatchNormMLP(nn.Module):
  """MoCo v3's `_build_mlp`: Linear(no bias) -> BN -> ReLU, repeated; the last layer gets a BN
  without affine parameters (when `last_bn`). BatchNorm eps 1e-5, as in PyTorch."""
  num_layers: int
  hidden_dim: int
  out_dim: int
  last_bn: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = nn.Dense(self.out_dim if last else self.hidden_dim, use_bias=False,
                   name=f"linear_{i}")(x)
      if not last:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         name=f"bn_{i}")(x)
        x = nn.relu(x)
      elif self.last_bn:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         use_scale=False, use_bias=False, name=f"bn_{i}")(x)
    return x


class PixelHead(nn.Module):
  """SimMIM's decoder: a linear map from each patch token to its p*p*3 pixels (the 1x1 conv +
  pixel shuffle of the original, written per token). Output order inside a patch: (row, col, c)."""
  patch_size: int

  @nn.compact
  def __call__(self, tokens):
    return nn.Dense(self.patch_size * self.patch_size * 3, name="linear")(tokens)


def patchify(images, patch_size: int):
  """[B, H, W, 3] -> [B, N, p*p*3] in row-major patch order, pixels as (row, col, channel)."""
  batch, height, width, channels = images.shape
  g_h, g_w = height // patch_size, width // patch_size
  x = images.reshape(batch, g_h, patch_size, g_w, patch_size, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, g_h * g_w, -1)


def unpatchify(patches, patch_size: int, grid: int):
  """Inverse of `patchify` for a square grid."""
  batch = patches.shape[0]
  x = patches.reshape(batch, grid, grid, patch_size, patch_size, 3)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid * patch_size, grid * patch_size, 3)
