"""resample_grid against torch's bicubic interpolate, with and without antialiasing."""
import numpy as np
import pytest

from clmim.errors import ClmimError
from clmim.models.resample import resample_grid

_CASES = [(4, 7), (7, 4), (14, 16), (16, 14), (5, 5), (3, 10), (10, 3), (4, (6, 3))]


def _torch_resample(table, g, size, antialias):
  torch = pytest.importorskip("torch")
  x = torch.from_numpy(np.ascontiguousarray(table.T)).reshape(1, table.shape[1], g, g)
  y = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False,
                                      antialias=antialias)
  return y[0].permute(1, 2, 0).reshape(size[0] * size[1], table.shape[1]).numpy()


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("g,to_grid", _CASES)
def test_matches_torch(g, to_grid, antialias):
  size = (to_grid, to_grid) if isinstance(to_grid, int) else to_grid
  table = np.random.default_rng(g * 100 + size[0] * 10 + size[1]).standard_normal(
      (g * g, 8)).astype(np.float32)
  got = resample_grid(table, to_grid, antialias=antialias)
  assert got.shape == (size[0] * size[1], 8) and got.dtype == np.float32
  want = _torch_resample(table, g, size, antialias)
  assert np.abs(got - want).max() <= 1e-5 * np.abs(table).max()


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("g,to_grid", [(14, 16), (16, 14), (4, (6, 3))])
def test_float64_weights_are_torchs(g, to_grid, antialias):
  """In float64 torch agrees to ~1e-15: the float32 differences are torch's own round-off."""
  size = (to_grid, to_grid) if isinstance(to_grid, int) else to_grid
  table = np.random.default_rng(0).standard_normal((g * g, 8))
  want = _torch_resample(table, g, size, antialias)
  # The float32 output's error is round-off of the output alone, well under the float32 cases'.
  assert np.abs(resample_grid(table, to_grid, antialias=antialias) - want).max() <= 1e-6


@pytest.mark.parametrize("antialias", [False, True])
def test_same_grid_is_identity_and_constant_stays_constant(antialias):
  table = np.random.default_rng(1).standard_normal((25, 8)).astype(np.float32)
  np.testing.assert_array_equal(resample_grid(table, 5, antialias=antialias), table)
  constant = np.full((16, 8), 0.375, np.float32)
  for to_grid in (7, 3, (6, 2), 1):
    out = resample_grid(constant, to_grid, antialias=antialias)
    np.testing.assert_allclose(out, 0.375, rtol=0, atol=1e-6)


def test_rejects_bad_tables_and_targets():
  with pytest.raises(ClmimError, match="square grid"):
    resample_grid(np.zeros((10, 8), np.float32), 4)
  with pytest.raises(ClmimError, match="square grid"):
    resample_grid(np.zeros((0, 8), np.float32), 4)
  with pytest.raises(ClmimError, match=r"\[tokens, dim\]"):
    resample_grid(np.zeros((1, 16, 8), np.float32), 4)
  with pytest.raises(ClmimError, match="at least 1x1"):
    resample_grid(np.zeros((16, 8), np.float32), (0, 3))


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("g,out", [(37, 16), (16, 37), (7, 10), (10, 7)])
def test_offset_matches_torchs_scale_factor_call(g, out, antialias):
  """The official DINOv2 call: scale_factor=(out + 0.1) / g instead of size=out."""
  torch = pytest.importorskip("torch")
  table = np.random.default_rng(g + out).standard_normal((g * g, 8))
  x = torch.from_numpy(np.ascontiguousarray(table.T)).reshape(1, 8, g, g)
  scale = (out + 0.1) / g
  y = torch.nn.functional.interpolate(x, scale_factor=(scale, scale), mode="bicubic",
                                      align_corners=False, antialias=antialias)
  assert y.shape[-2:] == (out, out)
  want = y[0].permute(1, 2, 0).reshape(out * out, 8).numpy()
  got = resample_grid(table, out, antialias=antialias, offset=0.1)
  assert np.abs(got - want).max() <= 1e-6
  assert np.abs(got - resample_grid(table, out, antialias=antialias)).max() > 1e-3  # it matters
