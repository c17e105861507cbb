"""Helpers every analysis shares: masked weighted sums over images and the token grid side."""
import jax.numpy as jnp
import numpy as np

from clmim.errors import ClmimError


def weighted_sum(values, weights):
  """Sum over the leading (image) axis; weight-0 rows count as exactly 0, even if NaN/inf."""
  w = weights.reshape((-1,) + (1,) * (values.ndim - 1)).astype(values.dtype)
  return jnp.sum(jnp.where(w > 0, w * values, 0), axis=0)


def image_count(weights):
  """Total weight of the real (weight > 0) images, float32."""
  return jnp.sum(jnp.where(weights > 0, weights, 0)).astype(jnp.float32)


def grid_side(num_patches: int, what: str) -> int:
  """g for g*g patch tokens, or a ClmimError naming `what` had a non-square count."""
  g = int(round(np.sqrt(num_patches)))
  if g * g != num_patches:
    raise ClmimError(f"{what} have {num_patches} patch tokens (cls and register tokens "
                     "excluded); expected a square number g*g of patches.")
  return g


def gather_first(index, weights, count: int, features):
  """(found [count], gathered [..., count, D]): `features` [..., b, D] of the images at stream
  positions 0 .. count-1, each at its position exactly once whatever the batching and device
  count (a one-hot sum over the batch; summed over steps and devices by the runner); found is 1
  where that image was seen. Padding and later images add nothing, even if NaN."""
  hit = ((index[:, None] == jnp.arange(count)[None, :]) & (weights[:, None] > 0))
  hit = hit.astype(jnp.float32)  # [b, count]
  seen = hit.sum(axis=1) > 0
  features = jnp.where(seen[:, None], features, 0)
  return hit.sum(axis=0), jnp.einsum("bc,...bd->...cd", hit, features, precision="highest")
