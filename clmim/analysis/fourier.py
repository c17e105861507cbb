"""Fourier analysis of token maps: relative log amplitude ΔlogA along the diagonal frequencies.

Definition (docs/definitions.md): for each residual state z in `zs`, keep the N = g*g patch
tokens (`batch.layout`: cls and register tokens dropped; patches only, so the result is the same
on every token layout) and reshape them to a g x g map per channel; F = log(|fft2(z)| + 1e-6)
over the two spatial axes; shift frequency 0 to the centre (roll by c = g//2); average F over
images and channels; read the diagonal from the centre to the end, F[c + k, c + k] for
k = 0 .. g - 1 - c (the official notebooks' `diag()[int(g/2):]`: g/2 values for even g, g//2 + 1
for odd g); subtract its first (DC) value.

Only the read-out frequencies (k, k) reach the result, so only they are computed: the 2-D DFT at
(k, k) is the 1-D DFT of the tokens summed along their wrapped anti-diagonals (`log_amplitude`),
the same numbers as the 2-D FFT's entries there. The image/channel mean is linear, so devices and
batches only accumulate a [states, K] sum and an image count.
NOTE: each image's map is stored relative to its own DC value (plus a separate DC sum), because
ΔlogA is a small difference of two large log amplitudes: summing absolute values in float32 and
subtracting at the end lost ~1e-6 relative precision and made results depend on the batching.

Note: for even g the read-out stops at k = g/2 - 1: the Nyquist frequency (g/2, g/2) -- where a ±1
checkerboard puts all its energy -- wraps to index 0 after the roll, so it is not part of the
reported curve. Odd grids have no Nyquist bin; there the last value, k = g//2, is the highest
diagonal frequency the grid has.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from clmim.analysis import core
from clmim.analysis.common import grid_side, weighted_sum
from clmim.errors import ClmimError

NAME = "fourier"
OPTIONS = {}
RESULTS = (
    core.Result(key="fourier", label="high-frequency ΔlogA", layout="[stage][frequency]",
                x="stage", series=lambda values: [row[-1] for row in values],
                cl_direction="lower", summary="later",
                summary_label="high-frequency ΔlogA, later blocks",
                description="log amplitude of the highest spatial frequency of the token maps, "
                            "relative to frequency 0 (higher = more high-frequency content)"),
    core.Result(key="fourier_all_states", label="ΔlogA (every state)",
                layout="[state][frequency]", x=None, series=None),
)

_EPS = 1e-6


def diagonal_frequencies(g: int) -> np.ndarray:
  """k = 0 .. g - 1 - g//2: the frequencies (k, k) that the official `roll(F, int(g/2))` then
  `diag()[int(g/2):]` reads — g/2 of them for even g, g//2 + 1 for odd g (e.g. 4 on the 7 x 7
  grid of 224 px / patch 32). Counting g//2 instead would drop the highest frequency of an odd
  grid, whose centre is not the middle of an even split."""
  return np.arange(g - g // 2)


def _fold(g: int) -> np.ndarray:
  """[g*g, g] 0/1 float32: token n = x*g + y (row-major) goes to residue r = (x + y) mod g."""
  x, y = np.divmod(np.arange(g * g), g)
  return (((x + y) % g)[:, None] == np.arange(g)[None, :]).astype(np.float32)


def log_amplitude(z, layout=core.TokenLayout()):
  """Channel-averaged log(|fft2| + 1e-6) of one state [B, T, C] (tokens laid out as `layout`
  says; default: the paper's, cls then the N patches) at the read-out frequencies (k, k),
  k = 0 .. g - 1 - g//2 -> [B, K].

  Only these K of the g x g frequencies reach the result. exp(-2 pi i k (x + y) / g) depends on
  (x + y) mod g alone, so the 2-D DFT at (k, k) is the 1-D DFT over r of the tokens folded onto
  their anti-diagonals, u[r] = sum of z[x, y] with (x + y) mod g = r: one [N, g] 0/1 matmul (plain
  float32 sums) and a length-g FFT per channel instead of a g x g FFT and g*g logs per channel.
  Same numbers as the 2-D FFT's entries there (a constant map still gives exact zeros).
  """
  b, t, c = z.shape
  g = grid_side(layout.num_patches(t), "fourier: states")
  folded = jnp.einsum("bnc,nr->brc", layout.patches(z).astype(jnp.float32), jnp.asarray(_fold(g)),
                      precision=jax.lax.Precision.HIGHEST)
  spectrum = jnp.fft.rfft(folded, axis=1)[:, :len(diagonal_frequencies(g))]
  return jnp.mean(jnp.log(jnp.abs(spectrum) + _EPS), axis=-1)


def partial_sums(batch: core.Batch, options: dict):
  """Weighted sums over the batch of the channel-averaged log amplitude at the read-out
  frequencies of every state.

  Reads `batch.zs` (2*depth+1 residual states [B, T, C], tokens as `batch.layout` says) and
  `batch.weights`.

  Returns:
    {"rel_log_amplitude_sum": [states, K], F(k, k) minus each image's own F(0, 0),
     "dc_log_amplitude_sum": [states], F(0, 0)}. The absolute F sum is rel + dc.
  """
  del options
  zs, weights = batch.zs, batch.weights
  rel_sums, dc_sums = [], []
  for z in zs:
    log_amp = log_amplitude(z, batch.layout)
    dc = log_amp[:, 0]
    rel_sums.append(weighted_sum(log_amp - dc[:, None], weights))
    dc_sums.append(weighted_sum(dc, weights))
  return {"rel_log_amplitude_sum": jnp.stack(rel_sums), "dc_log_amplitude_sum": jnp.stack(dc_sums)}


def finalize(total_sums, options):
  """{"fourier": [[freq] stage] for zs[0], zs[2], ..., "fourier_all_states": [[freq] state]}."""
  count = float(total_sums["count"])
  if count <= 0:
    raise ClmimError("fourier: no images were analysed (total weight is 0).")
  # The sums are already the read-out, relative to DC: what ΔlogA is.
  delta = np.asarray(total_sums["rel_log_amplitude_sum"], np.float64) / count
  # Stages are the embedding output and each block's post-MLP state (even indices of zs).
  return {"fourier": delta[0::2].tolist(), "fourier_all_states": delta.tolist()}


def figures(results: dict, options: dict) -> dict:
  """The paper's two panels: ΔlogA at the highest frequency vs depth, and the last stage's
  full curve over frequency (every model side by side)."""
  del options
  return {"fourier.png": _figure(results)}


def _figure(results: dict):
  """Two panels: ΔlogA at the highest frequency vs depth 0..L, and the last stage's full curve.

  `results["models"][name]["fourier"]` holds one row per stage (embedding output, then each
  block's output) of ΔlogA along the half-diagonal of the centred spectrum, DC first. Entry k
  sits at normalised frequency 2πk/g for a g x g token grid (g from model_info; odd grids end
  just below π).
  """
  from matplotlib.figure import Figure  # matplotlib only when figures are drawn
  from matplotlib.ticker import MaxNLocator

  from clmim.analysis import plots
  names = plots.models_with(results, "fourier")
  if not names:
    raise ClmimError("results has no model with values for 'fourier': nothing to plot.")
  styles = plots.model_styles(results, names)
  fig = Figure(figsize=(10.4, 3.8))
  ax_depth, ax_freq = fig.subplots(1, 2)
  for name in names:
    rows, style = plots.stage_rows(results, name), styles[name]
    kw = dict(color=style["color"], linestyle=style["linestyle"], label=style["label"])
    ax_depth.plot(np.arange(rows.shape[0]), rows[:, -1], marker="o", markersize=3.5,
                  linewidth=1.8, **kw)
    band = plots.interval_band(results, name, "fourier", rows.shape[0])
    if band is not None:
      ax_depth.fill_between(np.arange(rows.shape[0]), *band, color=style["color"], alpha=0.18,
                            linewidth=0)
    # Entry k is the spatial frequency 2πk/g of the g x g token grid (π = Nyquist); g from the
    # model's record, else the even grid that gives this many entries.
    info = results.get("model_info", {}).get(name, {})
    grid = (info.get("image_size", 0) // info.get("patch_size", 1)) or 2 * rows.shape[1]
    freqs = 2 * math.pi * np.arange(rows.shape[1]) / grid
    ax_freq.plot(freqs, rows[-1], linewidth=1.8, **kw)
  ax_depth.xaxis.set_major_locator(MaxNLocator(integer=True))
  plots.finish_axes(ax_depth, "Depth", "ΔLog amplitude (highest frequency)",
               "High-frequency amplitude vs depth", legend=False)
  ax_freq.set_xlim(0, math.pi)
  ax_freq.set_xticks([0, math.pi / 2, math.pi], ["0", "π/2", "π"])
  plots.finish_axes(ax_freq, "Frequency", "ΔLog amplitude", "Last stage: ΔLog amplitude")
  fig.tight_layout()
  return fig

