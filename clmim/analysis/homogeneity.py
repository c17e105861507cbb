"""Homogeneity of attention and representations: the collapse the paper attributes to CL.

Definitions (docs/analyses/homogeneity.md), per block, image and head; `a` = the patch queries
over the patch keys (`batch.layout`: cls and register rows and columns dropped; for the paper's
models `attn[:, :, 1:, 1:]`), rows renormalised over the N patch keys as in attention_distance
(a row with no patch mass at all counts as the uniform row), then unit-normalised: `u[h, q]`.

  head_similarity[block]        mean over head pairs h < h' and queries q of cos(u[h, q], u[h', q])
  query_similarity[block][head] mean over query pairs q < q' of cos(u[h, q], u[h, q'])
  depth_similarity[block]       mean over patch tokens k of cos(x_in[k], x_out[k]): the block's
                                input (previous block's output, or the embedding) and output
  token_similarity[block]       mean over patch-token pairs k < k' of cos(x_out[k], x_out[k']):
                                how alike the tokens' *representations* are after the block
                                (the paper's "tokens of an image move together" for CL), beside
                                query_similarity, which compares attention rows

Each is averaged over images. All four read patch tokens only (there is no cls part): they are
defined, and the same, on every token layout, with or without cls, with or without registers.

A mean of pairwise cosines needs no pair tensor: for unit vectors u_1 .. u_n with mean ū and
spread V = Σ_i |u_i − ū|², the mean over pairs i < j of u_i·u_j is `|ū|² − V / (n (n − 1))`.
V is summed from the deviations themselves, so values near 1 (all vectors equal, V ≈ 0) keep
full float32 precision instead of being a difference of two ~n² sums. One head (or one patch)
has no pairs: that value is NaN.
"""
import jax.numpy as jnp
import numpy as np

from clmim.analysis import core
from clmim.analysis.common import weighted_sum
from clmim.errors import ClmimError

NAME = "homogeneity"
OPTIONS = {}


def per_block_values(values) -> list:
  """[per block] -> the same floats (the depth curve of a metric without a head axis)."""
  return np.asarray(values, np.float64).reshape(-1).tolist()


RESULTS = (
    core.Result(
        "head_similarity", "head similarity (cosine)", "[block]", x="block",
        series=per_block_values, cl_direction="higher", title="Head similarity of attention",
        description="cosine similarity of the attention maps different heads give the same "
                    "query (1 = all heads attend alike)"),
    core.Result(
        "query_similarity", "query similarity (cosine)", "[block][head]", x="block",
        series=core.per_block_mean_over_heads, cl_direction="higher",
        title="Query similarity of attention",
        description="cosine similarity of the attention maps of different queries in one head "
                    "(1 = every query attends alike)"),
    core.Result(
        "depth_similarity", "depth similarity (cosine)", "[block]", x="block",
        series=per_block_values, cl_direction="higher",
        title="Similarity of tokens before and after a block",
        description="cosine similarity of each patch token before and after the block "
                    "(1 = the block leaves the tokens' directions unchanged)"),
    core.Result(
        "token_similarity", "token similarity (cosine)", "[block]", x="block",
        series=per_block_values, cl_direction="higher",
        title="Similarity between the tokens of an image",
        description="cosine similarity of the representations of different patch tokens of an "
                    "image after the block (1 = every token points the same way)"),
)


def unit_rows(attn, layout=core.TokenLayout()):
  """[B, H, T, T] maps (tokens laid out as `layout` says; default: the paper's, cls then the N
  patches) -> [B, H, N, N] patch rows, renormalised, then of unit L2 norm."""
  n = layout.num_patches(attn.shape[-1])
  a = layout.patch_attention(attn).astype(jnp.float32)
  s = jnp.sum(a, axis=-1, keepdims=True)
  # Renormalising first keeps every row's largest entry >= 1/N, so the squared norm below cannot
  # underflow even when nearly all of a row's mass sits on cls or the registers.
  a = jnp.where(s > 0, a / jnp.where(s > 0, s, 1.0), 1.0 / n)
  return a / jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True))


def mean_pair_cosine(u, axis):
  """Mean over pairs i < j along `axis` of u_i·u_j for unit vectors u (last axis = vector).

  Returns the array with `axis` and the last axis reduced; NaN when `axis` has one entry.
  """
  count = u.shape[axis]
  if count < 2:
    shape = tuple(d for i, d in enumerate(u.shape) if i not in (axis % u.ndim, u.ndim - 1))
    return jnp.full(shape, jnp.nan, jnp.float32)
  mean = jnp.mean(u, axis=axis, keepdims=True)
  spread = jnp.sum(jnp.square(u - mean), axis=(axis, -1))
  mean_sq = jnp.sum(jnp.square(jnp.squeeze(mean, axis)), axis=-1)
  return mean_sq - spread / (count * (count - 1))


def token_cosine(x, y):
  """[B, T, D] x [B, T, D] -> [B, T] cosine per token; a zero vector has cosine 0."""
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  dot = jnp.sum(x * y, axis=-1)
  norms = jnp.sqrt(jnp.sum(x * x, axis=-1)) * jnp.sqrt(jnp.sum(y * y, axis=-1))
  return jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0), 0.0)


def partial_sums(batch: core.Batch, options: dict) -> dict:
  """Per-device sums over images of the three similarities (see the module docstring).

  Returns:
    {"head_sum": [blocks], "query_sum": [blocks, heads], "depth_sum": [blocks],
     "token_sum": [blocks]}.
  """
  del options
  depth = len(batch.attns)
  if len(batch.zs) != 2 * depth + 1:
    raise ClmimError(f"homogeneity: expected 2*depth+1 = {2 * depth + 1} states for {depth} "
                     f"attention maps, got {len(batch.zs)}.")
  layout = batch.layout
  head, query, dep, tokens = [], [], [], []
  for i, attn in enumerate(batch.attns):
    u = unit_rows(attn, layout)  # [B, H, N, N]
    head.append(weighted_sum(jnp.mean(mean_pair_cosine(u, axis=1), axis=-1), batch.weights))
    query.append(weighted_sum(mean_pair_cosine(u, axis=2), batch.weights))
    # Block i reads zs[2i] (its input) and writes zs[2i + 2] (its output); cls and registers
    # excluded.
    cos = token_cosine(layout.patches(batch.zs[2 * i]), layout.patches(batch.zs[2 * i + 2]))
    dep.append(weighted_sum(jnp.mean(cos, axis=-1), batch.weights))
    out = layout.patches(batch.zs[2 * i + 2]).astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(out * out, axis=-1, keepdims=True))
    unit = jnp.where(norm > 0, out / jnp.where(norm > 0, norm, 1.0), 0.0)
    tokens.append(weighted_sum(mean_pair_cosine(unit, axis=1), batch.weights))
  return {"head_sum": jnp.stack(head), "query_sum": jnp.stack(query),
          "depth_sum": jnp.stack(dep), "token_sum": jnp.stack(tokens)}


def finalize(sums: dict, options: dict) -> dict:
  """Divides the sums by the image count once."""
  del options
  count = float(sums["count"])
  if count <= 0:
    raise ClmimError("homogeneity: no images were analysed (total weight is 0).")
  mean = lambda key: (np.asarray(sums[key], np.float64) / count).tolist()
  return {"head_similarity": mean("head_sum"), "query_similarity": mean("query_sum"),
          "depth_similarity": mean("depth_sum"), "token_similarity": mean("token_sum")}
