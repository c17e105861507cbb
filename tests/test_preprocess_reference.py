"""The whole input pipeline against reference resizes, on photo-like JPEGs the test writes.

Images go through what an analysis run uses (ImageFolder + EvalImages + worker threads) and are
compared with (a) the timm/torchvision eval transform spelt out with PIL and (b) PyTorch's
antialiased interpolation (an independent implementation of the same filters), for bilinear
and bicubic. Bound: mean absolute difference <= 1/255 in normalised units.
"""
import math

import ml_collections
import numpy as np
import pytest
from PIL import Image

from clmim.data import preprocess as pp
from clmim.data.eval_data import EvalImages

torch = pytest.importorskip("torch")

# ImageNet-like sizes and aspect ratios, one portrait, one grey.
SIZES = [(500, 375, "RGB"), (375, 500, "RGB"), (500, 333, "RGB"), (400, 300, "L")]
BOUND = 1 / 255


def _photo(w, h, seed):
  """Sky gradient, sun, textured hills with a hard horizon, sensor noise: photo statistics."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  y, x = yy / h, xx / w
  sky = np.stack([90 + 100 * y, 140 + 80 * y, 230 - 30 * y], -1)
  sun = ((x - 0.7) ** 2 + (y - 0.25) ** 2 < 0.006)[..., None] * np.array([120, 100, 0])
  horizon = 0.55 + 0.08 * np.sin(6 * x + seed) + 0.03 * np.sin(23 * x)
  grass = np.stack([60 + 40 * np.sin(40 * xx / w * 7) * np.cos(31 * yy / h * 5),
                    120 + 50 * rng.random((h, w)), 40 + 20 * y], -1)
  image = np.where((y > horizon)[..., None], grass, sky + sun)
  image += rng.normal(0, 6, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("photos")
  (root / "scenes").mkdir()
  for i, (w, h, mode) in enumerate(SIZES):
    Image.fromarray(_photo(w, h, i)).convert(mode).save(root / "scenes" / f"{i}.jpg",
                                                        quality=90)
  return root


def _pipeline(folder, interpolation, size, crop_pct):
  cfg = ml_collections.ConfigDict(dict(
      source="image_folder", path=str(folder), num_images=0, split="", seed=0,
      max_images_per_class=0, fraction_per_class=0.0, num_workers=2, crop_pct=crop_pct,
      interpolation=interpolation, mean="", std=""))
  images = EvalImages(cfg, {"image_size": size, "mean": "imagenet", "std": "imagenet"})
  return np.concatenate(list(images.batches(3)))


def _new_size(w, h, short):
  return (short, int(short * h / w)) if w <= h else (int(short * w / h), short)


def _normalise(pixels):
  x = np.asarray(pixels, np.float32) / np.float32(255)
  return (x - np.float32(pp.IMAGENET_MEAN)) / np.float32(pp.IMAGENET_STD)


def _crop(array, size):
  h, w = array.shape[:2]
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return array[top:top + size, left:left + size]


def _pil_reference(path, interpolation, size, crop_pct):
  with Image.open(path) as image:
    image = image.convert("RGB")
    new = _new_size(*image.size, math.floor(size / crop_pct))
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    return _normalise(_crop(np.asarray(image.resize(new, resample)), size))


def _torch_reference(path, interpolation, size, crop_pct, antialias=True):
  """torchvision's tensor path: float antialiased interpolation, rounded back to uint8."""
  with Image.open(path) as image:
    pixels = np.array(image.convert("RGB"))
  new_w, new_h = _new_size(pixels.shape[1], pixels.shape[0], math.floor(size / crop_pct))
  x = torch.from_numpy(pixels).permute(2, 0, 1)[None].double()
  y = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode=interpolation,
                                      antialias=antialias, align_corners=False)
  y = y.round().clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.uint8)
  return _normalise(_crop(y, size))


@pytest.mark.parametrize("interpolation,size,crop_pct", [("bicubic", 224, 0.875),
                                                         ("bilinear", 224, 0.875),
                                                         ("bicubic", 96, 0.9)])
def test_pipeline_matches_reference_resizes(folder, interpolation, size, crop_pct):
  got = _pipeline(folder, interpolation, size, crop_pct)
  paths = [folder / "scenes" / f"{i}.jpg" for i in range(len(SIZES))]
  assert got.shape == (len(SIZES), size, size, 3)
  for image, path in zip(got, paths):
    pil = _pil_reference(path, interpolation, size, crop_pct)
    assert np.abs(image - pil).mean() <= BOUND, path
    np.testing.assert_array_equal(image, pil)  # in fact bit-exact: PIL is the reference
    independent = np.abs(image - _torch_reference(path, interpolation, size, crop_pct))
    assert independent.mean() <= BOUND, (path, independent.mean() * 255)


def test_bound_catches_a_resize_without_antialiasing(folder):
  # The bound has teeth: the same interpolation without antialiasing (tf.image.resize's
  # default, or a naive port) fails it on every image when shrinking.
  got = _pipeline(folder, "bicubic", 96, 0.9)
  for image, i in zip(got, range(len(SIZES))):
    naive = _torch_reference(folder / "scenes" / f"{i}.jpg", "bicubic", 96, 0.9,
                             antialias=False)
    assert np.abs(image - naive).mean() > BOUND
