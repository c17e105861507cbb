"""An image folder ("image_folder"): one sub-folder of PNG / JPEG files per class.

Evaluation reads `data.path`, the probes train on `probe_data.path` and the cue-conflict
decision reads `probe_data.cue_conflict_path` (a folder laid out as the 16-class style-transfer
set: the shape is the sub-folder, the texture the class named at the end of the file name).
Labels are the sub-folders, sorted. Training reads `data.path` through grain; fine-tuning
validates on `finetune.eval_path` (the same classes).
"""
from __future__ import annotations

import numpy as np

from clmim.data.sources import decoded
from clmim.data.sources.base import EvalRequest, Labels, Opened
from clmim.errors import ClmimError

NAME = "image_folder"
LABELS = ("label",)
OBJECT_MASKS = False
DRAWN = False
SECOND_VIEWS = False
DECISION_PROBE = ("independent", "label")
HOW_NOT_WHAT = decoded.HOW_NOT_WHAT
ADDED_LATER = {**decoded.ADDED_LATER, "data.path": ""}
check = decoded.check


def check_training(data_cfg, second_view: str) -> None:
  decoded.check_second_view(NAME, second_view)
  if not data_cfg.path:
    raise ClmimError("config.data.source='image_folder' needs config.data.path: a folder with "
                     "one sub-folder of images per class.")


def open_evaluation(data_cfg, request: EvalRequest) -> Opened:
  from clmim.data.image_folder import ImageFolder
  folder = data_cfg.path if request.path is None else request.path
  if not folder:
    raise ClmimError("config.data.path is empty: set it to an image folder "
                     "(one sub-folder per class).")
  transform = request.transform()
  per_class, fraction, subsampled = request.subsampling()
  dataset = ImageFolder(folder, transform, max_images_per_class=per_class or None,
                        fraction_per_class=fraction or None, num_workers=request.num_workers,
                        check=False)
  positions = np.arange(len(dataset))[:request.limit]
  # Every image this stream reads, and no other, has its header checked now: all the
  # unreadable files are named before any model runs (once per process, however many models
  # and probes open the folder).
  dataset.check(positions)
  return Opened(dataset=dataset, load=dataset.load, positions=positions,
                description=decoded.describe(f"image folder {folder}", subsampled, positions,
                                             request, transform))


def evaluation_labels(opened: Opened, positions: np.ndarray, cue_conflict: bool) -> Labels:
  """("label",): the sub-folders; laid out as a cue-conflict set, ("shape", "texture"): the
  sub-folder and the class named after the file name's last "-", without its digits (the
  16-class style-transfer set's `airplane1-bicycle2.png`: shape airplane, texture bicycle)."""
  dataset = opened.dataset
  shape = np.asarray(dataset.labels, np.int64)[positions]
  classes = tuple(dataset.classes)
  if not cue_conflict:
    return Labels(("label",), shape[:, None], {"label": classes})
  files = [dataset.files[int(p)] for p in positions]
  texture = np.asarray([decoded.texture_class(f, classes, dataset.root) for f in files])
  return Labels(("shape", "texture"), np.stack([shape, texture], axis=1),
                {"shape": classes, "texture": classes})


def training_images(data_cfg, path=None, split=None, crop_pct: float = 1.0):
  del split
  from clmim.data.image_folder import ImageFolder
  return ImageFolder(path or data_cfg.path, decoded.training_preprocess(data_cfg, crop_pct),
                     num_workers=1)


training_labels = decoded.training_labels
training_batches = decoded.training_batches


def class_count(data_cfg, label: str) -> int:
  del label
  from clmim.data.image_folder import class_names
  return len(class_names(data_cfg.path))  # the sub-folders: no need to list every image


def held_out(data_cfg, finetune_cfg):
  """The folder finetune.eval_path, with the classes of data.path in the same order."""
  if not finetune_cfg.eval_path:
    raise ClmimError("config.finetune.eval_path is empty: with config.data.source="
                     "'image_folder' name a folder of held-out images (the classes of "
                     "config.data.path).")
  images = training_images(data_cfg, path=finetune_cfg.eval_path,
                           crop_pct=finetune_cfg.eval_crop_pct)
  labels = decoded.training_labels(images, "config.finetune")
  from clmim.data.image_folder import class_names
  trained = class_names(data_cfg.path)
  if list(images.classes) != trained:
    raise ClmimError(f"config.finetune.eval_path={finetune_cfg.eval_path!r} has classes "
                     f"{list(images.classes)[:5]}...; expected those of config.data.path "
                     f"({trained[:5]}...), in the same sorted order.")
  return decoded.held_out_loader(images, labels, finetune_cfg)


def probe_training(data_cfg, probe_cfg, pairing: str) -> dict:
  del data_cfg, pairing
  if not probe_cfg.path:
    raise ClmimError("config.probe_data.path is empty: a probe is fitted on labelled "
                     "training images; set it to a folder with one sub-folder per class "
                     "(the classes of config.data.path).")
  return {"path": probe_cfg.path, "num_images": int(probe_cfg.num_images)}


probe_evaluation = decoded.probe_evaluation
cue_conflict = decoded.cue_conflict
