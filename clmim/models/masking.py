"""The masks of masked-image pretraining, shared by the objectives (`clmim.train.mae`,
`clmim.train.simmim`) and by the decoder analysis, which feeds a pretraining decoder what it saw
in training (`clmim.analysis.decoder`).

`per_image` draws each image's mask from its own key (a seed folded with the image's stream
position), so an analysis' masks do not depend on batching or device count.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def random_keep(rng, batch: int, tokens: int, ratio: float):
  """(keep [B, K] int32, mask [B, tokens] bool, True = masked) with K = int(tokens * (1 - ratio))
  patches kept per image, chosen uniformly (MAE's `random_masking`: argsort of uniform noise)."""
  num_keep = int(tokens * (1 - ratio))
  order = jnp.argsort(jax.random.uniform(rng, (batch, tokens)), axis=1)
  keep = order[:, :num_keep].astype(jnp.int32)
  mask = jnp.ones((batch, tokens), bool).at[jnp.arange(batch)[:, None], keep].set(False)
  return keep, mask


def scatter_visible(latent, keep, tokens: int):
  """[B, 1 + K, D] encoder output -> [B, 1 + tokens, D]: cls first, each visible token at its
  grid position, zeros where a patch was masked."""
  batch, _, width = latent.shape
  grid = jnp.zeros((batch, tokens, width), latent.dtype)
  grid = grid.at[jnp.arange(batch)[:, None], keep].set(latent[:, 1:])
  return jnp.concatenate([latent[:, :1], grid], axis=1)


def block_masks(rng, batch: int, grid: int, mask_patch: int, ratio: float):
  """Random masks [B, grid*grid] (True = masked) made of mask_patch x mask_patch token blocks.

  Exactly ceil(ratio * blocks) blocks are masked per image, as in SimMIM's MaskGenerator.
  """
  blocks_per_side = grid // mask_patch
  num_blocks = blocks_per_side ** 2
  num_masked = int(-(-ratio * num_blocks // 1))
  ranks = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch, num_blocks)), axis=1), axis=1)
  block_mask = (ranks < num_masked).reshape(batch, blocks_per_side, blocks_per_side)
  token_mask = jnp.repeat(jnp.repeat(block_mask, mask_patch, axis=1), mask_patch, axis=2)
  return token_mask.reshape(batch, grid * grid)


def per_image(draw, seed: int, index):
  """`draw(key)` (one image's mask as a batch of one) for each image: key = fold_in(PRNGKey(seed),
  its stream position `index` [B]); the leading axis of one is dropped."""
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(index)
  return jax.tree.map(lambda x: x[:, 0], jax.vmap(draw)(keys))
