"""EvalPreprocess against a hand-written PIL pipeline (timm/torchvision eval semantics)."""
import math

import numpy as np
import pytest
from PIL import Image

from clmim.data import preprocess as pp
from clmim.errors import ClmimError


def _image(w, h, mode="RGB", seed=0):
  rng = np.random.default_rng(seed)
  # Smooth gradient plus noise, so resampling errors would show in every pixel.
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
  arr = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
  return Image.fromarray(arr, "RGB").convert(mode)


def _reference(img, size, crop_pct, resample, mean, std):
  """The timm eval transform spelt out step by step with PIL."""
  img = img.convert("RGB")
  short_new = math.floor(size / crop_pct)
  w, h = img.size
  if w <= h:
    new = (short_new, int(short_new * h / w))
  else:
    new = (int(short_new * w / h), short_new)
  img = img.resize(new, resample)
  top = int(round((new[1] - size) / 2.0))
  left = int(round((new[0] - size) / 2.0))
  img = img.crop((left, top, left + size, top + size))
  x = np.asarray(img, np.float32) / np.float32(255)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


@pytest.mark.parametrize("w,h", [(300, 200), (161, 500), (64, 64), (97, 33)])
@pytest.mark.parametrize("interp,resample", [("bilinear", Image.BILINEAR),
                                             ("bicubic", Image.BICUBIC)])
def test_matches_manual_pil_pipeline(w, h, interp, resample):
  img = _image(w, h, seed=w * h)
  for size, crop_pct in [(32, 0.875), (29, 0.9)]:
    out = pp.EvalPreprocess(size, crop_pct, interp)(img)
    ref = _reference(img, size, crop_pct, resample, pp.IMAGENET_MEAN, pp.IMAGENET_STD)
    assert out.dtype == np.float32 and out.shape == (size, size, 3)
    np.testing.assert_array_equal(out, ref)


def test_resize_shorter_and_half_stats():
  img = _image(161, 500)
  out = pp.EvalPreprocess(24, interpolation="bicubic", mean="half", std=pp.HALF,
                          resize_shorter=24)(img)
  # resize_shorter = image_size is crop_pct 1.
  ref = _reference(img, 24, 1.0, Image.BICUBIC, pp.HALF, pp.HALF)
  np.testing.assert_array_equal(out, ref)
  assert out.min() >= -1.0 and out.max() <= 1.0


def test_no_resize_when_already_at_size():
  img = _image(40, 32)
  p = pp.EvalPreprocess(32, crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1))
  # Shorter side already 32: only the centre crop applies (left = round(8 / 2) = 4).
  expected = np.asarray(img, np.float32)[:, 4:36] / np.float32(255)
  np.testing.assert_array_equal(p(img), expected)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA"])
def test_other_modes_convert_to_rgb(mode):
  img = _image(50, 70, mode=mode)
  out = pp.EvalPreprocess(16)(img)
  ref = _reference(img, 16, 0.875, Image.BILINEAR, pp.IMAGENET_MEAN, pp.IMAGENET_STD)
  np.testing.assert_array_equal(out, ref)
  if mode in ("L", "LA"):  # Grey in, three equal channels out (before normalisation).
    raw = pp.EvalPreprocess(16, mean=(0, 0, 0), std=(1, 1, 1))(img)
    np.testing.assert_array_equal(raw[..., 0], raw[..., 2])


def test_rgba_drops_alpha_and_16_bit_is_rescaled():
  arr = np.zeros((20, 20, 4), np.uint8)
  arr[..., 0] = 200
  arr[..., 3] = 0  # Fully transparent: the colour is kept, as PIL's convert('RGB') does.
  raw = pp.EvalPreprocess(16, crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1))
  np.testing.assert_allclose(raw(Image.fromarray(arr, "RGBA"))[..., 0], 200 / 255)
  deep = Image.fromarray(np.full((20, 20), 65535, np.uint16))
  assert deep.mode.startswith("I;16")
  np.testing.assert_allclose(raw(deep), 1.0)


def test_rgb_convertible_is_known_from_the_mode_alone():
  # What an image folder's header check asks before any pixel is decoded.
  for mode in ("RGB", "L", "P", "CMYK", "I;16", "I;16B", "F", "1", "RGBA"):
    assert pp.rgb_convertible(mode), mode
  assert not pp.rgb_convertible("La")  # PIL has no La -> RGB conversion
  with pytest.raises(ValueError):
    pp.to_rgb(Image.new("La", (2, 2)))


def test_bad_settings_raise_clmim_error_naming_the_field():
  with pytest.raises(ClmimError, match=r"interpolation.*'nearest'.*bicubic"):
    pp.EvalPreprocess(16, interpolation="nearest")
  with pytest.raises(ClmimError, match="crop_pct"):
    pp.EvalPreprocess(16, crop_pct=1.5)
  with pytest.raises(ClmimError, match="mean"):
    pp.EvalPreprocess(16, mean="imagenet21k")
  with pytest.raises(ClmimError, match="std"):
    pp.EvalPreprocess(16, std=(0.5, 0.0, 0.5))
  with pytest.raises(ClmimError, match="resize_shorter"):
    pp.EvalPreprocess(16, resize_shorter=8)
  with pytest.raises(ClmimError, match="PIL"):
    pp.EvalPreprocess(16)(np.zeros((16, 16, 3)))


