"""Fidelity to the official notebooks: the Fourier ΔlogA read-out and the attention-map figures."""
import math

import jax
import numpy as np
import pytest

import analysis_testing

from clmim.analysis import attention_maps, fourier
from clmim.errors import ClmimError

# ---------------------------------------------------------------- Fourier ΔlogA


def _official_readout(mean_log_amp):
  """The official notebooks' read-out, stated directly: roll by int(g/2) on both axes, then
  `diag()[int(g/2):]`, minus its first value. [states, g, g] -> [states, K]."""
  g = mean_log_amp.shape[-1]
  rows = []
  for f in mean_log_amp:
    shifted = np.roll(f, (int(g / 2), int(g / 2)), axis=(0, 1))
    latent = np.diag(shifted)[int(g / 2):]
    rows.append(latent - latent[0])
  return np.array(rows)


def _official_fourier(z):
  """Float64 re-statement of the official recipe for one state [B, g*g+1, C] -> [K]."""
  b, t, c = z.shape
  g = math.isqrt(t - 1)
  # The official code works on b c h w maps of the patch tokens (cls dropped).
  maps = np.asarray(z, np.float64)[:, 1:, :].reshape(b, g, g, c).transpose(0, 3, 1, 2)
  f = np.log(np.abs(np.fft.fft2(maps)) + 1e-6)
  f = np.roll(f, (int(g / 2), int(g / 2)), axis=(2, 3)).mean(axis=(0, 1))
  latent = np.diag(f)[int(g / 2):]
  return latent - latent[0]


@pytest.mark.parametrize("g, expected_len", [(7, 4), (8, 4), (14, 7)])
def test_the_read_out_frequencies_are_what_the_official_diag_reads(g, expected_len):
  # A spectrum whose entry names its own frequency: F[u, v] = 100 u + v (unshifted).
  u, v = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
  named = (100 * u + v)[None].astype(np.float64)
  read = _official_readout(named)[0] + named[0, 0, 0]  # the frequencies, DC not subtracted
  k = fourier.diagonal_frequencies(g)
  # 224 px / patch 32 = 7: the odd grid keeps k = g//2, the highest diagonal frequency it has.
  assert len(k) == expected_len
  np.testing.assert_array_equal(read, 100 * k + k)


def test_fourier_full_path_odd_grid_matches_float64_reference():
  rng = np.random.default_rng(7)
  g, b, c = 7, 5, 6
  zs = [rng.normal(size=(b, g * g + 1, c)).astype(np.float32) for _ in range(3)]
  ones = np.ones(b, np.float32)
  sums = jax.jit(lambda z, w: analysis_testing.partial_sums(fourier, z, None, w))
  # Two batches (3 + 2 images) accumulated, as the runner does over devices and steps.
  first = sums([z[:3] for z in zs], ones[:3])
  second = sums([z[3:] for z in zs], ones[3:])
  total = jax.tree.map(lambda u, v: np.asarray(u, np.float64) + np.asarray(v, np.float64),
                       first, second)
  res = analysis_testing.finalize(fourier, total)
  expected = np.array([_official_fourier(z) for z in zs])
  assert expected.shape == (3, g - g // 2)
  np.testing.assert_allclose(res["fourier_all_states"], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(res["fourier"], expected[0::2], rtol=1e-5, atol=1e-6)


def test_fourier_odd_grid_reports_its_highest_diagonal_frequency():
  g, c = 7, 3
  x, y = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
  # Energy only at (g//2, g//2): the frequency a g//2-long read-out used to leave out.
  stripes = np.cos(2 * np.pi * (g // 2) * (x + y) / g)
  z = np.zeros((1, g * g + 1, c), np.float32)
  z[0, 1:, :] = stripes.reshape(-1, 1)
  sums = analysis_testing.partial_sums(fourier, [z], None, np.ones(1, np.float32))
  delta = np.array(analysis_testing.finalize(fourier, sums)["fourier"][0])
  assert len(delta) == g // 2 + 1
  assert np.argmax(delta) == g // 2 and delta[-1] > 10


# ---------------------------------------------------------------- attention-map figures

G = 3
QX, QY = 2, 1


def _known_maps():
  """Two heads for query (x=2, y=1) on a 3x3 grid: head 0 one-hot on patch (0, 0), head 1
  uniform. Returns (maps [1, 2, 3, 3], head 0's expected map, head 1's expected map)."""
  attn = np.zeros((1, 2, G * G + 1, G * G + 1))
  attn[:, :, :, 0] = 0.5                        # cls mass: dropped and renormalised away
  attn[0, 0, 1 + QY * G + QX, 1 + 0] = 0.5      # head 0 -> key patch (0, 0)
  attn[0, 1, 1 + QY * G + QX, 1:] = 0.5 / (G * G)
  one_hot = np.zeros((G, G))
  one_hot[0, 0] = 1.0
  return attention_maps.query_attention_map(attn, QX, QY), one_hot, np.full((G, G), 1 / (G * G))


def test_panels_known_answers():
  maps, one_hot, uniform = _known_maps()
  [(title, mean)] = attention_maps.panels({"m": maps})  # default: today's head mean
  assert title == "m"
  np.testing.assert_allclose(mean[0], (one_hot + uniform) / 2)
  [(title, head0)] = attention_maps.panels({"m": maps}, heads=0)
  assert title == "m, head 0"
  np.testing.assert_array_equal(head0[0], one_hot)
  [(_, head1)] = attention_maps.panels({"m": maps}, heads=np.int64(1))
  np.testing.assert_allclose(head1[0], uniform)
  every = attention_maps.panels({"a": maps, "b": maps[:, ::-1]}, heads="all")
  assert [t for t, _ in every] == ["a, head 0", "a, head 1", "b, head 0", "b, head 1"]
  for (_, got), want in zip(every, [one_hot, uniform, uniform, one_hot]):
    np.testing.assert_allclose(got[0], want)


@pytest.mark.parametrize("heads", ["max", "Mean", "", 2, -1, 1.0, True, None, [0]])
def test_bad_heads_raise(heads):
  maps, _, _ = _known_maps()
  with pytest.raises(ClmimError, match="heads=") as info:
    attention_maps.panels({"m": maps}, heads=heads)
  assert "'mean'" in str(info.value) and "'all'" in str(info.value)
  if heads in (2, -1):
    assert "0..1" in str(info.value) and "'m'" in str(info.value)
  with pytest.raises(ClmimError, match="heads="):
    attention_maps.plot_query_attention(np.zeros((1, 6, 6, 3)), {"m": maps}, QX, QY, 2,
                                        "/nonexistent/never_written.png", heads=heads)


def test_all_heads_figure_has_one_column_per_head_per_model(tmp_path):
  maps, one_hot, uniform = _known_maps()
  maps = np.concatenate([maps, maps[:, ::-1]])  # two images; image 1 has the heads swapped
  images = np.zeros((2, 6, 6, 3))
  patch = 2
  figure = attention_maps.query_attention_figure(images, {"a": maps, "b": maps}, QX, QY, patch,
                                                 heads="all")
  drawn = [axis for axis in figure.axes if axis.images]
  assert len(drawn) == 2 * (1 + 2 * 2)  # per image row: the image, then 2 models x 2 heads
  assert [axis.get_title() for axis in drawn[1:5]] == ["a, head 0", "a, head 1",
                                                       "b, head 0", "b, head 1"]
  # What is drawn is the head's own map, row by row (image 1 swaps the heads).
  np.testing.assert_array_equal(np.asarray(drawn[1].images[0].get_array()), one_hot)
  np.testing.assert_allclose(np.asarray(drawn[2].images[0].get_array()), uniform)
  np.testing.assert_allclose(np.asarray(drawn[6].images[0].get_array()), uniform)
  np.testing.assert_array_equal(np.asarray(drawn[7].images[0].get_array()), one_hot)
  # The query is outlined at its true place and size in pixels.
  [rectangle] = drawn[0].patches
  assert rectangle.get_xy() == (QX * patch - 0.5, QY * patch - 0.5)
  assert (rectangle.get_width(), rectangle.get_height()) == (patch, patch)
  path = attention_maps.plot_query_attention(images, {"a": maps}, QX, QY, patch,
                                             str(tmp_path / "all.png"), heads="all")
  assert (tmp_path / "all.png").stat().st_size > 1000 and path == str(tmp_path / "all.png")
