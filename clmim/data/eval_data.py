"""Evaluation image streams for the analyses, preprocessed the way each model expects.

`config.data.source` selects the images: "synthetic" (procedural shapes x textures, held-out
split, no download) or "image_folder" (class sub-folders of PNG/JPEG files). Preprocessing comes
from the model (its manifest: image size, mean/std, interpolation) unless the config overrides it.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from clmim.data import preprocess as pp
from clmim.data.image_folder import ImageFolder
from clmim.data.synthetic import ShapesTextures
from clmim.errors import ClmimError

SOURCES = ("synthetic", "image_folder")


def _mean_std(preprocessing: dict, data_cfg):
  """The config's mean/std, or the model's own when the config leaves them empty."""
  mean = data_cfg.get("mean") or preprocessing.get("mean", "imagenet")
  std = data_cfg.get("std") or preprocessing.get("std", "imagenet")
  return (np.asarray(pp.resolve_stats(mean, "mean", "config.data"), np.float32),
          np.asarray(pp.resolve_stats(std, "std", "config.data"), np.float32))


class EvalImages:
  """A finite, ordered image source for one model; `batches(batch_size)` yields float32 arrays."""

  def __init__(self, data_cfg, preprocessing: dict):
    source = data_cfg.source
    if source not in SOURCES:
      raise ClmimError(f"config.data.source={source!r}: expected one of {SOURCES}.")
    size = int(preprocessing.get("image_size", 224))
    self.mean, self.std = _mean_std(preprocessing, data_cfg)
    self.limit = int(data_cfg.num_images) or None
    if source == "synthetic":
      self.dataset = ShapesTextures(size, data_cfg.split, self.limit or 512, data_cfg.seed)
      self.description = (f"synthetic shapes x textures, split {data_cfg.split!r}, seed "
                          f"{data_cfg.seed}, {size} px")
    else:
      if not data_cfg.path:
        raise ClmimError("config.data.path is empty: set it to an image folder "
                         "(one sub-folder per class).")
      transform = pp.EvalPreprocess(
          size, crop_pct=float(data_cfg.crop_pct or preprocessing.get("crop_pct", 0.875)),
          interpolation=data_cfg.interpolation or preprocessing.get("interpolation", "bicubic"),
          mean=tuple(self.mean), std=tuple(self.std), where="config.data")
      self.dataset = ImageFolder(data_cfg.path, transform,
                                 max_images_per_class=data_cfg.max_images_per_class or None)
      self.description = f"image folder {data_cfg.path} ({len(self.dataset)} images), {size} px"

  def __len__(self) -> int:
    return min(len(self.dataset), self.limit or len(self.dataset))

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    if isinstance(self.dataset, ShapesTextures):
      for batch in self.dataset.batches(batch_size, len(self)):
        yield (batch["image"] - self.mean) / self.std
    else:
      for images, _ in self.dataset.batches(batch_size, len(self)):
        yield images
