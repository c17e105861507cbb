"""The per-channel normalisation a model's inputs get: named statistics and their resolution.

Here, not with the data, because the analyses read them too (to show a model's input as it saw
it) and `clmim.analysis` imports the models, never the data.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

from clmim.errors import ClmimError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

_NAMED_STATS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": (HALF, HALF)}

Stats = Union[str, Sequence[float]]


def resolve_stats(value: Stats, field: str, where: str) -> Tuple[float, float, float]:
  """Resolves a mean/std given by name ('imagenet', 'half') or as three numbers."""
  if isinstance(value, str):
    key = value.lower()
    if key not in _NAMED_STATS:
      raise ClmimError(
          f"{where}.{field} = {value!r}: expected 'imagenet', 'half' or three numbers.")
    return _NAMED_STATS[key][0 if field == "mean" else 1]
  try:
    out = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    out = ()
  if len(out) != 3 or (field == "std" and any(v <= 0 for v in out)):
    what = "three positive numbers" if field == "std" else "three numbers"
    raise ClmimError(f"{where}.{field} = {value!r}: expected 'imagenet', 'half' or {what}.")
  return out
