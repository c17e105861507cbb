"""Mean attention distance in pixels, per layer and head (docs/definitions.md).

For one image and head: keep the patch queries and patch keys only (`batch.layout`: the cls
and register rows and columns dropped; for the paper's models `attn[:, :, 1:, 1:]`),
`A = that + 1e-32` with rows renormalised over the N patch keys,
`D[i, j] = patch_size * ||grid(i) - grid(j)||_2`, and the value is `mean_q sum_k A[q, k] D[q, k]`.
Images are averaged; `finalize` reports [layers][heads]. Defined on patches only, so it is the
same on every token layout (with or without cls, with or without registers).

The epsilon is folded in algebraically (`sum_k (a + e) D = sum_k a D + e sum_k D`) so no shifted
copy of the [B, H, N, N] maps is built: one fused multiply-reduce and one row sum per layer.
"""
import jax.numpy as jnp
import numpy as np

from clmim.analysis import core
from clmim.analysis.common import grid_side, weighted_sum
from clmim.errors import ClmimError

NAME = "attention_distance"
OPTIONS = {}

_EPS = 1e-32


def grid_distances(g, patch_size):
  """[N, N] float32 pixel distances between the patches of a g x g grid (row-major order)."""
  idx = np.arange(g * g)
  rows, cols = idx // g, idx % g
  d = np.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :])
  return (patch_size * d).astype(np.float32)


def uniform_attention_distance(grid: int, patch_size: int) -> float:
  """Mean distance (px) between two patches drawn uniformly on a grid x grid lattice: the value
  of uniform attention, the reference a model's curve is read against."""
  return float(grid_distances(grid, patch_size).astype(np.float64).mean())


def _uniform_reference(results: dict):
  """The uniform-attention distance of the run's models, when they all share one grid."""
  values = {round(info.get("uniform_attention_distance", float("nan")), 9)
            for info in results.get("model_info", {}).values()}
  return values.pop() if len(values) == 1 else None


RESULTS = (core.Result(
    key="attention_distance", label="attention distance (px)", layout="[block][head]",
    reference=_uniform_reference, reference_label="uniform attention", cl_direction="higher",
    title="Attention distance",
    description="mean distance (px) between a query patch and the patches it attends to"),)


def partial_sums(batch: core.Batch, options: dict):
  """Weighted sums over the batch of per-image attention distances.

  Reads `batch.attns` ([B, heads, T, T] per block, T = prefix + N), `batch.weights`,
  `batch.patch_size` and `batch.layout`.

  Returns:
    {"distance_sum": [layers, heads]} (sums, not means; the runner adds the image count).
  """
  del options
  attns, weights, patch_size, layout = batch.attns, batch.weights, batch.patch_size, batch.layout
  n = layout.num_patches(attns[0].shape[-1])
  g = grid_side(n, "attention maps")
  dist = jnp.asarray(grid_distances(g, patch_size))
  # Contribution of the epsilon to each row: numerator e*sum_k D[q, k], denominator e*N.
  eps_num = _EPS * dist.sum(-1)
  per_layer = []
  for attn in attns:
    a = layout.patch_attention(attn).astype(jnp.float32)
    # Elementwise multiply-reduce rather than einsum: an einsum here becomes a batched matmul,
    # which GPUs run in reduced (TF32/bf16) precision by default.
    num = jnp.sum(a * dist, axis=-1) + eps_num
    den = a.sum(-1) + _EPS * n
    per_image = jnp.mean(num / den, axis=-1)  # [B, H]
    per_layer.append(weighted_sum(per_image, weights))
  return {"distance_sum": jnp.stack(per_layer)}


def finalize(total_sums, options):
  """Divides the accumulated sums by the image count: {"attention_distance": [[head] layer]}."""
  count = float(total_sums["count"])
  if count <= 0:
    raise ClmimError("attention_distance: no images were analysed (total weight is 0).")
  dist = np.asarray(total_sums["distance_sum"], np.float64) / count
  return {"attention_distance": dist.tolist()}
