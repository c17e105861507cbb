"""Robustness perturbations: band energy, RMS, determinism, jit, and host-side validation; the
robustness analysis' clean top-1 in its results, summary and figure."""
import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clmim.analysis import noise
from clmim.errors import ClmimError

CENTRES = tuple(round(0.1 * i, 1) for i in range(1, 10))
WHERE = "config.analysis_options.robustness.bands"


def _reference_mask(size, low, high):
  """Independent numpy mask: float64 Chebyshev radius of fft2 bins, low <= r < high."""
  k = 2 * np.pi * np.fft.fftfreq(size)
  radius = np.maximum(np.abs(k)[:, None], np.abs(k)[None, :])
  return (radius >= low) & (radius < high)


# One compile per image shape; low/high/rms are traced so every band reuses it.
_band_noise_jit = jax.jit(noise.band_noise, static_argnums=1)
# Jitted with traced scalars, shared by several tests: compiling threefry + fft costs ~1.5 s a
# shape on a small CPU, and eager op-by-op dispatch costs more. Agreement with eager execution
# is checked once, in test_jit_with_traced_conditions_matches_eager.
_perturbation_jit = jax.jit(noise.perturbation, static_argnames="shape")
_batch_jit = jax.jit(noise.batch_perturbation, static_argnames="image_shape")
SHAPE = (32, 32, 3)  # the energy test's 32 px shape, so eager draws are compiled once


def _traced(condition_id, kind, low, high, rms):
  """Typed scalars, so every call of the shared jits hits the same compiled version."""
  return (jnp.int32(condition_id), jnp.int32(kind), jnp.float32(low), jnp.float32(high),
          jnp.float32(rms))


def test_frequency_radius_known_values():
  radius = noise.frequency_radius(8, 4)
  assert radius.shape == (8, 4) and radius.dtype == np.float32
  # Axis 0 has bins at multiples of π/4, axis 1 at multiples of π/2; Chebyshev = larger one.
  np.testing.assert_allclose(radius[:, 0] / np.pi, [0, .25, .5, .75, 1, .75, .5, .25], atol=1e-7)
  np.testing.assert_allclose(radius[1] / np.pi, [.25, .5, 1, .5], atol=1e-7)
  np.testing.assert_allclose(radius[3, 3] / np.pi, 0.75, atol=1e-7)
  assert radius.max() == np.float32(np.pi)
  # Symmetric under k -> -k (index i -> -i mod n), which keeps band-passed noise real.
  square = noise.frequency_radius(6, 6)
  np.testing.assert_array_equal(square, np.roll(square[::-1, ::-1], 1, axis=(0, 1)))


@pytest.mark.parametrize("size", [32, 64])
def test_band_noise_energy_is_in_its_band_and_matches_numpy_reference(size):
  shape = (size, size, 3)
  limits = noise.check_bands(size, CENTRES, 0.1, WHERE)
  for number, (low, high) in enumerate(limits):
    key = jax.random.PRNGKey(100 + number)
    out = np.asarray(_band_noise_jit(key, shape, low, high, 0.05))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    mask = _reference_mask(size, low, high)
    assert mask.any()

    power = np.abs(np.fft.fft2(out.astype(np.float64), axes=(0, 1))) ** 2
    in_band = power[mask].sum() / power.sum()
    assert in_band >= 1 - 1e-6, (size, number, in_band)

    # Reference: same Gaussian draw, masked in float64, inverse, real part.
    white = np.asarray(jax.random.normal(key, shape, jnp.float32), np.float64)
    spectrum = np.fft.fft2(white, axes=(0, 1)) * mask[:, :, None]
    complex_ref = np.fft.ifft2(spectrum, axes=(0, 1))
    assert np.abs(complex_ref.imag).max() <= 1e-12 * np.abs(complex_ref.real).max()
    ref = complex_ref.real
    scale = float((out * ref).sum() / (ref * ref).sum())
    assert scale > 0
    np.testing.assert_allclose(out, scale * ref, rtol=0, atol=1e-5 * 0.05)


def test_band_noise_rms_is_exact():
  # Sizes shared with the energy test so the jitted function is not recompiled.
  for size, (low, high), rms in [(32, (0.05 * np.pi, 0.15 * np.pi), 0.1),
                                 (64, (0.45 * np.pi, 0.55 * np.pi), 0.02),
                                 (32, (0.85 * np.pi, np.pi + 1e-6), 0.3),
                                 (64, (0.0, np.pi + 1e-6), 1.0)]:
    out = np.asarray(_band_noise_jit(jax.random.PRNGKey(size), (size, size, 3), low, high, rms))
    np.testing.assert_allclose(np.sqrt(np.mean(out.astype(np.float64) ** 2)), rms, rtol=1e-5)


def test_empty_band_gives_zeros_not_nan():
  out = _band_noise_jit(jax.random.PRNGKey(0), (8, 8, 3), 0.3 * np.pi, 0.45 * np.pi, 0.1)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_white_noise_is_a_plain_gaussian():
  key = jax.random.PRNGKey(7)
  out = np.asarray(noise.white_noise(key, (64, 64, 3), 0.05))
  # Not renormalised: exactly the standard draw times rms.
  np.testing.assert_allclose(out, np.asarray(jax.random.normal(key, (64, 64, 3))) * 0.05,
                             rtol=1e-6)
  # 12288 samples: the sample std is within ~0.64% of 0.05 at one sigma, the mean within
  # 0.9% of it; 3% is ~4.5 and ~3.3 sigma (and the key is fixed, so this never flakes).
  assert abs(out.std() / 0.05 - 1) < 0.03
  assert abs(out.mean()) < 0.05 * 0.03


def test_adjacent_bands_tile_without_overlap_and_top_band_includes_nyquist():
  for size in (8, 32, 64):
    radius = noise.frequency_radius(size, size)
    limits = noise.band_limits([0.05 + 0.1 * i for i in range(10)], 0.1)
    assert limits[0][0] == 0.0 and limits[-1][1] > np.pi
    for (_, high), (low, _) in zip(limits[:-1], limits[1:]):
      assert high == low  # shared edge, bit for bit
    count = sum(noise._band_mask(radius, low, high, np).astype(int) for low, high in limits)
    np.testing.assert_array_equal(count, 1)  # every bin, DC and Nyquist included, exactly once


def test_batch_matches_per_image_and_is_batch_invariant():
  shape = SHAPE

  def batch(indices, seed=5, cid=2):
    return np.asarray(_batch_jit(seed, np.array(indices, np.int32),
                                 *_traced(cid, kind, low, high, rms), image_shape=shape))

  def single(index, seed=5, cid=2):
    return np.asarray(_perturbation_jit(seed, np.int32(index),
                                        *_traced(cid, kind, low, high, rms), shape=shape))

  for kind, low, high, rms in [(0, 0.25 * np.pi, 0.45 * np.pi, 0.1), (1, 0.0, 0.0, 0.05)]:
    first = batch([3, 7, 11])
    assert first.shape == (3,) + shape
    for row, index in enumerate([3, 7, 11]):
      np.testing.assert_allclose(first[row], single(index), rtol=1e-6, atol=1e-7)
    other = batch([11, 0, 3])  # same batch size: one compile
    np.testing.assert_allclose(other[0], first[2], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(other[2], first[0], rtol=1e-6, atol=1e-7)
    assert not np.allclose(first[0], first[1])
    assert not np.allclose(single(3, cid=3), first[0])
    assert not np.allclose(single(3, seed=6), first[0])


def test_kind_selects_band_or_white():
  shape = SHAPE
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(1), 4), 9)
  band = _perturbation_jit(1, np.int32(9), *_traced(4, 0, 0.25 * np.pi, 0.5 * np.pi, 0.1),
                           shape=shape)
  white = _perturbation_jit(1, np.int32(9), *_traced(4, 1, 0.25 * np.pi, 0.5 * np.pi, 0.1),
                            shape=shape)
  np.testing.assert_allclose(band, _band_noise_jit(key, shape, 0.25 * np.pi, 0.5 * np.pi, 0.1),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(white, jax.random.normal(key, shape) * 0.1, rtol=1e-6)
  with pytest.raises(ClmimError, match="kind"):
    noise.perturbation(1, 9, 4, 2, 0.0, 1.0, 0.1, shape)


def test_jit_with_traced_conditions_matches_eager():
  shape = SHAPE
  indices = jnp.array([0, 5, 9], jnp.int32)
  # Rows: condition id, kind, low, high, rms - as an analysis would sweep them.
  conditions = np.array([[0, 0, 0.05 * np.pi, 0.15 * np.pi, 0.1],
                         [4, 0, 0.45 * np.pi, 0.55 * np.pi, 0.03],
                         [9, 1, 0.0, 0.0, 0.2]], np.float32)

  def one(condition):
    return noise.batch_perturbation(11, indices, condition[0].astype(jnp.int32),
                                    condition[1].astype(jnp.int32), condition[2], condition[3],
                                    condition[4], shape)

  mapped = np.asarray(jax.jit(lambda c: jax.lax.map(one, c))(jnp.asarray(conditions)))
  for row, (cid, kind, low, high, rms) in enumerate(conditions):
    eager = np.asarray(noise.batch_perturbation(11, indices, int(cid), int(kind), float(low),
                                                float(high), float(rms), shape))
    traced = np.asarray(_batch_jit(11, indices, *_traced(cid, kind, low, high, rms),
                                   image_shape=shape))
    np.testing.assert_allclose(traced, eager, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mapped[row], eager, rtol=1e-5, atol=1e-7)


def test_check_bands_accepts_defaults():
  limits = noise.check_bands(32, CENTRES, 0.1, WHERE)
  assert len(limits) == 9
  np.testing.assert_allclose(np.array(limits) / np.pi,
                             [[c - 0.05, c + 0.05] for c in CENTRES], atol=1e-12)
  # Top band reaching π includes π.
  assert noise.check_bands(32, (0.95,), 0.1, WHERE)[0][1] > math.pi


@pytest.mark.parametrize("centre", [1.2, 0, -0.1, 1.0])
def test_check_bands_rejects_centres_outside(centre):
  with pytest.raises(ClmimError, match=r"outside \(0, π\)") as info:
    noise.check_bands(32, (0.1, centre), 0.1, WHERE)
  assert str(info.value).startswith(WHERE)


@pytest.mark.parametrize("centres,width,pattern", [
    ((), 0.1, "no band centres"),
    (("a",), 0.1, "finite numbers"),
    ((0.5, float("nan")), 0.1, "finite numbers"),
    ("0.5", 0.1, "sequence"),
    ((0.5,), 0, "width"),
    ((0.5,), 1.5, "width"),
    ((0.5,), -0.1, "width"),
])
def test_check_bands_rejects_bad_input(centres, width, pattern):
  with pytest.raises(ClmimError, match=pattern) as info:
    noise.check_bands(32, centres, width, WHERE)
  assert str(info.value).startswith(WHERE)


def test_check_bands_rejects_band_without_bins():
  # 8 px: bin radii are multiples of 2π/8 = 0.25π, so [0.30π, 0.45π) holds none.
  assert not _reference_mask(8, 0.3 * np.pi, 0.45 * np.pi).any()
  with pytest.raises(ClmimError, match=r"band 1 .*8x8 .*wider band") as info:
    noise.check_bands(8, (0.5, 0.375), 0.15, WHERE)
  assert str(info.value).startswith(WHERE)
  # The same band is fine at 32 px (bins every 0.0625π).
  assert len(noise.check_bands(32, (0.375,), 0.15, WHERE)) == 1


@pytest.mark.parametrize("values", [(), (0.1, -1), ("a",), (0.1, 0.0), (float("inf"),), "0.1"])
def test_check_strengths_rejects(values):
  with pytest.raises(ClmimError) as info:
    noise.check_strengths(values, "config.analysis_options.robustness.white")
  assert str(info.value).startswith("config.analysis_options.robustness.white")


def test_check_strengths_accepts():
  assert noise.check_strengths((0.01, 0.05, 1), "w") == [0.01, 0.05, 1.0]


def test_import_does_not_pull_tensorflow_or_pil():
  code = ("import sys, clmim.analysis.noise; "
          "bad = [m for m in ('tensorflow', 'PIL') if m in sys.modules]; "
          "assert not bad, bad")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", code], check=True, env=env,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- The robustness analysis shows the clean top-1 its drops are measured from -----------------

def test_measure_returns_the_clean_top1(monkeypatch):
  """30 of 40 evaluation images right without noise, 20 and 10 under the two bands, 25 under
  the white noise: clean top-1 0.75, drops 0.25, 0.5 and 0.125."""
  from clmim.analysis import probing, robustness
  depth, kinds, width, classes = 2, len(probing.KINDS), 8, 4
  probes = {"weights": np.zeros((depth, kinds, width, classes)),
            "bias": np.zeros((depth, kinds, classes)), "ridge": [[1.0] * kinds] * depth,
            "chance": 0.25, "train_data": "train"}
  monkeypatch.setattr(probing, "fitted_probes", lambda *args: {"shape": probes})
  evaluation = types.SimpleNamespace(
      images=types.SimpleNamespace(std=(0.5, 0.5, 0.5)), description="validation",
      labels=types.SimpleNamespace(columns=["shape"], values=np.zeros((40, 1), np.int32)))
  data = types.SimpleNamespace(targets=("shape",), evaluation=lambda: evaluation)
  passes = types.SimpleNamespace(run=lambda *args: {"clean": 30.0, "labelled_count": 40.0,
                                                   "noisy": np.array([20.0, 10.0, 25.0])})
  model = types.SimpleNamespace(name="m", vit=types.SimpleNamespace(depth=depth, image_size=32))
  options = {**robustness.OPTIONS, "bands": (0.25, 0.75), "band_width": 0.5,
             "white_rms": (0.1,)}
  out = robustness.measure(model, data, passes, options)
  assert out["robustness_clean_top1"] == 0.75
  assert out["band_noise_drop"] == [0.25, 0.5] and out["white_noise_drop"] == [0.125]
  assert {r.key for r in robustness.RESULTS} <= set(out) | {"num_images"}


def _robustness_results():
  details = {"band_centres": [0.25, 0.75], "band_width": 0.5, "band_rms": 0.1,
             "white_rms": [0.1], "target": "shape", "block": 2}
  models = {"cl_model": (0.75, [0.25, 0.5], [0.125]), "mim_model": (0.5, [0.1, 0.4], [0.2])}
  return {"num_images": 40, "analyses": {"robustness": {"options": {
              "bands": [0.25, 0.75], "white_rms": [0.1]}}},
          "models": {n: {"robustness_clean_top1": clean, "band_noise_drop": band,
                         "white_noise_drop": white, "robustness_details": details}
                     for n, (clean, band, white) in models.items()},
          "model_info": {"cl_model": {"family": "cl"}, "mim_model": {"family": "mim"}}}


def test_the_summary_and_the_figure_show_the_clean_top1():
  from clmim.analysis import robustness
  from clmim.jobs import report
  results = _robustness_results()
  text = report.summary(results, [robustness]).splitlines()
  at = text.index("clean top-1 of the noise probe (by condition):")
  assert text[at + 1].split() == ["model", "family", "clean"]
  assert text[at + 2].split() == ["cl_model", "cl", "0.750"]
  assert text[at + 3].split() == ["mim_model", "mim", "0.500"]
  figure = robustness.figures(results, {})["robustness.png"]
  legend = [t.get_text() for ax in figure.axes if ax.get_legend()
            for t in ax.get_legend().get_texts()]
  assert any("cl_model" in t and "clean top-1 0.750" in t for t in legend), legend
  assert any("mim_model" in t and "clean top-1 0.500" in t for t in legend), legend
