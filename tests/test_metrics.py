"""Known answers and float64 references for attention distance, NMI/entropy and Fourier ΔlogA."""
import itertools
import math
import os

import jax
import numpy as np
import pytest

import analysis_testing

from clmim.analysis import attention_distance, fourier, nmi
from clmim.errors import ClmimError


def _with_cls(patch_attn, cls_mass=0.3):
  """Embeds [B, H, N, N] patch attention in [B, H, N+1, N+1] maps that also attend to cls.

  The cls row/column carry mass the metrics must drop (and renormalise away).
  """
  b, h, n, _ = patch_attn.shape
  full = np.full((b, h, n + 1, n + 1), 1.0 / (n + 1))
  full[:, :, 1:, 0] = cls_mass
  full[:, :, 1:, 1:] = (1 - cls_mass) * patch_attn
  return full.astype(np.float32)


def _random_softmax(rng, b, h, t):
  logits = rng.normal(size=(b, h, t, t)) * np.linspace(0.3, 4.0, h)[None, :, None, None]
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _finalize(module, zs, attns, patch_size=4, weights=None):
  b = (attns or zs)[0].shape[0]
  weights = np.ones(b, np.float32) if weights is None else np.asarray(weights, np.float32)
  sums = jax.jit(lambda z, a, w: analysis_testing.partial_sums(module, z, a, w, patch_size))(
      zs, attns, weights)
  return analysis_testing.finalize(module, sums)


# ---------------------------------------------------------------- float64 references (loops)


def _ref_distance(attn, patch_size):
  b, h, t, _ = attn.shape
  n = t - 1
  g = math.isqrt(n)
  out = np.zeros((b, h))
  for bi, hi in itertools.product(range(b), range(h)):
    a = attn[bi, hi, 1:, 1:].astype(np.float64) + 1e-32
    a /= a.sum(-1, keepdims=True)
    total = 0.0
    for q in range(n):
      for k in range(n):
        dq = math.dist((q // g, q % g), (k // g, k % g))
        total += a[q, k] * patch_size * dq
    out[bi, hi] = total / n
  return out.mean(0)


def _ref_nmi_entropy(attn):
  b, h, t, _ = attn.shape
  n = t - 1
  nmis, ents = np.zeros((b, h)), np.zeros((b, h))
  for bi, hi in itertools.product(range(b), range(h)):
    a = attn[bi, hi, 1:, 1:].astype(np.float64) + 1e-8
    a /= a.sum(-1, keepdims=True)
    p_q = np.full(n, 1.0 / n)
    p_k = (p_q[:, None] * a).sum(0)
    mi = sum(p_q[q] * a[q, k] * math.log(a[q, k] / p_k[k]) for q in range(n) for k in range(n))
    h_k = -sum(p * math.log(p) for p in p_k)
    nmis[bi, hi] = mi / math.sqrt(math.log(n) * h_k)
    ents[bi, hi] = np.mean([-sum(x * math.log(x) for x in row) for row in a]) / math.log(n)
  return nmis.mean(0), ents.mean(0)


def _ref_fourier(z):
  b, t, c = z.shape
  g = math.isqrt(t - 1)
  maps = z[:, 1:, :].astype(np.float64).reshape(b, g, g, c)
  f = np.log(np.abs(np.fft.fft2(maps, axes=(1, 2))) + 1e-6)
  f = np.fft.fftshift(f, axes=(1, 2)).mean(axis=(0, 3))
  diag = np.array([f[g // 2 + k, g // 2 + k] for k in range(g - g // 2)])  # diag()[g//2:]
  return diag - diag[0]


# ---------------------------------------------------------------- known answers


def test_identity_attention():
  g, b, h = 4, 2, 3
  attn = _with_cls(np.broadcast_to(np.eye(g * g), (b, h, g * g, g * g)))
  res = _finalize(attention_distance, None, [attn, attn])
  np.testing.assert_allclose(res["attention_distance"], 0, atol=1e-6)
  res = _finalize(nmi, None, [attn])
  np.testing.assert_allclose(res["nmi"], 1, atol=1e-4)
  np.testing.assert_allclose(res["attention_entropy"], 0, atol=1e-4)


def test_uniform_attention():
  g, patch = 8, 4
  n = g * g
  attn = _with_cls(np.full((2, 2, n, n), 1.0 / n))
  coords = [(i // g, i % g) for i in range(n)]
  brute = patch * np.mean([math.dist(p, q) for p in coords for q in coords])
  assert brute == pytest.approx(16.5459, abs=1e-3)  # mean pairwise distance, 8x8 grid, 4 px
  res = _finalize(attention_distance, None, [attn], patch_size=patch)
  np.testing.assert_allclose(res["attention_distance"], brute, rtol=1e-6)
  res = _finalize(nmi, None, [attn])
  np.testing.assert_allclose(res["nmi"], 0, atol=1e-6)
  np.testing.assert_allclose(res["attention_entropy"], 1, atol=1e-6)


def test_collapse_to_one_key():
  n = 16
  one_key = np.zeros((2, 2, n, n))
  one_key[..., 5] = 1.0
  res = _finalize(nmi, None, [_with_cls(one_key)])
  # Every query attends alike: no information. (0/0-like: H(K) ~ 1e-6, so ~1e-5 is float32 noise.)
  np.testing.assert_allclose(res["nmi"], 0, atol=1e-4)
  np.testing.assert_allclose(res["attention_entropy"], 0, atol=1e-4)


def test_fourier_constant_map_has_no_high_frequencies():
  g, c, value = 8, 5, 3.0
  z = np.full((2, g * g + 1, c), value, np.float32)
  res = _finalize(fourier, [z, z, z], None)
  expected = math.log(1e-6) - math.log(value * g * g + 1e-6)  # ≈ -19.1
  assert np.shape(res["fourier"]) == (2, g // 2)
  assert np.shape(res["fourier_all_states"]) == (3, g // 2)
  np.testing.assert_allclose(np.array(res["fourier"])[:, 1:], expected, rtol=1e-4)
  np.testing.assert_allclose(np.array(res["fourier"])[:, 0], 0, atol=1e-6)


def test_fourier_checkerboard():
  g, c = 8, 3
  x, y = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
  # Diagonal checkerboard-like stripes at the highest frequency the half-diagonal reports.
  k_top = g // 2 - 1
  stripes = np.cos(2 * np.pi * k_top * (x + y) / g)
  z = np.zeros((1, g * g + 1, c), np.float32)
  z[0, 1:, :] = stripes.reshape(-1, 1)
  delta = np.array(_finalize(fourier, [z], None)["fourier"][0])
  assert np.argmax(delta) == g // 2 - 1 and delta[-1] > 10
  # A true ±1 checkerboard puts everything at the Nyquist frequency (g/2, g/2), which the
  # half-diagonal (k < g/2) leaves out: every read-out frequency, DC included, sits at the
  # floor, so the curve is flat (while a full FFT's maximum is at (g/2, g/2)).
  z[0, 1:, :] = ((-1.0) ** (x + y)).reshape(-1, 1)
  full = np.abs(np.fft.fft2(((-1.0) ** (x + y))))
  assert np.unravel_index(np.argmax(full), full.shape) == (g // 2, g // 2)
  log_amp = np.asarray(fourier.log_amplitude(jax.numpy.asarray(z)))[0]
  np.testing.assert_allclose(log_amp, np.log(1e-6), atol=0.5)
  np.testing.assert_allclose(_finalize(fourier, [z], None)["fourier"][0], 0, atol=0.5)


# ---------------------------------------------------------------- float64 references


def test_metrics_match_float64_reference():
  rng = np.random.default_rng(0)
  g, b, h, c = 5, 3, 4, 6  # odd g exercises the fft shift on an odd grid
  attns = [_random_softmax(rng, b, h, g * g + 1) for _ in range(2)]
  zs = [rng.normal(size=(b, g * g + 1, c)).astype(np.float32) for _ in range(3)]
  weights = np.array([1, 1, 1], np.float32)
  res = _finalize(attention_distance, zs, attns, patch_size=7, weights=weights)
  expected = [_ref_distance(a, 7) for a in attns]
  np.testing.assert_allclose(res["attention_distance"], expected, rtol=1e-5)
  res = _finalize(nmi, zs, attns)
  ref = [_ref_nmi_entropy(a) for a in attns]
  np.testing.assert_allclose(res["nmi"], [r[0] for r in ref], rtol=1e-5)
  np.testing.assert_allclose(res["attention_entropy"], [r[1] for r in ref], rtol=1e-5)
  res = _finalize(fourier, zs, attns)
  expected = np.array([_ref_fourier(z) for z in zs])
  np.testing.assert_allclose(res["fourier_all_states"], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(res["fourier"], expected[0::2], rtol=1e-5, atol=1e-6)


def test_weights_mask_images():
  rng = np.random.default_rng(1)
  attn = _random_softmax(rng, 4, 2, 17)
  z = rng.normal(size=(4, 17, 3)).astype(np.float32)
  garbage_attn, garbage_z = attn.copy(), z.copy()
  garbage_attn[2:] = np.nan
  garbage_z[2:] = np.inf
  for module in (attention_distance, nmi, fourier):
    want = _finalize(module, [z[:2]], [attn[:2]])
    got = _finalize(module, [garbage_z], [garbage_attn], weights=[1, 1, 0, 0])
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7)


def test_errors():
  with pytest.raises(ClmimError):
    analysis_testing.partial_sums(attention_distance, None, [np.zeros((1, 1, 6, 6), np.float32)],
                                  np.ones(1))
  with pytest.raises(ClmimError):
    analysis_testing.finalize(nmi, {"nmi_sum": np.zeros((1, 1)), "entropy_sum": np.zeros((1, 1)),
                                    "count": 0.0})


def test_query_attention_map_known_answer(tmp_path):
  from clmim.analysis import attention_maps
  g = 3
  attn = np.zeros((1, 2, g * g + 1, g * g + 1))
  attn[:, :, :, 0] = 0.5                      # half of every row on cls: dropped, renormalised
  attn[0, 0, 1 + 1 * g + 2, 1 + 0] = 0.5     # head 0: query (x=2, y=1) looks at patch (0, 0)
  attn[0, 1, 1 + 1 * g + 2, 1:] = 0.5 / (g * g)
  maps = attention_maps.query_attention_map(attn, x=2, y=1)
  assert maps.shape == (1, 2, g, g)
  assert maps[0, 0, 0, 0] == 1.0 and maps[0, 0].sum() == 1.0
  np.testing.assert_allclose(maps[0, 1], 1 / (g * g))
  with pytest.raises(ClmimError):
    attention_maps.query_attention_map(attn, x=3, y=0)
  path = attention_maps.plot_query_attention(np.zeros((1, 6, 6, 3)), {"m": maps}, 2, 1, 2,
                                             str(tmp_path / "maps.png"))
  assert os.path.getsize(path) > 1000
