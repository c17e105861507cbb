"""What the sources of decoded files (image folder, TFDS) share: the training preprocessing,
the grain batch stream, class labels, the cue-conflict file names, descriptions."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from clmim.errors import ClmimError


# Resuming a training run: the grain decoding threads do not change what is read (records made
# before the field existed used 8).
HOW_NOT_WHAT = ("data.read_threads",)
ADDED_LATER = {"data.read_threads": 8}


def check(data_cfg) -> None:
  """Nothing beyond check_training: a decoded source's fields are checked where they are read
  (the folder or split is opened before any compute)."""
  del data_cfg


def check_second_view(name: str, second_view: str) -> None:
  if second_view:
    raise ClmimError(f"config.augment.second_view={second_view!r} redraws procedural images; "
                     f"with config.data.source={name!r} set it to '' (both views are then "
                     "augmentations of the one image).")


def training_preprocess(data_cfg, crop_pct: float):
  """Shorter side to data.image_size / crop_pct, then a centre crop, in [0, 1]: the objectives
  augment and then normalise with data.mean / data.std, as for procedural images."""
  from clmim.data.preprocess import EvalPreprocess  # Pillow is imported on first use
  return EvalPreprocess(data_cfg.image_size, crop_pct=crop_pct, mean=(0.0, 0.0, 0.0),
                        std=(1.0, 1.0, 1.0), where="config.data")


def training_labels(images, where: str) -> np.ndarray:
  """The class label of every image of an opened image folder / TFDS split, or one error line
  when it has none (a TFDS split without a ClassLabel feature)."""
  if hasattr(images, "label_key") and images.label_key is None:
    raise ClmimError(f"{where}: TFDS {images.name} split {images.split!r} has no class label "
                     "feature; fine-tuning needs labelled images (a split with a ClassLabel).")
  return np.asarray(images.labels() if callable(images.labels) else images.labels, np.int64)


def training_batches(images, config, start_step: int, rows, labels):
  """grain: a seeded order reshuffled every epoch, decoded by data.read_threads threads."""
  from clmim.data.train_data import real_batches
  return real_batches(images, config.batch_size, start_step, rows, config.data.seed,
                      config.data.read_threads, labels)


def held_out_loader(images, labels, finetune_cfg):
  """(load(indices) -> float32 [n, S, S, 3], labels): the first finetune.eval_images when > 0."""
  count = int(finetune_cfg.eval_images)
  if count:
    labels = labels[:count]
  return (lambda indices: np.stack([images.load(int(i)) for i in indices])), labels


def texture_class(path: str, classes: Sequence[str], root: str) -> int:
  """The texture class of a cue-conflict file `<shape><n>-<texture><m>.<ext>`."""
  stem = os.path.splitext(os.path.basename(path))[0]
  name = stem.rsplit("-", 1)[-1].rstrip("0123456789") if "-" in stem else ""
  if name not in classes:
    raise ClmimError(f"cue-conflict image {path!r}: expected a name '<shape><n>-<texture><m>' "
                     f"whose texture is one of the class folders of {root!r} "
                     f"({', '.join(classes[:6])}{', ...' if len(classes) > 6 else ''}); got "
                     f"{name or stem!r}.")
  return classes.index(name)


def describe(what: str, subsampled: str, positions, request, transform) -> str:
  return (f"{what}{subsampled}, {len(positions)} images, {request.size} px "
          f"{transform.interpolation} resize to {transform.resize_to}")


def probe_evaluation(pairing: str) -> dict:
  """The probes are tested on config.data's own stream (no pairing: the labels are files')."""
  del pairing
  return {}


def cue_conflict(data_cfg):
  """None: the cue-conflict images are a folder of their own (probe_data.cue_conflict_path)."""
  del data_cfg
