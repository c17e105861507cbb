"""'Did you mean ...?' for names a user typed: the closest of the names clmim knows.

Used by the error lines of model names, checkpoint names, families and ViT variants, so a typo
(`simim_demo`, `moco_v3_vitb`) is answered with the name that was meant, not only a list.
"""
from __future__ import annotations

import difflib
from typing import Iterable


def closest(word: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6,
            margin: float = 0.05) -> list[str]:
  """The up to `n` candidates most like `word` (case ignored), best first: those within
  `margin` of the best difflib ratio (a clear winner is named alone); [] when none reaches
  `cutoff`."""
  by_lower = {}
  for name in candidates:
    by_lower.setdefault(str(name).lower(), str(name))
  word = str(word).lower()
  matches = difflib.get_close_matches(word, list(by_lower), n=n, cutoff=cutoff)
  if not matches:
    return []
  ratio = lambda m: difflib.SequenceMatcher(None, word, m).ratio()
  best = ratio(matches[0])
  return [by_lower[m] for m in matches if ratio(m) >= best - margin]


def did_you_mean(word: str, candidates: Iterable[str], n: int = 3) -> str:
  """" (did you mean 'a' or 'b'?)" for the closest candidates, or "" when none is close."""
  matches = closest(word, candidates, n)
  if not matches:
    return ""
  quoted = [repr(m) for m in matches]
  listed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
  return f" (did you mean {listed}?)"
