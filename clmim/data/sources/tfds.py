"""A TensorFlow Datasets split ("tfds"): `data.tfds_name`, read through `tfds.data_source`.

Evaluation reads split `data.split` (array_record with random access, or tfrecord streamed in
order; see clmim/data/tfds_source.py), the probes train on `probe_data.split`, and cue
conflicts come from a folder (`probe_data.cue_conflict_path`) as for image folders. Labels are
the split's ClassLabel feature. Training reads `data.tfds_split`, which needs random access.
"""
from __future__ import annotations

import numpy as np

from clmim.data import loader
from clmim.data.sources import decoded
from clmim.data.sources.base import EvalRequest, Labels, Opened
from clmim.errors import ClmimError

NAME = "tfds"
LABELS = ("label",)
OBJECT_MASKS = False
DRAWN = False
SECOND_VIEWS = False
DECISION_PROBE = ("independent", "label")
HOW_NOT_WHAT = decoded.HOW_NOT_WHAT
ADDED_LATER = {**decoded.ADDED_LATER, "data.tfds_name": "", "data.tfds_split": "train",
               "data.data_dir": ""}
check = decoded.check


def check_training(data_cfg, second_view: str) -> None:
  decoded.check_second_view(NAME, second_view)
  if not data_cfg.tfds_name:
    raise ClmimError("config.data.source='tfds' needs config.data.tfds_name, e.g. "
                     "'imagenet2012'.")


def open_evaluation(data_cfg, request: EvalRequest) -> Opened:
  from clmim.data.tfds_source import TfdsImages  # imports tensorflow_datasets
  transform = request.transform()
  per_class, fraction, subsampled = request.subsampling()
  dataset = TfdsImages(data_cfg.get("tfds_name", ""), request.split, transform,
                       data_cfg.get("data_dir", "") or None)
  positions = np.arange(len(dataset))
  if per_class or fraction:
    positions = loader.select_per_class(
        dataset.labels(), per_class, fraction,
        where=f"config.data (TFDS {dataset.name} split {request.split!r})")
  positions = positions[:request.limit]
  what = f"TFDS {dataset.name} split {request.split!r} ({dataset.route}, {dataset.data_dir})"
  if dataset.random_access:
    load, stream = dataset.load, None
  else:
    load, stream = dataset.decode_record, dataset.stream
  return Opened(dataset=dataset, load=load, stream=stream, positions=positions,
                description=decoded.describe(what, subsampled, positions, request, transform))


def evaluation_labels(opened: Opened, positions: np.ndarray, cue_conflict: bool) -> Labels:
  del cue_conflict
  dataset = opened.dataset
  if dataset.label_key is None:
    raise ClmimError(f"TFDS dataset {dataset.name!r} has no class label (ClassLabel "
                     "feature): it cannot train or test a probe.")
  values = np.asarray(dataset.labels(), np.int64)[positions]
  return Labels(("label",), values[:, None], {"label": dataset.class_names()})


def training_images(data_cfg, path=None, split=None, crop_pct: float = 1.0):
  del path
  from clmim.data.tfds_source import TfdsImages
  split = split or data_cfg.tfds_split
  images = TfdsImages(data_cfg.tfds_name, split, decoded.training_preprocess(data_cfg, crop_pct),
                      data_dir=data_cfg.data_dir or None)
  if not images.random_access:
    raise ClmimError(f"TFDS {data_cfg.tfds_name} split {split!r} is stored as "
                     "tfrecord, which can only be streamed in order; training needs random "
                     "access: prepare it as array_record (tfds build --file_format=array_record).")
  return images


training_labels = decoded.training_labels
training_batches = decoded.training_batches


def class_count(data_cfg, label: str) -> int:
  del label
  images = training_images(data_cfg)
  decoded.training_labels(images, "config.data")
  return len(images.class_names())


def held_out(data_cfg, finetune_cfg):
  """Split finetune.eval_split of the same dataset."""
  images = training_images(data_cfg, split=finetune_cfg.eval_split,
                           crop_pct=finetune_cfg.eval_crop_pct)
  labels = decoded.training_labels(images, "config.finetune")
  return decoded.held_out_loader(images, labels, finetune_cfg)


def probe_training(data_cfg, probe_cfg, pairing: str) -> dict:
  del data_cfg, pairing
  return {"split": probe_cfg.split, "num_images": int(probe_cfg.num_images)}


probe_evaluation = decoded.probe_evaluation
cue_conflict = decoded.cue_conflict
