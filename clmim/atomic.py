"""Atomic file writes: a temporary file in the target's folder, renamed over the target only once
complete, so a reader (or a crashed run) never leaves or sees half a file."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Callable, IO, Iterator


def write_atomic(path, write: Callable[[IO[bytes]], None]) -> str:
  """Calls `write(binary file)` into a temporary file, then renames it to `path`."""
  path = os.path.abspath(os.fspath(path))
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def json_text(value, level: int = 0) -> str:
  """JSON indented one space per level, except that a list of numbers, strings, booleans or
  nulls stays on one line: results hold many [block][head] and pixel lists, which one number per
  line made 3-4x longer (and hard to read)."""
  pad, inner = " " * level, " " * (level + 1)
  if isinstance(value, dict) and value:
    items = (f"{inner}{json.dumps(str(k))}: {json_text(v, level + 1)}" for k, v in value.items())
    return "{\n" + ",\n".join(items) + "\n" + pad + "}"
  if isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
    return "[\n" + ",\n".join(inner + json_text(v, level + 1) for v in value) + "\n" + pad + "]"
  return json.dumps(value)


def write_json_atomic(path, payload) -> str:
  """JSON (`json_text`) written atomically."""
  return write_atomic(path, lambda f: f.write(json_text(payload).encode()))


def save_figure_atomic(figure, path, **savefig_kwargs) -> str:
  """A matplotlib Figure written as PNG atomically."""
  return write_atomic(path, lambda f: figure.savefig(f, format="png", **savefig_kwargs))


@contextlib.contextmanager
def removed_unless_complete(folder) -> Iterator[None]:
  """Files the block creates directly in `folder` are removed again if the block raises (a
  Ctrl-C included): outputs written one by one (figures, then results.json) appear together or
  not at all. Files that were there before are left alone."""
  folder = os.fspath(folder)
  before = set(os.listdir(folder))
  try:
    yield
  except BaseException:
    for name in set(os.listdir(folder)) - before:
      path = os.path.join(folder, name)
      if os.path.isfile(path) and not os.path.islink(path):
        os.remove(path)
    raise
