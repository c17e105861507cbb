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

import dataclasses
import os
from typing import Dict, Iterator, Sequence, Tuple

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


@dataclasses.dataclass(frozen=True)
class Labels:
  """Class labels of a stream: `values` int64 [n, len(columns)], row i for image i;
  `classes[column]` names that column's class ids."""
  columns: Tuple[str, ...]
  values: np.ndarray
  classes: Dict[str, Tuple[str, ...]]


def _texture_class(path: str, classes: Sequence[str], root: str) -> int:
  """The texture class of a cue-conflict file `<shape><n>-<texture><m>.<ext>` (see `labels`)."""
  stem = os.path.splitext(os.path.basename(path))[0]
  name = stem.rsplit("-", 1)[-1].rstrip("0123456789") if "-" in stem else ""
  if name not in classes:
    raise ClmimError(f"cue-conflict image {path!r}: expected a name '<shape><n>-<texture><m>' "
                     f"whose texture is one of the class folders of {root!r} "
                     f"({', '.join(classes[:6])}{', ...' if len(classes) > 6 else ''}); got "
                     f"{name or stem!r}.")
  return classes.index(name)


class EvalImages:
  """A finite, ordered image source for one model.

  Attributes:
    description: one line naming the data (source, split or folder, count, resolution).
    image_shape: [H, W, 3] of every preprocessed image.
    mean, std: the normalisation used (float32 [3]).
  """

  def __init__(self, data_cfg, preprocessing: dict, *, source=None, split=None, num_images=None,
               path=None, pairing="independent", cue_conflict=False):
    """Opens the source and selects the images; every input problem raises a ClmimError.

    The keyword arguments override config.data for the probes' other image sets: `source`,
    `split`
    (synthetic/tfds), `num_images`, `path` (image_folder), `pairing` (synthetic train and
    validation: "independent" or "aligned" shape and texture) and `cue_conflict` (an image
    folder laid out as a cue-conflict set, see `labels`).
    """
    source = data_cfg.source if source is None else source
    split = data_cfg.split if split is None else split
    self.source, self._cue_conflict = source, bool(cue_conflict)
    if source not in SOURCES:
      raise ClmimError(f"config.data.source={source!r}: expected one of {SOURCES}.")
    size = int(preprocessing.get("image_size", 224))
    self.image_shape = (size, size, 3)
    self.mean, self.std = _mean_std(preprocessing, data_cfg)
    self.num_workers = int(data_cfg.get("num_workers", 0) or 0) or loader.default_num_workers()
    limit = int(data_cfg.num_images if num_images is None else num_images) or None
    self._stream = None
    if source == "synthetic":
      self.dataset = ShapesTextures(size, split, limit or 512, data_cfg.seed, pairing=pairing,
                                    version=data_cfg.get("version", 1))
      self._load = self._synthetic
      positions = np.arange(len(self.dataset))
      paired = f", {pairing} shape and texture" if pairing != "independent" else ""
      version = "" if self.dataset.version == 1 else f", version {self.dataset.version}"
      self.description = (f"synthetic shapes x textures{version}, split {split!r}{paired}, "
                          f"seed {data_cfg.seed}, {len(self.dataset)} images, {size} px")
    else:
      transform = pp.EvalPreprocess(
          size, crop_pct=float(data_cfg.crop_pct or preprocessing.get("crop_pct", 0.875)),
          interpolation=data_cfg.interpolation or preprocessing.get("interpolation", "bicubic"),
          mean=tuple(self.mean), std=tuple(self.std), where="config.data")
      per_class, fraction, subsampled = _subsampling(data_cfg)
      if source == "image_folder":
        folder = data_cfg.path if path is None else path
        if not folder:
          raise ClmimError("config.data.path is empty: set it to an image folder "
                           "(one sub-folder per class).")
        self.dataset = ImageFolder(folder, transform,
                                   max_images_per_class=per_class or None,
                                   fraction_per_class=fraction or None,
                                   num_workers=self.num_workers, check=False)
        self._load = self.dataset.load
        positions = np.arange(len(self.dataset))
        what = f"image folder {folder}"
      else:
        from clmim.data.tfds_source import TfdsImages  # imports tensorflow_datasets
        self.dataset = TfdsImages(data_cfg.get("tfds_name", ""), split, transform,
                                  data_cfg.get("data_dir", "") or None)
        positions = np.arange(len(self.dataset))
        if per_class or fraction:
          positions = loader.select_per_class(
              self.dataset.labels(), per_class, fraction,
              where=f"config.data (TFDS {self.dataset.name} split {split!r})")
        if self.dataset.random_access:
          self._load = self.dataset.load
        else:
          self._load, self._stream = self.dataset.decode_record, self.dataset.stream
        what = (f"TFDS {self.dataset.name} split {split!r} ({self.dataset.route}, "
                f"{self.dataset.data_dir})")
      positions = positions[:limit]
      if source == "image_folder":
        # Every image this stream reads, and no other, has its header checked now: all the
        # unreadable files are named before any model runs (once per process, however many
        # models and probes open the folder).
        self.dataset.check(positions)
      self.description = (f"{what}{subsampled}, {len(positions)} images, {size} px "
                          f"{transform.interpolation} resize to {transform.resize_to}")
    self._positions = np.asarray(positions, np.int64)

  def labels(self) -> Labels:
    """The class labels of every image, in stream order (no image is decoded).

    Synthetic: columns ("shape", "texture"). Image folder: ("label",), its sub-folders; laid
    out as a cue-conflict set (`cue_conflict=True`): ("shape", "texture"), the shape being the
    sub-folder and the texture the class named after the last "-" of the file name, without its
    digits (the 16-class style-transfer set's `airplane1-bicycle2.png`: shape airplane, texture
    bicycle); both index the folder's classes. TFDS: ("label",), its ClassLabel feature.
    """
    if self.source == "synthetic":
      values = [self.dataset.labels(int(p))[:2] for p in self._positions]
      return Labels(("shape", "texture"), np.asarray(values, np.int64).reshape(-1, 2),
                    {"shape": self.dataset.shapes, "texture": self.dataset.textures})
    if self.source == "image_folder":
      shape = np.asarray(self.dataset.labels, np.int64)[self._positions]
      classes = tuple(self.dataset.classes)
      if not self._cue_conflict:
        return Labels(("label",), shape[:, None], {"label": classes})
      files = [self.dataset.files[int(p)] for p in self._positions]
      texture = np.asarray([_texture_class(f, classes, self.dataset.root) for f in files])
      return Labels(("shape", "texture"), np.stack([shape, texture], axis=1),
                    {"shape": classes, "texture": classes})
    if self.dataset.label_key is None:
      raise ClmimError(f"TFDS dataset {self.dataset.name!r} has no class label (ClassLabel "
                       "feature): it cannot train or test a probe.")
    values = np.asarray(self.dataset.labels(), np.int64)[self._positions]
    return Labels(("label",), values[:, None], {"label": self.dataset.class_names()})

  @property
  def positions(self) -> np.ndarray:
    """The dataset index of each image of the stream, in stream order."""
    return self._positions

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
