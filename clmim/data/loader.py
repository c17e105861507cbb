"""Which images an evaluation reads, and the worker threads that decode them, in a fixed order.

Three pieces shared by every image source (image folders, TFDS, synthetic):

- `select_per_class`: deterministic subsampling, the first N (or the first fraction) of each
  class in dataset order, as the official notebooks' `subsample(dataset, ratio)` does.
- `ordered_map`: runs a function over a stream in a thread pool and yields the results in input
  order, with a bounded number in flight. PIL releases the GIL while it decodes and resamples,
  so threads give real parallelism without pickling datasets into worker processes.
- `load_batches`: turns a list of dataset positions (with -1 for padding slots) into batches of
  (images, weights); padding is zeros with weight 0, so a process whose shard is short still
  runs as many steps as the others (see `clmim.analysis.runner.Analyzer.plan`).
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
from typing import Callable, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np

from clmim.errors import ClmimError

PAD = -1  # a position that is padding, not an image


def default_num_workers() -> int:
  """Decode threads when none are asked for: one per CPU core, at most 8."""
  return max(1, min(8, os.cpu_count() or 1))


def select_per_class(labels: Sequence[int], max_per_class: Optional[int] = None,
                     fraction: Optional[float] = None, where: str = "config.data") -> np.ndarray:
  """Positions of the first images of each class, in dataset order.

  Args:
    labels: the label of every image, in dataset order.
    max_per_class: keep at most this many images of each class (None or 0: no cap).
    fraction: keep the first int(fraction * class size) images of each class (None or 0: all);
      int() truncates, as the official notebooks' `subsample` does, so a class of 50 images
      with fraction 2**-6 keeps none of them.
    where: what the settings belong to, for error messages (e.g. "config.data").

  Returns:
    int64 positions into the dataset, ascending.
  """
  labels = np.asarray(labels)
  if max_per_class and (isinstance(max_per_class, bool) or int(max_per_class) != max_per_class
                        or max_per_class < 0):
    raise ClmimError(f"{where}: max_images_per_class = {max_per_class!r}: expected a "
                     "non-negative integer (0 = all).")
  if fraction and not 0.0 < float(fraction) <= 1.0:
    raise ClmimError(f"{where}: fraction_per_class = {fraction!r}: expected a number in (0, 1] "
                     "(0 = all).")
  if max_per_class and fraction:
    raise ClmimError(f"{where}: set max_images_per_class or fraction_per_class, not both.")
  if not max_per_class and not fraction:
    return np.arange(len(labels), dtype=np.int64)
  keep = np.zeros(len(labels), bool)
  largest = 0
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)  # ascending: dataset order within the class
    largest = max(largest, len(members))
    count = int(max_per_class) if max_per_class else int(len(members) * float(fraction))
    keep[members[:count]] = True
  if len(labels) and not keep.any():
    raise ClmimError(f"{where}: fraction_per_class = {fraction} keeps no image (the largest "
                     f"class has {largest}); expected at least 1/{largest}.")
  return np.flatnonzero(keep).astype(np.int64)


def ordered_map(fn: Callable, items: Iterable, num_workers: int,
                max_in_flight: int) -> Iterator:
  """Yields fn(item) for every item, in input order, computed by `num_workers` threads.

  At most `max_in_flight` results are pending at once, so memory stays bounded however long the
  stream is. The items are drawn in the calling thread (a sequential reader can feed them).
  Closing the generator early cancels what nobody will read; an error in `fn` is raised here,
  at the position of the item that caused it.
  """
  pool = concurrent.futures.ThreadPoolExecutor(max(1, num_workers), "clmim-load")
  pending = collections.deque()
  try:
    for item in items:
      if len(pending) >= max(1, max_in_flight):
        yield pending.popleft().result()
      pending.append(pool.submit(fn, item))
    while pending:
      yield pending.popleft().result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def load_batches(load: Callable[[int], np.ndarray], positions: Sequence[int], batch_size: int,
                 image_shape: Tuple[int, ...], num_workers: Optional[int] = None,
                 prefetch_batches: int = 2,
                 stream: Optional[Callable[[Sequence[int]], Iterable]] = None,
                 ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Yields (images float32 [b, *image_shape], weights float32 [b]) for `positions` in order.

  Args:
    load: position -> preprocessed float32 image (run in the worker threads). With `stream`,
      it maps a streamed record to the image instead.
    positions: dataset positions; PAD (-1) gives a zero image with weight 0.
    batch_size: images per yielded batch (the last one may be smaller).
    image_shape: shape of one image, for the padding.
    num_workers: decode threads (default: `default_num_workers()`).
    prefetch_batches: batches decoded ahead of the one being consumed.
    stream: for sources without random access (tf.data): called once with the positions, it
      yields one record per position (None for PAD), in order; `load` then decodes records.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
    raise ClmimError(f"batch_size = {batch_size!r}: expected a positive integer.")
  positions = [int(p) for p in positions]
  workers = num_workers or default_num_workers()
  zeros = np.zeros(image_shape, np.float32)
  items = stream(positions) if stream is not None else positions
  skip = None if stream is not None else PAD

  def work(item):
    if item is None or (skip is not None and item == skip):
      return None
    return load(item)

  window = (1 + max(0, prefetch_batches)) * batch_size
  images, weights = [], []
  for image in ordered_map(work, items, workers, window):
    images.append(zeros if image is None else image)
    weights.append(0.0 if image is None else 1.0)
    if len(images) == batch_size:
      yield np.stack(images), np.asarray(weights, np.float32)
      images, weights = [], []
  if images:
    yield np.stack(images), np.asarray(weights, np.float32)
