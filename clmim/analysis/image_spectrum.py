"""Image-level spectrum: how many directions the images' average-pooled representations use.

The paper's authors describe two SVD views: of the tokens of an image (`svd`) and of the
*images* — the covariance of the average-pooled image vectors over the data set. This module is
the second (docs/analyses/image_spectrum.md). For stage s (the embedding output, then each
block's output, pre-final-norm, as in `fourier`) and image i, v_i = mean of its patch tokens
(`batch.layout`: cls and register tokens dropped, so it is the same on every token layout).
Over the n images:

  C = (1 / (n - 1)) * sum_i (v_i - m)(v_i - m)^T,  m = mean_i v_i   (the covariance, [D, D])

computed once from the streamed sums sum_i v_i and sum_i v_i v_i^T (float64 on the host), with
eigenvalues lambda_1 >= ... >= lambda_D >= 0 (negative round-off clipped to 0).

  image_singular_values [stage][rank]: log lambda_k, the first `max_rank` (the paper plots the
    log singular values of the covariance; a covariance's singular values are its eigenvalues);
    -inf where lambda_k = 0 is stored as NaN.
  image_effective_rank [stage]: exp(-sum_k p_k log p_k), p = lambda / sum(lambda).

Options (config.analysis_options.image_spectrum.<option>):
  max_rank: int >= 1, spectrum entries kept (32).

No bootstrap interval: the statistic is one covariance of all the images, not a mean of
per-image values, and resampling its [D, D] sums per fold costs too much memory at ViT-B width.
"""
import jax.numpy as jnp
import numpy as np

from clmim.analysis import core
from clmim.analysis.common import weighted_sum
from clmim.errors import ClmimError

NAME = "image_spectrum"
OPTIONS = {"max_rank": 32}
BOOTSTRAP = False


def _stages(values) -> list:
  return np.asarray(values, np.float64).reshape(-1).tolist()


RESULTS = (
    core.Result(key="image_effective_rank", label="image-level effective rank",
                layout="[stage]", x="stage", series=_stages,
                title="Effective rank of the average-pooled image vectors",
                description="exp(entropy) of the eigenvalues of the covariance of the images' "
                            "mean patch tokens: directions the images spread over"),
    core.Result(key="image_singular_values", label="log eigenvalues of the image covariance",
                layout="[stage][rank]", x=None, series=None),
)


def _max_rank(options) -> int:
  rank = options["max_rank"]
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ClmimError(f"config.analysis_options.{NAME}.max_rank: expected an int >= 1, got "
                     f"{rank!r}.")
  return int(rank)


def check(model, options: dict) -> None:
  """Rejects a bad max_rank before any compute."""
  _max_rank(options)


def partial_sums(batch: core.Batch, options: dict) -> dict:
  """Per-device sums of the pooled vectors and of their outer products, per stage.

  Returns {"sum": [S, D], "outer": [S, D, D]}.
  """
  _max_rank(options)
  pooled = [batch.layout.patches(z).astype(jnp.float32).mean(axis=1)
            for z in batch.zs[0::2]]  # [B, D] each
  w = jnp.where(batch.weights > 0, batch.weights, 0).astype(jnp.float32)
  return {"sum": jnp.stack([weighted_sum(v, batch.weights) for v in pooled]),
          "outer": jnp.stack([jnp.einsum("b,bd,be->de", w, v, v,
                                         precision="highest") for v in pooled])}


def covariance_eigenvalues(total, outer, count) -> np.ndarray:
  """Descending eigenvalues of the covariance from sum v, sum v v^T and n (float64)."""
  total, outer = np.asarray(total, np.float64), np.asarray(outer, np.float64)
  mean = total / count
  cov = (outer - count * np.outer(mean, mean)) / (count - 1)
  values = np.linalg.eigvalsh((cov + cov.T) / 2)[::-1]
  return np.clip(values, 0, None)


def effective_rank(values) -> float:
  """exp(entropy) of the eigenvalue shares; 0 for a zero covariance."""
  total = float(np.sum(values))
  if total <= 0:
    return 0.0
  p = np.asarray(values, np.float64) / total
  p = p[p > 0]
  return float(np.exp(-np.sum(p * np.log(p))))


def finalize(sums: dict, options: dict) -> dict:
  """The covariance's spectrum per stage (see the module doc)."""
  count = float(sums["count"])
  if count < 2:
    raise ClmimError(f"{NAME}: needs at least 2 images for a covariance; got {count:g}.")
  rank = _max_rank(options)
  logs, eranks = [], []
  for total, outer in zip(np.asarray(sums["sum"]), np.asarray(sums["outer"])):
    values = covariance_eigenvalues(total, outer, count)
    with np.errstate(divide="ignore"):
      log = np.log(values[:rank])
    logs.append([float(x) if np.isfinite(x) else float("nan") for x in log])
    eranks.append(effective_rank(values))
  return {"image_singular_values": logs, "image_effective_rank": eranks}
