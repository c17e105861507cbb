"""The labelled image sets a probe needs, for one model: training, evaluation, cue-conflict.

`ProbeData(config.data, config.probe_data, preprocessing)` opens them lazily (each once) and
checks their labels; an analysis calls its getters in `check_data`, so a missing folder or a set
without labels is reported before any compute.

  source        training images                      evaluation images      cue-conflict images
  synthetic     split probe_data.split (shape and    split data.split       split "cue_conflict"
                texture drawn independently; or
                "aligned": texture = the shape's)
  image_folder  folder probe_data.path               folder data.path       folder probe_data.
                                                                            cue_conflict_path
  tfds          split probe_data.split               split data.split       folder probe_data.
                                                                            cue_conflict_path

probe_data.num_images of the training images are read (0 = all); the evaluation images are
config.data's stream, its subsampling fields (max_images_per_class, fraction_per_class) applying
to every set.

Targets (the label columns a probe is fitted to): synthetic "shape" and "texture"; otherwise
"label". The cue-conflict decision — does the probe name the image's shape or its texture? —
needs a probe whose classes are both: on synthetic data the "shape" probe of the aligned
training set (class k = shape k with texture k), otherwise the "label" probe, whose class names
the cue-conflict folder's shape and texture classes must be among.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from clmim.data import sources
from clmim.data.eval_data import EvalImages, Labels
from clmim.data.sources import image_folder
from clmim.errors import ClmimError


@dataclasses.dataclass(frozen=True)
class LabelledImages:
  """An image stream and its labels (row i = image i)."""
  images: EvalImages
  labels: Labels

  def column(self, name: str) -> np.ndarray:
    """The labels of column `name` [n] int64."""
    return self.labels.values[:, self.labels.columns.index(name)]

  @property
  def description(self) -> str:
    return self.images.description


class ProbeData:
  """The labelled sets of one model's preprocessing (see the module docstring)."""

  def __init__(self, data_cfg, probe_cfg, preprocessing: dict):
    self.cfg, self.probe_cfg, self.preprocessing = data_cfg, probe_cfg, preprocessing
    self.source = sources.get(data_cfg.source)
    self.targets = self.source.LABELS
    # (training pairing, target) of the probe that makes the cue-conflict decision.
    self.decision = self.source.DECISION_PROBE
    self._opened = {}

  def _open(self, key, **overrides) -> LabelledImages:
    if key not in self._opened:
      images = EvalImages(self.cfg, self.preprocessing, **overrides)
      labels = images.labels()
      self._opened[key] = LabelledImages(images, labels)
    return self._opened[key]

  def train(self, pairing: str = "independent") -> LabelledImages:
    """The images the probes are fitted on."""
    opened = self._open(("train", pairing), **self.source.probe_training(self.cfg, self.probe_cfg,
                                                                      pairing))
    if "label" in self.targets:  # class names from files: the two sets must agree
      evaluation = self.evaluation()
      if opened.labels.classes["label"] != evaluation.labels.classes["label"]:
        raise ClmimError(f"the probes' training images ({opened.description}) and evaluation "
                         f"images ({evaluation.description}) have different classes: expected "
                         "the same class names in the same order.")
    return opened

  def evaluation(self, pairing: str = "independent") -> LabelledImages:
    """The images the probes are tested on (config.data's stream)."""
    return self._open(("evaluation", pairing), **self.source.probe_evaluation(pairing))

  def cue_conflict(self) -> Optional[LabelledImages]:
    """The cue-conflict images with columns ("shape", "texture") as class ids of the decision
    probe; None when the source has none (a folder or TFDS run without
    probe_data.cue_conflict_path)."""
    own = self.source.cue_conflict(self.cfg)
    if own is not None:  # the source draws its own (the procedural split "cue_conflict")
      return self._open(("cue_conflict",), **own)
    path = self.probe_cfg.cue_conflict_path
    if not path:
      return None
    if ("cue_conflict",) in self._opened:
      return self._opened[("cue_conflict",)]
    opened = self._open(("cue_conflict_raw",), source=image_folder.NAME,
                        path=path, num_images=0, cue_conflict=True)
    classes = self.train().labels.classes["label"]
    folder = opened.labels.classes["shape"]
    missing = [c for c in folder if c not in classes]
    if missing:
      raise ClmimError(f"config.probe_data.cue_conflict_path: class {missing[0]!r} of "
                       f"{path!r} is not a class of the probes' training "
                       f"images ({', '.join(classes[:6])}{', ...' if len(classes) > 6 else ''}); "
                       "the decision probe can only name classes it was trained on.")
    remap = np.asarray([classes.index(c) for c in folder], np.int64)
    values = remap[opened.labels.values]
    labels = Labels(("shape", "texture"), values, {"shape": classes, "texture": classes})
    self._opened[("cue_conflict",)] = LabelledImages(opened.images, labels)
    return self._opened[("cue_conflict",)]
