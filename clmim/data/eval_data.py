"""Evaluation image streams for the analyses, preprocessed the way each model expects.

`config.data.source` selects the images; each source is one module of `clmim/data/sources/`
(the procedural shapes x textures, an image folder, a TFDS split), which opens them and names
their labels. Preprocessing comes from the model (its manifest: image size, crop_pct,
interpolation, mean/std) unless the config overrides it.

An `EvalImages` is a fixed, ordered list of images (after per-class subsampling and the
num_images cap). `load_batches(indices, ...)` reads any sub-list of it in parallel worker
threads, which is how each process of a multi-host run reads only its own shard.
"""
from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import numpy as np

from clmim.data import loader, sources
from clmim.data import preprocess as pp
from clmim.data.sources.base import EvalRequest, Labels  # noqa: F401  (Labels: re-exported)
from clmim.errors import ClmimError


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
    source: the module of its data source (`clmim.data.sources`).
  """

  def __init__(self, data_cfg, preprocessing: dict, *, source=None, split=None, num_images=None,
               path=None, pairing="independent", cue_conflict=False):
    """Opens the source and selects the images; every input problem raises a ClmimError.

    The keyword arguments override config.data for the probes' other image sets: `source`,
    `split` (procedural / TFDS), `num_images`, `path` (image folder), `pairing` (procedural
    train and validation: "independent" or "aligned" shape and texture) and `cue_conflict` (an
    image folder laid out as a cue-conflict set, see sources/image_folder.py).
    """
    self.source = sources.get(data_cfg.source if source is None else source)
    self._cue_conflict = bool(cue_conflict)
    size = int(preprocessing.get("image_size", 224))
    self.image_shape = (size, size, 3)
    self.mean, self.std = _mean_std(preprocessing, data_cfg)
    self.num_workers = int(data_cfg.get("num_workers", 0) or 0) or loader.default_num_workers()
    limit = int(data_cfg.num_images if num_images is None else num_images) or None

    def transform():
      return pp.EvalPreprocess(
          size, crop_pct=float(data_cfg.crop_pct or preprocessing.get("crop_pct", 0.875)),
          interpolation=data_cfg.interpolation or preprocessing.get("interpolation", "bicubic"),
          mean=tuple(self.mean), std=tuple(self.std), where="config.data")

    request = EvalRequest(size=size, mean=self.mean, std=self.std,
                          num_workers=self.num_workers,
                          split=data_cfg.split if split is None else split, limit=limit,
                          path=path, pairing=pairing, cue_conflict=self._cue_conflict,
                          transform=transform, subsampling=lambda: _subsampling(data_cfg))
    self._opened = self.source.open_evaluation(data_cfg, request)
    self.description = self._opened.description
    self._load, self._stream = self._opened.load, self._opened.stream
    self._positions = np.asarray(self._opened.positions, np.int64)

  def labels(self) -> Labels:
    """The class labels of every image, in stream order (no image is decoded); the columns
    are the source's (sources/*.py `evaluation_labels`)."""
    return self.source.evaluation_labels(self._opened, self._positions, self._cue_conflict)

  def object_mask(self, index: int) -> np.ndarray:
    """float [H, W]: the object coverage of image `index` of the stream (sources with
    OBJECT_MASKS only)."""
    if not self.source.OBJECT_MASKS:
      with_masks = [n for n, m in sources.SOURCES.items() if m.OBJECT_MASKS]
      raise ClmimError(f"{self.description}: this source has no object masks (sources with "
                       f"them: {', '.join(with_masks)}).")
    return self.source.object_mask(self._opened, int(self._positions[index]))

  @property
  def dataset(self):
    """The source's own object behind the stream (ShapesTextures, ImageFolder, TfdsImages)."""
    return self._opened.dataset

  @property
  def positions(self) -> np.ndarray:
    """The dataset index of each image of the stream, in stream order."""
    return self._positions

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
