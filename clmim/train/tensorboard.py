"""TensorBoard event files for the trainer's metrics (through tensorboardX, imported on use).

The trainer writes every metrics.jsonl record also as scalars to workdir/tensorboard/ when
config.tensorboard is True:  tensorboard --logdir runs/
A resumed run adds a new event file to the folder; TensorBoard reads them all.
"""
from __future__ import annotations

import glob
import os
import struct

from clmim.errors import ClmimError

FOLDER = "tensorboard"
PIP = "pip install tensorboardX==2.6.5"


def _tensorboardx():
  try:
    import tensorboardX
  except ImportError as e:
    raise ClmimError(f"config.tensorboard=True needs tensorboardX ({PIP}); or set "
                     "--config.tensorboard=False (metrics.jsonl has the same numbers).") from e
  return tensorboardX


def check_available(config) -> None:
  """One error line before training when config.tensorboard asks for a missing library."""
  if config.get("tensorboard", False):
    _tensorboardx()


class ScalarWriter:
  """Writes {name: number} records as scalars at a step; a no-op when `enabled` is False."""

  def __init__(self, workdir: str, enabled: bool):
    self._writer = None
    if enabled:
      self._writer = _tensorboardx().SummaryWriter(os.path.join(workdir, FOLDER))

  def write(self, step: int, scalars: dict) -> None:
    if self._writer is not None:
      for name, value in scalars.items():
        self._writer.add_scalar(name, float(value), step)
      self._writer.flush()  # a preempted run keeps what it logged

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def read_scalars(workdir: str) -> dict:
  """{tag: [(step, value), ...]} from every event file in workdir/tensorboard, in file order.

  Event files are TFRecord files of `Event` protos (length, crc, data, crc): read here with
  tensorboardX's own proto, without TensorFlow or TensorBoard."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  for path in sorted(glob.glob(os.path.join(workdir, FOLDER, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    position = 0
    while position + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[position:position + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[position + 12:position + 12 + length])
      position += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
  return scalars
