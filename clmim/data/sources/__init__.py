"""Data sources: where a run's images come from, one module per source, found by name.

`config.data.source` names one of `SOURCES`. Everything that depends on which source it is
lives in that source's module; the rest of clmim asks the module, never compares the name:

  NAME               the value of config.data.source
  LABELS             the label columns its images carry: ("shape", "texture") or ("label",)
  OBJECT_MASKS       whether it has a per-image object mask (object_attention needs one)
  SECOND_VIEWS       whether it can redraw an image as a second view (augment.second_view)
  DRAWN              whether its images are drawn on demand (a set of it needs a count)
  DECISION_PROBE     (pairing, target) of the probe that decides the cue-conflict images
  HOW_NOT_WHAT       data fields that say how images are read, not which (a training run
                     resumes with other values)
  ADDED_LATER        {field: value} for data fields newer than some recorded runs: the value
                     that reproduces what those runs read
  check(data_cfg)                            one error for a data config of any kind
  check_training(data_cfg, second_view)      one error for a training config that cannot work
  open_evaluation(data_cfg, request)         -> Opened: the images of one evaluation stream
  evaluation_labels(opened, positions, cue_conflict) -> eval_data.Labels
  training_images(data_cfg, path, split, crop_pct)   the images a training run reads
  training_labels(images, where)             labels for a supervised objective, or None when
                                             its batches carry them
  training_batches(images, config, start_step, rows, labels)  the endless batch stream
  class_count(data_cfg, label)               classes of a label column
  held_out(data_cfg, finetune_cfg)           fine-tuning's validation images and labels
  probe_training(data_cfg, probe_cfg, pairing)  overrides opening the probes' training images
                                             (probe_cfg: config.probe_data)
  probe_evaluation(pairing)                  overrides opening the probes' evaluation images
  cue_conflict(data_cfg)                     overrides opening its cue-conflict images, or None
  object_mask(opened, position)              float [H, W] object coverage (OBJECT_MASKS only)

Adding a source is adding one module here and to `SOURCES` (docs: README, "Architecture").
"""
from __future__ import annotations

from clmim.data.sources import image_folder, procedural, tfds
from clmim.errors import ClmimError
from clmim.suggestions import did_you_mean

SOURCES = {module.NAME: module for module in (procedural, image_folder, tfds)}
NAMES = tuple(SOURCES)


def get(name: str, where: str = "config.data.source"):
  """The module of source `name`; one error naming the field and the known sources."""
  if name not in SOURCES:
    raise ClmimError(f"{where}={name!r}{did_you_mean(str(name), NAMES)}: expected one of "
                     f"{', '.join(NAMES)}.")
  return SOURCES[name]


def how_not_what() -> tuple:
  """Every source's HOW_NOT_WHAT fields (a saved run may have used any source)."""
  return tuple(sorted({field for module in SOURCES.values() for field in module.HOW_NOT_WHAT}))


def added_later() -> dict:
  """Every source's ADDED_LATER defaults."""
  return {field: value for module in SOURCES.values() for field, value in
          module.ADDED_LATER.items()}


def of(data_cfg):
  """The module of `data_cfg.source` (the procedural data when the field is absent)."""
  return get(data_cfg.get("source", procedural.NAME))
