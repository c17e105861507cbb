"""Normalised mutual information between queries and keys, and attention entropy.

Definitions (docs/definitions.md), per image and head, natural logs:
  A = patch queries over patch keys (`batch.layout`: cls and register rows and columns dropped;
  attn[:, :, 1:, 1:] for the paper's models) + 1e-8, rows renormalised over the N patch keys;
  p(q) = 1/N; p(k) = sum_q p(q) A[q, k];
  I = sum_q sum_k p(q) A[q, k] log(A[q, k] / p(k)); H(Q) = log N; H(K) = -sum_k p(k) log p(k);
  NMI = I / sqrt(H(Q) H(K)).
  Attention entropy (ours) = mean_q (-sum_k A[q, k] log A[q, k]) / log N  (1 = uniform rows).
Both are averaged over images; `finalize` reports [layers][heads] for "nmi" and
"attention_entropy". Defined on patches only: the same on every token layout.

Computation: with the uniform query prior, I = H(K) - mean_q H(A[q, :]), so per-row sums and the
key marginal p(k) are all that touch the [B, H, N, N] maps: two reads per layer (one row
reduction, one column reduction), no renormalised copy stored. The row reduction computes the
same row sums as attention_distance, so XLA can share them when both run in one step.
"""
import math

import jax.numpy as jnp
from jax.scipy.special import xlogy
import numpy as np

from clmim.analysis import core
from clmim.analysis.common import weighted_sum
from clmim.errors import ClmimError

NAME = "nmi"
OPTIONS = {}
RESULTS = (
    core.Result(key="nmi", label="NMI", layout="[block][head]", reference=0.0,
                reference_label="query-independent attention", cl_direction="lower",
                title="Normalised mutual information (query, key)",
                summary="later", summary_label="NMI, later blocks",
                description="normalised mutual information between query and key (0 = every "
                            "query attends alike)"),
    core.Result(key="attention_entropy", label="attention entropy / log N",
                layout="[block][head]", reference=1.0, reference_label="uniform attention",
                title="Attention entropy",
                description="mean row entropy over log N (1 = uniform attention): low NMI with "
                            "low entropy is collapse, with entropy near 1 no attention at all"),
)

_EPS = 1e-8



def per_image(attn, layout=core.TokenLayout()):
  """Per-(image, head) NMI and normalised entropy of one layer's maps [B, H, T, T], whose
  tokens are laid out as `layout` says (default: the paper's, cls then the N patches).

  Returns:
    (nmi, entropy), each [B, H] float32.
  """
  n = layout.num_patches(attn.shape[-1])
  if n < 2:
    raise ClmimError(f"nmi: need at least 2 patch tokens, got {n}.")
  log_n = math.log(n)
  p = layout.prefix
  a = layout.patch_attention(attn).astype(jnp.float32)
  a_eps = a + _EPS  # fused into the reductions below, never materialised
  # Pass 1 (one fused row reduction): the row sums s and, in the same read, the row sums of
  # a' log(a' / s~) with a guess s~ of s known up front. Any s~ > 0 is exact, because
  # A log A = (a'/s) (log(a'/s~) + log(s~/s)); a guess close to s keeps every term small. Softmax
  # rows sum to 1, so s~ = 1 - (attention to the prefix tokens: cls and registers) is within
  # rounding of s; without prefix tokens the empty sum is 0 and s~ = 1. A one-token prefix sums
  # one float32 exactly: the paper's models get the same s~ as 1 - attn[..., 0].
  s = a.sum(-1) + _EPS * n  # [B, H, N]
  prefix_mass = attn[:, :, p:, :p].astype(jnp.float32).sum(-1)
  s_guess = jnp.maximum(1.0 - prefix_mass, _EPS * n)
  log_ratio = jnp.log1p((s_guess - s) / s)  # log(s~ / s), accurate when small
  # Float32 sums of terms of size log N lose ~1e-7 * log N absolutely, so two forms are kept:
  # entropies (accurate near collapse) and KL(A_q || uniform) (accurate near uniform
  # attention). The second log per element is free in practice (the pass is memory-bound).
  # xlogy: 0 log 0 = 0, so an underflowed probability never yields NaN.
  ent_sum = jnp.sum(xlogy(a_eps, a_eps * (1.0 / s_guess)[..., None]), axis=-1)
  kl_sum = jnp.sum(xlogy(a_eps, a_eps * (n / s_guess)[..., None]), axis=-1)
  row_entropy = jnp.mean(-ent_sum / s - log_ratio, axis=-1)  # mean_q H(A_q), [B, H]
  row_kl = jnp.mean(kl_sum / s + log_ratio, axis=-1)  # mean_q KL(A_q || u)
  # Pass 2 (column reduction): the key marginal p(k) = mean_q A[q, k].
  p_key = jnp.sum(a_eps * (1.0 / (n * s))[..., None], axis=-2)  # [B, H, N]
  key_entropy = -jnp.sum(xlogy(p_key, p_key), axis=-1)  # H(K), [B, H]
  key_kl = jnp.sum(xlogy(p_key, n * p_key), axis=-1)  # KL(p_k || u)
  # I = H(K) - mean_q H(A_q) = mean_q KL(A_q || u) - KL(p_k || u): use the form whose operands are
  # smaller, hence whose rounding error is.
  mutual_info = jnp.where(row_kl < key_entropy, row_kl - key_kl, key_entropy - row_entropy)
  # H(K) >= ~N*eps*log(1/eps) > 0 thanks to the epsilon; the floor only guards against underflow.
  nmi = mutual_info / jnp.sqrt(log_n * jnp.maximum(key_entropy, 1e-30))
  mean_row_entropy = jnp.where(row_kl < row_entropy, log_n - row_kl, row_entropy)
  return nmi, mean_row_entropy / log_n


def partial_sums(batch: core.Batch, options: dict):
  """Weighted sums over the batch of per-image NMI and attention entropy.

  Reads `batch.attns` ([B, heads, T, T] per block), `batch.weights` and `batch.layout`.

  Returns:
    {"nmi_sum": [layers, heads], "entropy_sum": [layers, heads]}.
  """
  del options
  attns, weights = batch.attns, batch.weights
  nmi_sums, ent_sums = [], []
  for attn in attns:
    nmi, ent = per_image(attn, batch.layout)
    nmi_sums.append(weighted_sum(nmi, weights))
    ent_sums.append(weighted_sum(ent, weights))
  return {"nmi_sum": jnp.stack(nmi_sums), "entropy_sum": jnp.stack(ent_sums)}


def finalize(total_sums, options):
  """Divides by the image count: {"nmi": [[head] layer], "attention_entropy": [[head] layer]}."""
  count = float(total_sums["count"])
  if count <= 0:
    raise ClmimError("nmi: no images were analysed (total weight is 0).")
  return {
      "nmi": (np.asarray(total_sums["nmi_sum"], np.float64) / count).tolist(),
      "attention_entropy": (np.asarray(total_sums["entropy_sum"], np.float64) / count).tolist(),
  }
