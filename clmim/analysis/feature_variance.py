"""Spatial variance of the feature maps (the "How Do Vision Transformers Work?" companion plot).

Definition (docs/analyses/feature_variance.md): for each residual state z in `zs` and each
image, keep the N = g × g patch tokens (`batch.layout`: cls and register tokens dropped) and
take, per channel c, their variance,
`var_k z[k, c] = mean_k (z[k, c] − mean_k' z[k', c])²` (population variance, divisor N); average
it over the channels, then over the images. Patch tokens only: the same on every token layout.

Options:
  normalize: False (default) reports that raw variance, as the companion paper plots it. True
    divides each image's value by its mean squared entry `mean_{k, c} z[k, c]²`, which makes it
    the fraction of the feature map's energy that varies across positions (in [0, 1]) and takes
    the growth of the residual stream's scale with depth out of the comparison.

Keys: "feature_variance" [stage] for zs[0], zs[2], …, zs[2L] (embedding, then each block's
output) and "feature_variance_all_states" [state] for all 2L + 1 states. There is no CL/MIM
direction: the raw value mostly tracks the residual stream's scale, which differs between
training recipes (e.g. layer scale), while the normalised one measures token homogeneity.
"""
import jax.numpy as jnp
import numpy as np

from clmim.analysis import core
from clmim.analysis.common import weighted_sum
from clmim.errors import ClmimError

NAME = "feature_variance"
OPTIONS = {"normalize": False}


def per_stage_values(values) -> list:
  """[per stage] -> the same floats (the depth curve, stage 0 = embedding)."""
  return np.asarray(values, np.float64).reshape(-1).tolist()


RESULTS = (
    core.Result(
        "feature_variance", "feature map variance", "[stage]", x="stage",
        series=per_stage_values, title="Feature map variance",
        description="variance of the features over patch positions, mean over channels "
                    "(divided by the mean squared feature when normalize=True)"),
    core.Result(
        "feature_variance_all_states", "feature map variance", "[state]", x=None, series=None,
        description="feature_variance for every residual state, after-attention ones included"),
)


def _normalize(options: dict) -> bool:
  value = options.get("normalize", False)
  if not isinstance(value, (bool, np.bool_)):
    raise ClmimError(f"config.analysis_options.feature_variance.normalize: expected True or "
                     f"False, got {value!r}.")
  return bool(value)


def check(model, options: dict) -> None:
  """Validates the options before any compute."""
  del model
  _normalize(options)


def spatial_variance(z, normalize: bool = False, layout=core.TokenLayout()):
  """[B, T, D] state -> [B]: channel mean of the variance over its patch tokens (the prefix
  tokens of `layout` dropped; default: the paper's layout, cls then the patches)."""
  p = layout.patches(z).astype(jnp.float32)
  # Two passes (mean, then squared deviations): E[z²] − E[z]² cancels badly when the mean is
  # large next to the spread, as in residual streams with big constant channels.
  mean = jnp.mean(p, axis=1, keepdims=True)
  value = jnp.mean(jnp.square(p - mean), axis=(1, 2))
  if normalize:
    energy = jnp.mean(jnp.square(p), axis=(1, 2))
    value = jnp.where(energy > 0, value / jnp.where(energy > 0, energy, 1.0), 0.0)
  return value


def partial_sums(batch: core.Batch, options: dict) -> dict:
  """Per-device sums over images: {"variance_sum": [states]}."""
  normalize = _normalize(options)
  sums = [weighted_sum(spatial_variance(z, normalize, batch.layout), batch.weights)
          for z in batch.zs]
  return {"variance_sum": jnp.stack(sums)}


def finalize(sums: dict, options: dict) -> dict:
  """Means over images, per stage (even states) and per state."""
  del options
  count = float(sums["count"])
  if count <= 0:
    raise ClmimError("feature_variance: no images were analysed (total weight is 0).")
  mean = np.asarray(sums["variance_sum"], np.float64) / count
  return {"feature_variance": mean[0::2].tolist(), "feature_variance_all_states": mean.tolist()}
