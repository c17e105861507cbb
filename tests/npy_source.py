"""A worked example of a data source (README, "Architecture"): a folder of `.npy` arrays.

Layout: `<data.path>/<class>/<name>.npy`, each a float array [S, S, 3] in [0, 1] at the model's
image size. The module is all a source needs: register it with
`clmim.data.sources.SOURCES[NAME] = module` (tests/test_sources.py does, then analyses and
trains on it).
"""
import os

import numpy as np

from clmim.data.sources import decoded
from clmim.data.sources.base import EvalRequest, Labels, Opened
from clmim.errors import ClmimError

NAME = "npy"
LABELS = ("label",)
OBJECT_MASKS = False
SECOND_VIEWS = False
DRAWN = False
DECISION_PROBE = ("independent", "label")
HOW_NOT_WHAT = ()  # no fields that leave a resumed training run's images unchanged
ADDED_LATER = {}   # no fields added after runs were recorded
check = decoded.check  # data.path is checked when the folder is opened


class Arrays:
  """The arrays of one folder: `len`, `load(i)`, `labels`, `classes`."""

  def __init__(self, root: str, size: int):
    if not os.path.isdir(root):
      raise ClmimError(f"config.data.path={root!r}: not a folder of <class>/<name>.npy arrays.")
    self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    self.files, self.labels = [], []
    for label, name in enumerate(self.classes):
      for file in sorted(os.listdir(os.path.join(root, name))):
        self.files.append(os.path.join(root, name, file))
        self.labels.append(label)
    if not self.files:
      raise ClmimError(f"config.data.path={root!r} holds no .npy arrays.")
    self.size = size

  def __len__(self):
    return len(self.files)

  def load(self, index: int) -> np.ndarray:
    array = np.load(self.files[int(index)]).astype(np.float32)
    if array.shape != (self.size, self.size, 3):
      raise ClmimError(f"{self.files[int(index)]}: shape {array.shape}, expected "
                       f"{(self.size, self.size, 3)}.")
    return array


def check_training(data_cfg, second_view: str) -> None:
  decoded.check_second_view(NAME, second_view)
  if not data_cfg.path:
    raise ClmimError("config.data.source='npy' needs config.data.path.")


def open_evaluation(data_cfg, request: EvalRequest) -> Opened:
  arrays = Arrays(request.path or data_cfg.path, request.size)
  positions = np.arange(len(arrays))[:request.limit]
  return Opened(dataset=arrays,
                load=lambda i: (arrays.load(i) - request.mean) / request.std,
                positions=positions,
                description=f"npy arrays {arrays.files[0].rsplit(os.sep, 2)[0]}, "
                            f"{len(positions)} images, {request.size} px")


def evaluation_labels(opened: Opened, positions, cue_conflict: bool) -> Labels:
  del cue_conflict
  values = np.asarray(opened.dataset.labels, np.int64)[positions]
  return Labels(LABELS, values[:, None], {"label": tuple(opened.dataset.classes)})


def training_images(data_cfg, path=None, split=None, crop_pct: float = 1.0):
  del split, crop_pct
  return Arrays(path or data_cfg.path, data_cfg.image_size)


training_labels = decoded.training_labels
training_batches = decoded.training_batches


def class_count(data_cfg, label: str) -> int:
  del label
  return len(training_images(data_cfg).classes)


def held_out(data_cfg, finetune_cfg):
  images = training_images(data_cfg, path=finetune_cfg.eval_path or None)
  return decoded.held_out_loader(images, training_labels(images, "config.finetune"),
                                 finetune_cfg)


def probe_training(data_cfg, probe_cfg, pairing: str) -> dict:
  del pairing
  return {"path": probe_cfg.path or data_cfg.path, "num_images": int(probe_cfg.num_images)}


def probe_evaluation(pairing: str) -> dict:
  del pairing
  return {}


def cue_conflict(data_cfg):
  del data_cfg
