"""The procedural source ("synthetic"): shapes x textures rendered on demand, no download.

Images come from `clmim/data/synthetic.py` (`ShapesTextures`): a split ("train", "validation",
"cue_conflict", ...) of `data.seed`'s draws at `data.version`. Labels are the shape and the
texture; every image has an object mask, and a training image can be redrawn as a second view
that shares only its object's outline (MoCo's `augment.second_view`).
"""
from __future__ import annotations

import numpy as np

from clmim.data.sources.base import EvalRequest, Labels, Opened
from clmim.errors import ClmimError

NAME = "synthetic"
LABELS = ("shape", "texture")
OBJECT_MASKS = True
# Drawn on demand (no fixed size): every set of it needs an image count.
DRAWN = True
SECOND_VIEWS = True
# Resuming a training run: data.render_workers says how images are rendered, not which; records
# made before data.version existed were rendered by version 1.
HOW_NOT_WHAT = ("data.render_workers",)
ADDED_LATER = {"data.version": 1}


def check(data_cfg) -> None:
  """data.version must name a published version of the generator (clmim/data/synthetic.py)."""
  from clmim.data.synthetic import VERSIONS
  version = data_cfg.get("version", 1)
  if isinstance(version, bool) or version not in VERSIONS:
    raise ClmimError(f"config.data.version={version!r}: expected one of {tuple(VERSIONS)} ("
                     f"{'; '.join(f'{k}: {v}' for k, v in VERSIONS.items())}).")


def check_training(data_cfg, second_view: str) -> None:
  """Nothing to check: every field it reads has a working default."""
  del data_cfg, second_view


def open_evaluation(data_cfg, request: EvalRequest) -> Opened:
  from clmim.data.synthetic import ShapesTextures
  dataset = ShapesTextures(request.size, request.split, request.limit or 512, data_cfg.seed,
                           pairing=request.pairing, version=data_cfg.get("version", 1))
  mean, std = request.mean, request.std
  paired = f", {request.pairing} shape and texture" if request.pairing != "independent" else ""
  version = "" if dataset.version == 1 else f", version {dataset.version}"
  return Opened(dataset=dataset,
                load=lambda position: (dataset[int(position)]["image"] - mean) / std,
                positions=np.arange(len(dataset)),
                description=(f"synthetic shapes x textures{version}, split {request.split!r}"
                             f"{paired}, seed {data_cfg.seed}, {len(dataset)} images, "
                             f"{request.size} px"))


def evaluation_labels(opened: Opened, positions: np.ndarray, cue_conflict: bool) -> Labels:
  del cue_conflict
  dataset = opened.dataset
  values = [dataset.labels(int(p))[:2] for p in positions]
  return Labels(LABELS, np.asarray(values, np.int64).reshape(-1, 2),
                {"shape": dataset.shapes, "texture": dataset.textures})


def object_mask(opened: Opened, position: int) -> np.ndarray:
  """float [H, W]: the share of each pixel covered by the image's object."""
  return opened.dataset.object_mask(int(position))


def training_images(data_cfg, path=None, split=None, crop_pct: float = 1.0):
  del path, split, crop_pct
  from clmim.data.synthetic import ShapesTextures
  return ShapesTextures(data_cfg.image_size, "train", data_cfg.num_train_images, data_cfg.seed,
                        version=data_cfg.version)


def training_labels(images, where: str):
  """None: the rendered batches carry their shape and texture labels."""
  del images, where


def training_batches(images, config, start_step: int, rows, labels):
  """Rendered ahead by data.render_workers; with augment.second_view each image comes with its
  redrawn second view."""
  del labels
  from clmim.data.synthetic import training_stream
  augment = config.get("augment", {})
  return training_stream(images, config.batch_size, start_step,
                         second_view=str(augment.get("second_view", "")),
                         workers=config.data.render_workers, rows=rows,
                         ramp=tuple(augment.get("second_view_ramp", (0, 0))))


def class_count(data_cfg, label: str) -> int:
  from clmim.data import synthetic
  return len(synthetic.SHAPES if label == "shape" else synthetic.TEXTURES)


def held_out(data_cfg, finetune_cfg):
  """Split "validation", finetune.eval_images of them."""
  from clmim.data.synthetic import ShapesTextures
  dataset = ShapesTextures(data_cfg.image_size, "validation", int(finetune_cfg.eval_images),
                           data_cfg.seed, version=data_cfg.version)
  labels = np.asarray([dataset.labels(i)[0 if finetune_cfg.label == "shape" else 1]
                       for i in range(len(dataset))], np.int64)
  return (lambda indices: dataset.batch(indices)["image"]), labels


# The probes: fitted on split probe_data.split (shape and texture drawn independently, or
# "aligned": texture = the shape's), tested on data.split, cue conflicts from split
# "cue_conflict". The decision probe is the aligned set's shape probe (class k = shape k with
# texture k), so it names a shape or a texture.
DECISION_PROBE = ("aligned", "shape")


def probe_training(data_cfg, probe_cfg, pairing: str) -> dict:
  del data_cfg
  return {"split": probe_cfg.split, "num_images": int(probe_cfg.num_images), "pairing": pairing}


def probe_evaluation(pairing: str) -> dict:
  return {"pairing": pairing}


def cue_conflict(data_cfg):
  del data_cfg
  return {"split": "cue_conflict"}
