"""Training batches for the one trainer: procedural images, an image folder or a TFDS split.

A step's data depends on the step alone. Step t covers positions [t*B, (t+1)*B) of one endless
order of the training images (B = config.batch_size, the global batch), and process p of P
reads only rows [p*B/P, (p+1)*B/P) of it — its own devices' share, which the trainer assembles
into the global batch with `jax.make_array_from_process_local_data`. A run resumed at step t
(after a preemption, say) therefore reads exactly what the uninterrupted run read from step t
on: the iterator's position is the step, which every checkpoint holds.

- "synthetic": the procedural shapes x textures split (clmim/data/synthetic.py), rendered
  ahead by `data.render_workers`; the only source with MoCo's redrawn second views.
- "image_folder" (`data.path`, one sub-folder per class; labels unused) and "tfds"
  (`data.tfds_name`, `data.tfds_split`, `data.data_dir`; read through `tfds.data_source`, no
  TensorFlow): read through grain — a `MapDataset` shuffled with `data.seed` and reshuffled
  every epoch, decoded by `data.read_threads` threads (in order, so the batches do not depend
  on the thread count). Each image is resized (shorter side to `data.image_size`) and centre-
  cropped on the host; the objective's random resized crop and colour augmentations then run on
  the devices, on that image. The official recipes crop the full-resolution image instead.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from clmim.errors import ClmimError

SOURCES = ("synthetic", "image_folder", "tfds")


def local_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[lo, hi): the rows of every global batch that process `process_index` loads."""
  if batch_size % process_count:
    raise ClmimError(f"config.batch_size={batch_size}: expected a multiple of the "
                     f"{process_count} processes.")
  per_process = batch_size // process_count
  return process_index * per_process, (process_index + 1) * per_process


def check_source(data_cfg, second_view: str) -> None:
  """One error line for a training data config that cannot work (before anything runs)."""
  source = data_cfg.get("source", "synthetic")
  if source not in SOURCES:
    raise ClmimError(f"config.data.source={source!r}: expected one of {SOURCES}.")
  if source != "synthetic" and second_view:
    raise ClmimError(f"config.augment.second_view={second_view!r} redraws procedural images; "
                     f"with config.data.source={source!r} set it to '' (both views are then "
                     "augmentations of the one image).")
  if source == "image_folder" and not data_cfg.path:
    raise ClmimError("config.data.source='image_folder' needs config.data.path: a folder with "
                     "one sub-folder of images per class.")
  if source == "tfds" and not data_cfg.tfds_name:
    raise ClmimError("config.data.source='tfds' needs config.data.tfds_name, e.g. "
                     "'imagenet2012'.")


def open_images(data_cfg):
  """The training images of an image_folder or tfds source: `len` and `load(i)` -> float32
  [S, S, 3], normalised with data.mean / data.std. Opening lists or indexes them (no decoding)
  and raises one ClmimError for a missing folder, an empty split, a missing Pillow, ..."""
  from clmim.data.preprocess import EvalPreprocess  # Pillow is imported on first use
  preprocess = EvalPreprocess(data_cfg.image_size, crop_pct=1.0, mean=data_cfg.mean,
                              std=data_cfg.std, where="config.data")
  if data_cfg.source == "image_folder":
    from clmim.data.image_folder import ImageFolder
    return ImageFolder(data_cfg.path, preprocess, num_workers=1)
  from clmim.data.tfds_source import TfdsImages
  images = TfdsImages(data_cfg.tfds_name, data_cfg.tfds_split, preprocess,
                      data_dir=data_cfg.data_dir or None)
  if not images.random_access:
    raise ClmimError(f"TFDS {data_cfg.tfds_name} split {data_cfg.tfds_split!r} is stored as "
                     "tfrecord, which can only be streamed in order; training needs random "
                     "access: prepare it as array_record (tfds build --file_format=array_record).")
  return images


def _grain():
  try:
    import grain
  except ImportError as e:
    raise ClmimError("Training on an image folder or TFDS needs grain: pip install "
                     "grain==0.2.18") from e
  return grain


def real_batches(images, batch_size: int, start_step: int, rows: tuple[int, int], seed: int,
                 read_threads: int) -> Iterator[dict]:
  """Endless {"image": float32 [hi - lo, S, S, 3]} for steps start_step, start_step + 1, ...:
  rows [lo, hi) of each step's global batch, in a seeded order reshuffled every epoch."""
  grain = _grain()
  lo, hi = rows
  order = grain.MapDataset.range(len(images)).shuffle(seed=seed).repeat()
  per_process = hi - lo

  def image_at(local_position):  # this process's k-th image -> its place in the global order
    step, row = divmod(int(local_position), per_process)
    return images.load(int(order[step * batch_size + lo + row]))

  local = grain.MapDataset.range(start_step * per_process, 2**62).map(image_at)
  batches = local.batch(per_process, batch_fn=np.stack).to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads))
  for batch in batches:
    yield {"image": batch}
