"""Training batches for the one trainer: procedural images, an image folder or a TFDS split.

A step's data depends on the step alone. Step t covers positions [t*B, (t+1)*B) of one endless
order of the training images (B = config.batch_size, the global batch), and process p of P
reads only rows [p*B/P, (p+1)*B/P) of it — its own devices' share, which the trainer assembles
into the global batch with `jax.make_array_from_process_local_data`. A run resumed at step t
(after a preemption, say) therefore reads exactly what the uninterrupted run read from step t
on: the iterator's position is the step, which every checkpoint holds.

Each source's part is its module in clmim/data/sources/ (`training_images`, `training_batches`):
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

from clmim.data import sources
from clmim.data.sources import decoded
from clmim.errors import ClmimError

def local_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[lo, hi): the rows of every global batch that process `process_index` loads."""
  if batch_size % process_count:
    raise ClmimError(f"config.batch_size={batch_size}: expected a multiple of the "
                     f"{process_count} processes.")
  per_process = batch_size // process_count
  return process_index * per_process, (process_index + 1) * per_process


def check_source(data_cfg, second_view: str) -> None:
  """One error line for a training data config that cannot work (before anything runs)."""
  sources.of(data_cfg).check_training(data_cfg, second_view)


def open_images(data_cfg, path: str | None = None, split: str | None = None,
                crop_pct: float = 1.0):
  """The training images of the configured source (or, with `path` / `split`, another folder /
  split of it): `len` and `load(i)` -> float32 [S, S, 3] in [0, 1] (shorter side to
  S / crop_pct, then a centre crop) for decoded sources, the procedural dataset otherwise.
  Opening lists or indexes them (no decoding) and raises one ClmimError for a missing folder,
  an empty split, a missing Pillow, ..."""
  return sources.of(data_cfg).training_images(data_cfg, path=path, split=split,
                                              crop_pct=crop_pct)


def _grain():
  try:
    import grain
  except ImportError as e:
    raise ClmimError("Training on an image folder or TFDS needs grain: pip install "
                     "grain==0.2.18") from e
  return grain


def real_batches(images, batch_size: int, start_step: int, rows: tuple[int, int], seed: int,
                 read_threads: int, labels: np.ndarray | None = None) -> Iterator[dict]:
  """Endless {"image": float32 [hi - lo, S, S, 3]} for steps start_step, start_step + 1, ...:
  rows [lo, hi) of each step's global batch, in a seeded order reshuffled every epoch. With
  `labels` (one per image) each batch also holds "label" int32 [hi - lo]."""
  grain = _grain()
  lo, hi = rows
  order = grain.MapDataset.range(len(images)).shuffle(seed=seed).repeat()
  per_process = hi - lo

  def example_at(local_position):  # this process's k-th image -> its place in the global order
    step, row = divmod(int(local_position), per_process)
    index = int(order[step * batch_size + lo + row])
    label = -1 if labels is None else int(labels[index])
    return images.load(index), np.int32(label)

  def stack(examples):
    return np.stack([e[0] for e in examples]), np.asarray([e[1] for e in examples], np.int32)

  local = grain.MapDataset.range(start_step * per_process, 2**62).map(example_at)
  batches = local.batch(per_process, batch_fn=stack).to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads))
  for image, label in batches:
    yield {"image": image} if labels is None else {"image": image, "label": label}


def class_labels(images, where: str) -> np.ndarray:
  """The class label of every image of an opened image folder / TFDS split, or one error line
  when it has none (a TFDS split without a ClassLabel feature)."""
  return decoded.training_labels(images, where)


def class_count(data_cfg, label: str) -> int:
  """How many classes `label` has: the procedural factor's, or the image folder's sub-folders /
  the TFDS split's ClassLabel (opened, not decoded; no labels -> one error line)."""
  return sources.of(data_cfg).class_count(data_cfg, label)


def held_out(data_cfg, finetune_cfg):
  """(load(indices) -> float32 [n, S, S, 3] in [0, 1], labels [N]) of fine-tuning's held-out
  images: the procedural split "validation" (finetune.eval_images of them), an image folder
  (finetune.eval_path) or a TFDS split (finetune.eval_split), centre-cropped at
  finetune.eval_crop_pct; eval_images > 0 keeps the first that many."""
  return sources.of(data_cfg).held_out(data_cfg, finetune_cfg)
