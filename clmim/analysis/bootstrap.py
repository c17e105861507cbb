"""Bootstrap intervals over images, computed while the images stream.

An analysis reports means over images, computed from sums (`clmim.analysis.core`). To resample
images without keeping per-image values, the runner also keeps the sums per *fold*: image i (its
position in the stream, `Batch.index`) belongs to fold i mod G. One bootstrap replicate draws G
folds with replacement (multinomial counts c_1..c_G, summing to G), forms the replicate's sums
as sum_g c_g * sums_g and finalizes them exactly as the real run does. The percentile interval
of the replicates (2.5 and 97.5 %) is the reported 95 % interval.

Why folds, not single images: the fold sums are G times an analysis' sums, whatever the number
of images, so memory stays flat and nothing per image is stored; with G >= 20 a resample of
folds behaves like a resample of images (each fold is a random-looking, equal-sized share of the
images; the stream order is the data set's, not sorted by what is measured). Why i mod G: the
fold depends on the image alone, not on the batch size or the device count, so every model of a
run sees the same folds and one draw resamples the same images for all of them: differences
between models (CL - MIM, a model - its untrained copy) are resampled *paired*.

What is not resampled:
  - sums an analysis declares `FIXED_SUMS` (sums over chosen images, e.g. the attention maps of
    image 0): they enter every replicate unchanged;
  - analyses that declare `BOOTSTRAP = False` (e.g. `tsne`, whose statistic is computed on a few
    chosen images) and analyses whose fold sums would exceed `MAX_FOLDED_NUMBERS`: they get no
    interval, and the report says so.
Multi-pass analyses (probes) resample their evaluation passes: the fitted probe is held fixed
(the interval is over evaluation images, given the probe).
"""
from __future__ import annotations

import numpy as np

from clmim.errors import ClmimError

# An analysis whose fold sums hold more numbers than this per step is not resampled (its sums
# already reach 2^20 numbers for a ViT-B/16 cka: x32 folds would cost more than the forward).
MAX_FOLDED_NUMBERS = 1 << 23
COVERAGE = 0.95


def check_settings(folds, replicates, seed, where: str = "config.intervals") -> None:
  """Refuses settings that cannot give an interval, naming the field at fault."""
  if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 0 \
      or folds == 1:
    raise ClmimError(f"{where}.folds must be 0 (no intervals) or an integer >= 2; got {folds!r}.")
  if folds and (isinstance(replicates, bool) or not isinstance(replicates, (int, np.integer))
                or replicates < 20):
    raise ClmimError(f"{where}.replicates must be an integer >= 20 (percentiles of fewer draws "
                     f"are noise); got {replicates!r}.")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ClmimError(f"{where}.seed must be an integer >= 0; got {seed!r}.")


def resampled(module) -> bool:
  """Whether the analysis `module` takes part in the bootstrap (see the module doc)."""
  return bool(getattr(module, "BOOTSTRAP", True))


def fixed_sums(module) -> tuple:
  """Keys of the module's sums that every replicate takes unchanged."""
  return tuple(getattr(module, "FIXED_SUMS", ()))


def fold_weights(weights, index, folds: int):
  """[G, b] weights: row g keeps the images of fold g (index mod G == g); padding (index -1)
  is in no fold. Rows add up to `weights`."""
  import jax.numpy as jnp
  fold = jnp.where(index >= 0, index % folds, -1)
  member = fold[None, :] == jnp.arange(folds, dtype=fold.dtype)[:, None]
  return jnp.where(member, weights[None, :], 0).astype(weights.dtype)


def draws(folds: int, replicates: int, seed: int) -> np.ndarray:
  """[replicates, folds] multinomial counts (each row sums to `folds`): the same for every
  model of a run, so that resampled differences between models are paired."""
  rng = np.random.default_rng([int(seed), int(folds), int(replicates)])
  return rng.multinomial(folds, np.full(folds, 1.0 / folds), size=replicates)


def replicate_sums(fold_sums: dict, totals: dict, counts) -> dict:
  """One replicate's sums: the folded keys as sum_g counts[g] * fold_sums[key][g], every other
  key of `totals` unchanged."""
  return next(each_replicate(fold_sums, totals, [counts]))


def each_replicate(fold_sums: dict, totals: dict, draws, chunk_numbers: int = 1 << 24):
  """Yields `replicate_sums(fold_sums, totals, counts)` for each row `counts` of `draws`, a
  chunk of replicates at a time: one matrix product per leaf and chunk instead of one per leaf
  and replicate (the chunk holds at most `chunk_numbers` float64 numbers per leaf set)."""
  import jax
  leaves, treedef = jax.tree.flatten(fold_sums)
  leaves = [np.asarray(v, np.float64) for v in leaves]
  per_replicate = max(1, sum(v[0].size for v in leaves))
  chunk = max(1, chunk_numbers // per_replicate)
  draws = np.asarray(draws, np.float64)
  for start in range(0, len(draws), chunk):
    block = draws[start:start + chunk]
    summed = [np.tensordot(block, v, axes=1) for v in leaves]
    for r in range(len(block)):
      out = dict(totals)
      out.update(jax.tree.unflatten(treedef, [s[r] for s in summed]))
      yield out


def percentile_interval(values, axis=0) -> tuple[np.ndarray, np.ndarray]:
  """(low, high) of the central COVERAGE share of `values` along `axis` (NaN ignored)."""
  tail = 100 * (1 - COVERAGE) / 2
  values = np.asarray(values, np.float64)
  with np.errstate(all="ignore"):
    if not np.isfinite(values).any():
      shape = np.delete(np.array(values.shape), axis)
      return np.full(shape, np.nan), np.full(shape, np.nan)
    low, high = np.nanpercentile(values, [tail, 100 - tail], axis=axis)
  return low, high


def curves(module, outputs: list) -> dict:
  """{result key: [R, positions] float64} of the module's curves (Results with a `series`) over
  the replicates' finalize outputs `outputs` (a replicate without the key gives NaN)."""
  out = {}
  for result in module.RESULTS:
    if result.series is None:
      continue
    rows = []
    for replicate in outputs:
      try:
        rows.append(np.asarray(result.series(replicate[result.key]), np.float64))
      except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError):
        rows.append(None)
    length = max((len(r) for r in rows if r is not None), default=0)
    if not length:
      continue
    table = np.full((len(rows), length), np.nan)
    for i, row in enumerate(rows):
      if row is not None and len(row) == length:
        table[i] = row
    out[result.key] = table
  return out
