"""Evaluation image streams for the analyses, preprocessed the way each model expects.

`config.data.source` selects the images: "synthetic" (procedural shapes x textures, held-out
split, no download), "image_folder" (class sub-folders of PNG/JPEG files) or "tfds" (a
TensorFlow Datasets split, e.g. imagenet2012 validation; see clmim/data/tfds_source.py).
Preprocessing comes from the model (its manifest: image size, crop_pct, interpolation,
mean/std) unless the config overrides it.

An `EvalImages` is a fixed, ordered list of images (after per-class subsampling and the
num_images cap). `load_batches(indices, ...)` reads any sub-list of it in parallel worker
threads, which is how each process of a multi-host run reads only its own shard.
"""
from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import numpy as np

from clmim.data import loader
from clmim.data import preprocess as pp
from clmim.data.image_folder import ImageFolder
from clmim.data.synthetic import ShapesTextures
from clmim.errors import ClmimError

SOURCES = ("synthetic", "image_folder", "tfds")


def _mean_std(preprocessing: dict, data_cfg):
  """The config's mean/std, or the model's own when the config leaves them empty."""
  mean = data_cfg.get("mean") or preprocessing.get("mean", "imagenet")
  std = data_cfg.get("std") or preprocessing.get("std", "imagenet")
  return (np.asarray(pp.resolve_stats(mean, "mean", "config.data"), np.float32),
          np.asarray(pp.resolve_stats(std, "std", "config.data"), np.float32))


def _subsampling(data_cfg) -> Tuple[int, float, str]:
  """(max per class, fraction per class, a phrase for the description) from the config."""
  per_class = int(data_cfg.get("max_images_per_class", 0) or 0)
  fraction = float(data_cfg.get("fraction_per_class", 0.0) or 0.0)
  if per_class and fraction:
    raise ClmimError("config.data: set max_images_per_class or fraction_per_class, not both.")
  if per_class:
    return per_class, 0.0, f", first {per_class} per class"
  if fraction:
    return 0, fraction, f", first {fraction:g} of each class"
  return 0, 0.0, ""


class EvalImages:
  """A finite, ordered image source for one model.

  Attributes:
    description: one line naming the data (source, split or folder, count, resolution).
    image_shape: [H, W, 3] of every preprocessed image.
    mean, std: the normalisation used (float32 [3]).
  """

  def __init__(self, data_cfg, preprocessing: dict):
    """Opens the source and selects the images; every input problem raises a ClmimError."""
    source = data_cfg.source
    if source not in SOURCES:
      raise ClmimError(f"config.data.source={source!r}: expected one of {SOURCES}.")
    size = int(preprocessing.get("image_size", 224))
    self.image_shape = (size, size, 3)
    self.mean, self.std = _mean_std(preprocessing, data_cfg)
    self.num_workers = int(data_cfg.get("num_workers", 0) or 0) or loader.default_num_workers()
    limit = int(data_cfg.num_images) or None
    self._stream = None
    if source == "synthetic":
      self.dataset = ShapesTextures(size, data_cfg.split, limit or 512, data_cfg.seed)
      self._load = self._synthetic
      positions = np.arange(len(self.dataset))
      self.description = (f"synthetic shapes x textures, split {data_cfg.split!r}, seed "
                          f"{data_cfg.seed}, {size} px")
    else:
      transform = pp.EvalPreprocess(
          size, crop_pct=float(data_cfg.crop_pct or preprocessing.get("crop_pct", 0.875)),
          interpolation=data_cfg.interpolation or preprocessing.get("interpolation", "bicubic"),
          mean=tuple(self.mean), std=tuple(self.std), where="config.data")
      per_class, fraction, subsampled = _subsampling(data_cfg)
      if source == "image_folder":
        if not data_cfg.path:
          raise ClmimError("config.data.path is empty: set it to an image folder "
                           "(one sub-folder per class).")
        self.dataset = ImageFolder(data_cfg.path, transform,
                                   max_images_per_class=per_class or None,
                                   fraction_per_class=fraction or None,
                                   num_workers=self.num_workers)
        self._load = self.dataset.load
        positions = np.arange(len(self.dataset))
        what = f"image folder {data_cfg.path}"
      else:
        from clmim.data.tfds_source import TfdsImages  # imports tensorflow_datasets
        self.dataset = TfdsImages(data_cfg.get("tfds_name", ""), data_cfg.split, transform,
                                  data_cfg.get("data_dir", "") or None)
        positions = np.arange(len(self.dataset))
        if per_class or fraction:
          positions = loader.select_per_class(
              self.dataset.labels(), per_class, fraction,
              where=f"config.data (TFDS {self.dataset.name} split {data_cfg.split!r})")
        if self.dataset.random_access:
          self._load = self.dataset.load
        else:
          self._load, self._stream = self.dataset.decode_record, self.dataset.stream
        what = (f"TFDS {self.dataset.name} split {data_cfg.split!r} ({self.dataset.route}, "
                f"{self.dataset.data_dir})")
      positions = positions[:limit]
      self.description = (f"{what}{subsampled}, {len(positions)} images, {size} px "
                          f"{transform.interpolation} resize to {transform.resize_to}")
    self._positions = np.asarray(positions, np.int64)

  def _synthetic(self, position: int) -> np.ndarray:
    return (self.dataset[int(position)]["image"] - self.mean) / self.std

  def __len__(self) -> int:
    return len(self._positions)

  def load_batches(self, indices: Sequence[int], batch_size: int,
                   prefetch_batches: int = 2) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Yields (images float32 [b, H, W, 3], weights float32 [b]) for `indices` in order.

    `indices` count into this stream (0 .. len - 1); `loader.PAD` (-1) gives a zero image of
    weight 0. Decoding runs in `config.data.num_workers` threads, `prefetch_batches` ahead.
    """
    n = len(self)
    positions = []
    for i in indices:
      i = int(i)
      if i != loader.PAD and not 0 <= i < n:
        raise ClmimError(f"image index {i} out of range for {n} images ({self.description}).")
      positions.append(loader.PAD if i == loader.PAD else int(self._positions[i]))
    return loader.load_batches(self._load, positions, batch_size, self.image_shape,
                               self.num_workers, prefetch_batches, stream=self._stream)

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    """Every image once, in order, as float32 batches [b, H, W, 3] (the last may be short)."""
    for images, _ in self.load_batches(range(len(self)), batch_size):
      yield images
