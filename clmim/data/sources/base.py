"""The types the data sources exchange with the rest of clmim (see sources/__init__.py)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Labels:
  """Class labels of a stream: `values` int64 [n, len(columns)], row i for image i;
  `classes[column]` names that column's class ids."""
  columns: Tuple[str, ...]
  values: np.ndarray
  classes: Dict[str, Tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class EvalRequest:
  """What an evaluation stream asks of a source: the images (split, folder, pairing, count)
  and how to preprocess them. `transform()` builds the resize / crop / normalise of decoded
  files and `subsampling()` reads the per-class caps of config.data: both only when a source
  decodes files, so a procedural run never validates fields it does not read."""
  size: int
  mean: np.ndarray
  std: np.ndarray
  num_workers: int
  split: str
  limit: Optional[int]
  path: Optional[str]
  pairing: str
  cue_conflict: bool
  transform: Callable[[], Any]
  subsampling: Callable[[], Tuple[int, float, str]]


@dataclasses.dataclass
class Opened:
  """One opened evaluation stream.

  dataset: the source's own object (kept for the source's other functions);
  load: position -> float32 [H, W, 3] preprocessed image; stream: an in-order reader for
  sources without random access (or None); positions: the dataset index of each image, in
  stream order; description: one line naming the data."""
  dataset: Any
  load: Callable[[int], np.ndarray]
  positions: np.ndarray
  description: str
  stream: Optional[Callable] = None
