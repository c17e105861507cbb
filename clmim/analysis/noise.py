"""Input perturbations for the robustness analysis: band-limited and white Gaussian noise.

Units. Images are float arrays [H, W, C] in pixel units, values roughly in [0, 1], i.e. before
the model's input normalisation (which divides by the dataset std later; not this module's job).
Every `rms` / strength here is therefore in those pixel units.

Frequencies. For an axis of n pixels the angular frequencies of the fft bins are
2π·numpy.fft.fftfreq(n), in [-π, π). The *radius* of a 2-D frequency (ky, kx) is the Chebyshev
radius max(|ky|, |kx|), in [0, π]. We use the Chebyshev (not Euclidean) radius so that the
radii of a square image cover exactly [0, π] and bands of radius tile it as square annuli: no
corner bins beyond π are left out of every band, and each band of an n x n image holds the bins
whose larger axis frequency falls in it. The radius is symmetric under k -> -k (the Nyquist bin
-π maps to itself), so a mask built from it keeps a real signal real.

Bands. A band is given by a centre f and a width w, both in units of π (configs say
centres (0.1, ..., 0.9), width 0.1). It holds the bins with low <= radius < high, where
low = max(0, f - w/2)·π and high = (f + w/2)·π. When f + w/2 >= 1 the top is made inclusive of
π (high = π + 1e-6), since no radius exceeds π and the Nyquist bin would otherwise belong to no
band. Edges are rounded to 9 decimals in units of π before multiplying by π so that adjacent
bands share exactly the same float edge (0.2 + 0.05 and 0.3 - 0.05 differ in the last bit) and a
bin lying on an edge belongs to exactly one of them. Masks compare float32 radii with float32
limits, on the host (`check_bands`) and on the device (`band_noise`) alike.

Band noise. Standard Gaussian noise `jax.random.normal(key, (H, W, C), float32)` is
transformed with fft2 over axes (0, 1) (per channel), the bins outside the band are zeroed, the
inverse fft2 is taken and its real part kept. The result is then scaled so that its
root-mean-square over all H·W·C values equals `rms` exactly (per image, up to float32
round-off), whatever the band's width: strengths are comparable across bands.

White noise. i.i.d. Gaussian with standard deviation `rms`; not renormalised.

Determinism. The noise of one image depends only on (seed, condition_id, index):
key = fold_in(fold_in(PRNGKey(seed), condition_id), index). It does not depend on the batch the
image is in, the batch size or the number of devices.

Everything that takes jnp inputs is jittable; band limits, rms, kind, index, condition id and
seed may be traced scalars (e.g. rows of a conditions array under `lax.map`); shapes are static.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from clmim.errors import ClmimError

BAND = 0
WHITE = 1
KINDS = (BAND, WHITE)

# Added to π for the top band so the Nyquist bin (radius exactly π) is inside it. Larger than a
# float32 ulp at π (~2.4e-7), so it survives the cast to float32.
_TOP_MARGIN = 1e-6
# Floor on the mean square before the rescale: an empty band gives an all-zero signal and
# 0 * rms / sqrt(floor) = 0 instead of NaN inside jit. Far below any real band's mean square
# (a single bin of a 1024 x 1024 image has ~1e-6).
_MS_FLOOR = 1e-30
# Band edges are rounded to this many decimals (in units of π); see the module docstring.
_EDGE_DECIMALS = 9


@functools.lru_cache(maxsize=32)
def _radius_cached(height: int, width: int) -> np.ndarray:
  ky = np.abs(2 * np.pi * np.fft.fftfreq(height))[:, None]
  kx = np.abs(2 * np.pi * np.fft.fftfreq(width))[None, :]
  radius = np.maximum(ky, kx).astype(np.float32)
  radius.flags.writeable = False  # shared by the cache
  return radius


def frequency_radius(height: int, width: int) -> np.ndarray:
  """Chebyshev radius max(|ky|, |kx|) in [0, π] of every fft2 bin of a height x width image.

  Returns a float32 array [height, width] in numpy's fft2 bin order (not fft-shifted).
  """
  return _radius_cached(int(height), int(width)).copy()


def _band_mask(radius, low, high, xp):
  """low <= radius < high, compared in float32 (same answer on host and device)."""
  low = xp.asarray(low, dtype=xp.float32)
  high = xp.asarray(high, dtype=xp.float32)
  return (radius >= low) & (radius < high)


def _static_shape(shape) -> Tuple[int, int, int]:
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3:
    raise ClmimError(f"noise shape {shape} is not (height, width, channels).")
  return shape


def _band_filter(white: jnp.ndarray, low, high, rms) -> jnp.ndarray:
  """Keeps the band low <= radius < high of `white` [H, W, C] and rescales to RMS `rms`."""
  height, width, _ = white.shape
  radius = jnp.asarray(frequency_radius(height, width))
  mask = _band_mask(radius, low, high, jnp)[:, :, None]
  spectrum = jnp.fft.fft2(white, axes=(0, 1))
  # The mask is symmetric under k -> -k, so the inverse is real up to round-off; dropping the
  # imaginary part only removes that round-off.
  banded = jnp.real(jnp.fft.ifft2(jnp.where(mask, spectrum, 0), axes=(0, 1)))
  mean_square = jnp.mean(jnp.square(banded))
  scale = jnp.asarray(rms, jnp.float32) / jnp.sqrt(jnp.maximum(mean_square, _MS_FLOOR))
  return (banded * scale).astype(jnp.float32)


def band_noise(key: jax.Array, shape: Sequence[int], low, high, rms) -> jnp.ndarray:
  """Gaussian noise restricted to the band low <= radius < high, with RMS exactly `rms`.

  Args:
    key: a jax PRNG key; the draw is `jax.random.normal(key, shape, float32)`.
    shape: static (H, W, C).
    low, high: band limits in radians (may be traced scalars); radius is the Chebyshev radius
      of `frequency_radius`.
    rms: root-mean-square of the result over all H·W·C values (may be traced).

  Returns:
    float32 [H, W, C]. An empty band gives zeros (not NaN); `check_bands` rules that out.
  """
  shape = _static_shape(shape)
  return _band_filter(jax.random.normal(key, shape, dtype=jnp.float32), low, high, rms)


def white_noise(key: jax.Array, shape: Sequence[int], rms) -> jnp.ndarray:
  """i.i.d. Gaussian noise with standard deviation `rms` (a plain draw, not renormalised)."""
  shape = _static_shape(shape)
  return jax.random.normal(key, shape, dtype=jnp.float32) * jnp.asarray(rms, jnp.float32)


def perturbation(seed, index, condition_id, kind, low, high, rms,
                 shape: Sequence[int]) -> jnp.ndarray:
  """The noise added to ONE image, a function of (seed, condition_id, index) only.

  Equals `band_noise(key, shape, low, high, rms)` for kind 0 and `white_noise(key, shape, rms)`
  for kind 1, with key = fold_in(fold_in(PRNGKey(seed), condition_id), index).

  Args:
    seed: int (or traced int) seed of the analysis.
    index: int32 scalar, the image's index in the evaluation set (may be traced).
    condition_id: int scalar naming the condition (band / strength), so conditions draw
      independent noise (may be traced).
    kind: 0 (`BAND`) = band noise with (low, high, rms); 1 (`WHITE`) = white noise with
      standard deviation rms (low, high ignored). May be traced.
    low, high, rms: see `band_noise` / `white_noise`.
    shape: static (H, W, C).

  Returns:
    float32 [H, W, C].
  """
  if isinstance(kind, numbers.Integral) and int(kind) not in KINDS:
    raise ClmimError(f"noise kind {kind!r} is unknown; expected 0 (band) or 1 (white).")
  shape = _static_shape(shape)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), condition_id), index)
  # Both kinds start from the same draw (so each equals its public function exactly); drawing
  # it once halves the random-number work and compile time.
  white = jax.random.normal(key, shape, dtype=jnp.float32)
  # A select rather than lax.cond keeps kind traceable without a Python branch; under vmap
  # lax.cond would evaluate both branches anyway, and the filter is cheap next to a forward pass.
  band = _band_filter(white, low, high, rms)
  return jnp.where(jnp.asarray(kind) == BAND, band, white * jnp.asarray(rms, jnp.float32))


def batch_perturbation(seed, indices, condition_id, kind, low, high, rms,
                       image_shape: Sequence[int]) -> jnp.ndarray:
  """`perturbation` for each of `indices` ([b] int32): returns [b, H, W, C].

  Image i's noise is the same whatever else shares the batch (it is a vmap over indices).
  """
  shape = _static_shape(image_shape)
  indices = jnp.asarray(indices, dtype=jnp.int32)
  return jax.vmap(
      lambda i: perturbation(seed, i, condition_id, kind, low, high, rms, shape))(indices)


def band_limits(centres: Sequence[float], width: float) -> List[Tuple[float, float]]:
  """(low, high) in radians of each band [f - w/2, f + w/2)·π, clipped to [0, π].

  `centres` and `width` are in units of π. When f + w/2 >= 1 the top limit becomes π + 1e-6
  so the band includes radius π (the Nyquist bin). Edges are rounded to 9 decimals in units
  of π first, so adjacent bands share an identical edge. No validation: see `check_bands`.
  """
  limits = []
  for centre in centres:
    low = round(float(centre) - float(width) / 2, _EDGE_DECIMALS)
    high = round(float(centre) + float(width) / 2, _EDGE_DECIMALS)
    low_rad = max(0.0, low) * math.pi
    high_rad = math.pi + _TOP_MARGIN if high >= 1.0 else high * math.pi
    limits.append((low_rad, high_rad))
  return limits


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _as_sequence(values, where: str, what: str) -> list:
  if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
    raise ClmimError(f"{where}: {what} must be a sequence of numbers, got {values!r}.")
  values = list(np.asarray(values).ravel()) if isinstance(values, np.ndarray) else list(values)
  if not values:
    raise ClmimError(f"{where}: no {what} given; expected at least one number.")
  for value in values:
    if not _is_number(value) or not math.isfinite(float(value)):
      raise ClmimError(f"{where}: {what} must be finite numbers, got {value!r}.")
  return [float(v) for v in values]


def check_bands(image_size: int, centres: Sequence[float], width: float,
                where: str) -> List[Tuple[float, float]]:
  """Validates band centres / width (units of π) on the host, before any compute.

  Args:
    image_size: side of the (square) images the noise is added to.
    centres: band centres in units of π, each strictly inside (0, 1).
    width: band width in units of π, in (0, 1].
    where: the config path named in errors, e.g. "config.analysis_options.robustness.bands".

  Returns:
    `band_limits(centres, width)`: (low, high) in radians per band.

  Raises:
    ClmimError: a centre or the width is invalid, or a band holds no fft bin of an
      image_size x image_size image.
  """
  if not isinstance(image_size, numbers.Integral) or isinstance(image_size, bool) \
      or image_size < 1:
    raise ClmimError(f"{where}: image size {image_size!r} is not a positive integer.")
  values = _as_sequence(centres, where, "band centres")
  for centre in values:
    if not 0.0 < centre < 1.0:
      raise ClmimError(f"{where}: band centre {centre:g}π is outside (0, π); expected centres "
                       f"in units of π strictly between 0 and 1, e.g. (0.1, 0.2, ..., 0.9).")
  if not _is_number(width) or not math.isfinite(float(width)) or not 0.0 < float(width) <= 1.0:
    raise ClmimError(f"{where}: band width {width!r} is not in (0, 1]; expected a width in "
                     f"units of π, e.g. 0.1.")
  limits = band_limits(values, float(width))
  radius = frequency_radius(image_size, image_size)
  # Bins of an n-px axis are 2π/n apart: a band narrower than that may fall between them.
  spacing = 2.0 / image_size
  for number, (centre, (low, high)) in enumerate(zip(values, limits)):
    if not _band_mask(radius, low, high, np).any():
      raise ClmimError(
          f"{where}: band {number} (centre {centre:g}π, [{low / math.pi:.4g}π, "
          f"{min(high, math.pi) / math.pi:.4g}π)) holds no frequency bin of {image_size}x"
          f"{image_size} px images (bins are {spacing:.4g}π apart); use a wider band "
          f"(width >= {spacing:.4g}) or larger images.")
  return limits


def check_strengths(values: Sequence[float], where: str) -> List[float]:
  """Validates white-noise strengths (std in pixel units): non-empty, positive and finite.

  Returns them as a list of floats; raises ClmimError naming `where` otherwise.
  """
  strengths = _as_sequence(values, where, "white-noise strengths")
  for value in strengths:
    if value <= 0:
      raise ClmimError(f"{where}: white-noise strength {value:g} is not positive; expected "
                       f"standard deviations in pixel units > 0, e.g. (0.01, 0.05, 0.1).")
  return strengths
