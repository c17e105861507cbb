"""Evaluation preprocessing: resize shorter side, centre crop, normalise (PIL in, numpy out).

The semantics follow timm's `transforms_imagenet_eval` with its default centre-crop mode, i.e.
torchvision's `Resize(int)` + `CenterCrop` + `ToTensor` + `Normalize`, so that features computed
here match the ones PyTorch checkpoints were evaluated with:

  1. convert to RGB;
  2. resize the shorter side to floor(image_size / crop_pct) (or `resize_shorter`), the longer side
     to int(new_short * long / short), with PIL's antialiased resampling;
  3. centre crop image_size x image_size, offsets int(round((size - crop) / 2));
  4. scale to [0, 1] and normalise per channel, in float32.

The output is channels-last [H, W, 3] float32, the layout the Flax models take.

Pillow is optional (only image folders and TFDS splits need it, not the procedural data): it is
imported on first use through `pil_image`, which says how to install it when it is missing.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np

from clmim.errors import ClmimError
# The normalisation statistics live with the models (clmim/models/input_stats.py), which the
# analyses may read; they are used here under their usual names.
from clmim.models.input_stats import (  # noqa: F401
    HALF, IMAGENET_MEAN, IMAGENET_STD, Stats, resolve_stats)

if TYPE_CHECKING:  # annotations only: importing this module must not need Pillow
  from PIL import Image

# Names of PIL's `Image.Resampling` members, looked up when an image is resized (not at import,
# so that validating a config does not need Pillow).
_INTERPOLATIONS = {"bilinear": "BILINEAR", "bicubic": "BICUBIC"}
# The pip requirement named when Pillow is missing (the pin of requirements.txt).
PILLOW_REQUIREMENT = "pillow==13.0.0"


def pil_image(needed_for: str):
  """Returns the `PIL.Image` module, importing Pillow on first use.

  Args:
    needed_for: what needs Pillow, for the error message (e.g. "reading image folders").

  Raises:
    ClmimError: one line naming Pillow, `needed_for` and the pip command, when it is missing.
  """
  try:
    from PIL import Image
  except ImportError as e:
    raise ClmimError(f"{needed_for} needs Pillow (PIL), which is not installed: "
                     f"pip install {PILLOW_REQUIREMENT}") from e
  return Image


def to_rgb(image: Image.Image) -> Image.Image:
  """Returns `image` as an RGB PIL image (L, LA, RGBA, P, CMYK, I;16, ... accepted).

  Alpha is dropped, not composited, as `PIL.Image.convert('RGB')` (and so timm/torchvision) does.
  """
  if image.mode == "RGB":
    return image
  if image.mode == "P" and "transparency" in image.info:
    # Going through RGBA gives the same RGB values and avoids PIL's palette-transparency warning.
    image = image.convert("RGBA")
  if image.mode.startswith("I;16") or image.mode in ("I", "F"):
    # PIL would clip 16-bit / float values at 255; rescale to the 8-bit range instead.
    arr = np.asarray(image, dtype=np.float64)
    hi = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
    arr = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
    image = pil_image("converting images to RGB").fromarray(arr, mode="L")
  return image.convert("RGB")


_CONVERTIBLE = {}  # PIL mode -> whether `to_rgb` converts it (found by trying, once per mode)


def rgb_convertible(mode: str) -> bool:
  """Whether `to_rgb` can convert an image of PIL mode `mode` (tried on a 1x1 image, so a
  header check can tell before any pixel is decoded)."""
  if mode not in _CONVERTIBLE:
    Image = pil_image("converting images to RGB")  # the module, under its usual name
    try:
      to_rgb(Image.new(mode, (1, 1)))
      _CONVERTIBLE[mode] = True
    except (ValueError, OSError, KeyError):  # e.g. "conversion from La to L not supported"
      _CONVERTIBLE[mode] = False
  return _CONVERTIBLE[mode]


class EvalPreprocess:
  """Callable mapping a PIL image to a normalised float32 array [image_size, image_size, 3].

  Attributes:
    image_size: side of the square output.
    resize_to: the shorter side after resizing (floor(image_size / crop_pct) by default).
    interpolation: 'bilinear' or 'bicubic'.
    mean, std: per-channel normalisation in [0, 1] pixel units.
  """

  def __init__(self, image_size: int, crop_pct: float = 0.875, interpolation: str = "bilinear",
               mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD,
               resize_shorter: Optional[int] = None, *, where: str = "preprocess"):
    """Validates the settings; `where` names the config they came from in error messages."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
        or image_size <= 0:
      raise ClmimError(f"{where}.image_size = {image_size!r}: expected a positive integer.")
    self.image_size = int(image_size)
    if resize_shorter is None:
      try:
        pct = float(crop_pct)
      except (TypeError, ValueError):
        pct = float("nan")
      if not 0.0 < pct <= 1.0:
        raise ClmimError(f"{where}.crop_pct = {crop_pct!r}: expected a number in (0, 1].")
      self.crop_pct = pct
      self.resize_to = math.floor(self.image_size / pct)
    else:
      if isinstance(resize_shorter, bool) or not isinstance(resize_shorter, (int, np.integer)) \
          or resize_shorter < self.image_size:
        # torchvision would zero-pad here; for an evaluation that is always a config mistake.
        raise ClmimError(f"{where}.resize_shorter = {resize_shorter!r}: expected an integer "
                         f">= image_size ({self.image_size}).")
      self.resize_to = int(resize_shorter)
      self.crop_pct = self.image_size / self.resize_to
    key = interpolation.lower() if isinstance(interpolation, str) else interpolation
    if key not in _INTERPOLATIONS:
      raise ClmimError(f"{where}.interpolation = {interpolation!r}: expected one of "
                       f"{sorted(_INTERPOLATIONS)}.")
    self.interpolation = key
    self.mean = resolve_stats(mean, "mean", where)
    self.std = resolve_stats(std, "std", where)
    self._mean = np.asarray(self.mean, np.float32)
    self._std = np.asarray(self.std, np.float32)

  @property
  def output_shape(self) -> Tuple[int, int, int]:
    """Shape of one preprocessed image, [H, W, 3]."""
    return (self.image_size, self.image_size, 3)

  def resize_and_crop(self, image: Image.Image) -> Image.Image:
    """Steps 1-3: RGB conversion, shorter-side resize and centre crop; returns a PIL image."""
    image = to_rgb(image)
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = self.resize_to, int(self.resize_to * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
      resampling = pil_image("resizing images").Resampling[_INTERPOLATIONS[self.interpolation]]
      image = image.resize((new_w, new_h), resample=resampling)
    crop = self.image_size
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))

  def __call__(self, image: Image.Image) -> np.ndarray:
    """Returns the preprocessed image, float32 [image_size, image_size, 3]."""
    if not isinstance(image, pil_image("preprocessing images (EvalPreprocess)").Image):
      raise ClmimError(f"EvalPreprocess expects a PIL.Image.Image, got {type(image).__name__}.")
    x = np.asarray(self.resize_and_crop(image), dtype=np.float32) / np.float32(255.0)
    # Same float32 op order as torchvision's ToTensor + Normalize.
    return (x - self._mean) / self._std

  def __repr__(self):
    return (f"EvalPreprocess(image_size={self.image_size}, resize_to={self.resize_to}, "
            f"interpolation={self.interpolation!r}, mean={self.mean}, std={self.std})")
