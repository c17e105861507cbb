"""Fourier analysis of token maps: relative log amplitude ΔlogA along the diagonal frequencies.

Definition (docs/definitions.md): for each residual state z in `zs`, drop cls and reshape
the tokens to a g x g map per channel; F = log(|fft2(z)| + 1e-6) over the two spatial axes; shift
frequency 0 to the centre (roll by c = g//2); average F over images and channels; read the
diagonal from the centre to the end, F[c + k, c + k] for k = 0 .. g - 1 - c (the official
notebooks' `diag()[int(g/2):]`: g/2 values for even g, g//2 + 1 for odd g); subtract its first
(DC) value.

The image/channel mean is linear, so devices and batches only accumulate a [states, g, g] sum of
channel-averaged F and an image count; the shift and diagonal are read once in `finalize`.
NOTE: each image's map is stored relative to its own DC value (plus a separate DC sum), because
ΔlogA is a small difference of two large log amplitudes: summing absolute values in float32 and
subtracting at the end lost ~1e-6 relative precision and made results depend on the batching.

Note: for even g the read-out stops at k = g/2 - 1: the Nyquist frequency (g/2, g/2) -- where a ±1
checkerboard puts all its energy -- wraps to index 0 after the roll, so it is not part of the
reported curve. Odd grids have no Nyquist bin; there the last value, k = g//2, is the highest
diagonal frequency the grid has.
"""
import jax.numpy as jnp
import numpy as np

from clmim.analysis import core
from clmim.analysis.common import grid_side, image_count, weighted_sum
from clmim.errors import ClmimError

NAME = "fourier"
READS = ("zs",)
OPTIONS = {}
RESULTS = (
    core.Result(key="fourier", label="high-frequency ΔlogA", layout="[stage][frequency]",
                x="stage", series=lambda values: [row[-1] for row in values],
                cl_direction="lower",
                description="log amplitude of the highest spatial frequency of the token maps, "
                            "relative to frequency 0 (higher = more high-frequency content)"),
    core.Result(key="fourier_all_states", label="ΔlogA (every state)",
                layout="[state][frequency]", x=None, series=None),
)

_EPS = 1e-6


def log_amplitude(z):
  """Channel-averaged log(|fft2| + 1e-6) of one state [B, N+1, C] -> [B, g, g], unshifted."""
  b, t, c = z.shape
  g = grid_side(t - 1, "fourier: states")
  maps = z[:, 1:, :].astype(jnp.float32).reshape(b, g, g, c)
  # Real input: rfft2 computes half the spectrum (about half the work and memory of fft2); the
  # other half follows from |F(u, v)| = |F(-u, -v)|, applied after the channel mean (which
  # preserves it) on the small [B, g, g//2 + 1] map.
  half = jnp.mean(jnp.log(jnp.abs(jnp.fft.rfft2(maps, axes=(1, 2))) + _EPS), axis=-1)
  u, v = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
  mirrored = v > g // 2
  rows = np.where(mirrored, (-u) % g, u)
  cols = np.where(mirrored, (-v) % g, v)
  return half[:, rows, cols]


def partial_sums(batch: core.Batch, options: dict):
  """Weighted sums over the batch of the channel-averaged log amplitude spectrum of every state.

  Reads `batch.zs` (2*depth+1 residual states [B, N+1, C], cls at index 0) and `batch.weights`.

  Returns:
    {"rel_log_amplitude_sum": [states, g, g], F minus each image's own F[0, 0] (unshifted
     frequencies), "dc_log_amplitude_sum": [states], F[0, 0], "count": []}. The absolute F sum
     is rel + dc.
  """
  del options
  zs, weights = batch.zs, batch.weights
  rel_sums, dc_sums = [], []
  for z in zs:
    log_amp = log_amplitude(z)
    dc = log_amp[:, 0, 0]
    rel_sums.append(weighted_sum(log_amp - dc[:, None, None], weights))
    dc_sums.append(weighted_sum(dc, weights))
  count = image_count(weights)
  return {"rel_log_amplitude_sum": jnp.stack(rel_sums), "dc_log_amplitude_sum": jnp.stack(dc_sums),
          "count": count}


def delta_log_amplitude(mean_log_amp):
  """[states, g, g] unshifted mean log amplitude -> [states, g - g//2] ΔlogA along the diagonal.

  Reads exactly what the official `roll(F, int(g/2))` then `diag()[int(g/2):]` reads: g/2
  values for even g, g//2 + 1 for odd g (e.g. 4 values on the 7x7 grid of 224 px / patch 32).
  """
  g = mean_log_amp.shape[-1]
  c = g // 2
  shifted = np.roll(mean_log_amp, (c, c), axis=(-2, -1))
  # Every diagonal index from the centre to the end; counting g//2 values instead would drop the
  # highest frequency on odd grids, where the centre is not the middle of an even split.
  k = np.arange(g - c)
  diag = shifted[:, c + k, c + k]
  return diag - diag[:, :1]


def finalize(total_sums, options):
  """{"fourier": [[freq] stage] for zs[0], zs[2], ..., "fourier_all_states": [[freq] state]}."""
  count = float(total_sums["count"])
  if count <= 0:
    raise ClmimError("fourier: no images were analysed (total weight is 0).")
  # Subtracting the DC value is exactly what ΔlogA does, so the DC-relative sums suffice.
  delta = delta_log_amplitude(np.asarray(total_sums["rel_log_amplitude_sum"], np.float64) / count)
  # Stages are the embedding output and each block's post-MLP state (even indices of zs).
  return {"fourier": delta[0::2].tolist(), "fourier_all_states": delta.tolist()}


def figures(results: dict, options: dict) -> dict:
  """The paper's two panels: ΔlogA at the highest frequency vs depth, and the last stage's
  full curve over frequency (every model side by side)."""
  from clmim.analysis import plots  # matplotlib only when figures are drawn
  del options
  return {"fourier.png": plots.fourier_figure(results)}
