"""The header check of an image folder: every problem of every file, reported once, up front.

`check_files(paths, root)` opens each file with PIL, which reads only the header (format, size,
mode), not the pixels: about 45 us per 375x500 JPEG (page cache warm, two threads on a 2-core
machine) against 2.3 ms for a full decode, so ~2.3 s for 50,000 JPEGs where a decode pass takes
two minutes. It finds what makes a file unreadable before any image is streamed, and reports
all of them in ONE error: a file PIL does not recognise (not an image, an empty file, another
format), one that cannot be opened, one larger than twice PIL's decompression-bomb limit (PIL
refuses to decode it) and one whose mode cannot become RGB. What PIL warns about while opening
a file (an image above the bomb limit, which is still read; corrupt metadata) becomes one
`clmim: warning:` line naming the files, and the same warning is not shown raw again when the
image is decoded later, inside a progress bar.

Damage past the header (a truncated JPEG) is found only by decoding; `ImageFolder.load` then
raises one error naming the file. The headers are read by a few threads (on a network file
system each open waits for the server); a progress bar appears when the check takes more than a
second. A list of files already checked in this process is not checked again (the analysis job
opens the same folder once per model and once more for its probes).

  python -m clmim.data.image_check FOLDER   # every problem of FOLDER, one line each
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shlex
import sys
import threading
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple

from clmim.data import loader
from clmim.data.preprocess import pil_image, rgb_convertible
from clmim.errors import ClmimError

NEEDS_PILLOW = "checking image files"
LISTED = 5  # problems (and warned-about files) named in the one-line messages
PROGRESS_AFTER_S = 1.0  # the check's progress bar appears only when it takes longer than this

_local = threading.local()  # .sink: the warnings list of the file this thread is opening
_checked = set()  # fingerprints of the file lists checked without a problem, this process


@dataclasses.dataclass(frozen=True)
class FileReport:
  """What the header check found about one file.

  Attributes:
    path: the file.
    problem: why it cannot be read as an image, or None when it can.
    notes: what PIL warned about it (it is read anyway), in words.
    raised: the (category, message) of each warning PIL emitted, to silence later repeats.
    oversized: whether it is above PIL's decompression-bomb limit (and read anyway).
  """
  path: str
  problem: Optional[str] = None
  notes: Tuple[str, ...] = ()
  raised: Tuple[Tuple[type, str], ...] = ()
  oversized: bool = False


def _megapixels(pixels: int) -> str:
  """'95 megapixels', '1.2 megapixels', '3000 pixels'."""
  if pixels >= 1e7:
    return f"{pixels / 1e6:.0f} megapixels"
  return f"{pixels / 1e6:.1f} megapixels" if pixels >= 1e5 else f"{pixels} pixels"


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def inspect(path: str) -> FileReport:
  """Opens the header of `path` (no pixel data is read) and says what is wrong with it, if
  anything. Warnings are attributed to the file only inside `_warnings_by_file`."""
  Image = pil_image(NEEDS_PILLOW)  # the module, under its usual name
  _local.sink = sink = []
  notes = []
  size = mode = None
  try:
    with Image.open(path) as image:
      size, mode = image.size, image.mode
  except Image.DecompressionBombError as e:
    # Image.open refuses it before handing over its size; the message holds the pixel count.
    found = re.search(r"\((\d+) pixels\)", str(e))
    pixels = f"{_megapixels(int(found.group(1)))}, " if found else ""
    return FileReport(path, f"{pixels}over twice PIL's decompression-bomb limit of "
                            f"{_megapixels(Image.MAX_IMAGE_PIXELS)}, so PIL refuses to decode it: "
                            "downscale it")
  except Image.UnidentifiedImageError:
    try:
      empty = os.path.getsize(path) == 0
    except OSError:
      empty = False
    return FileReport(path, "an empty file" if empty else
                      "not an image PIL recognises: damaged, or not the format its name says")
  except OSError as e:
    return FileReport(path, f"cannot be opened: {e.strerror or _one_line(e)}")
  except Exception as e:  # noqa: BLE001 (damaged headers raise SyntaxError, ValueError, ...)
    return FileReport(path, f"damaged header: {_one_line(e)}")
  finally:
    _local.sink = None
  raised = tuple((w.category, str(w.message)) for w in sink)
  limit = Image.MAX_IMAGE_PIXELS
  oversized = bool(limit) and size[0] * size[1] > limit
  if oversized:  # said in words here; PIL's own text ("could be decompression bomb") is not
    notes.append(_megapixels(size[0] * size[1]))
  notes += [f"{w.category.__name__}: {_one_line(w.message)}" for w in sink
            if not issubclass(w.category, Image.DecompressionBombWarning)]
  if not rgb_convertible(mode):
    return FileReport(path, f"PIL mode {mode!r}, which cannot be converted to RGB", (), raised)
  return FileReport(path, None, tuple(notes), raised, oversized)


@contextlib.contextmanager
def _warnings_by_file() -> Iterator[None]:
  """While open, a warning raised in a thread that is inspecting a file goes to that file's
  report instead of the terminal; other warnings are shown as usual.

  `warnings.catch_warnings` swaps process-wide state (not thread-safe before Python 3.14), so it
  is entered once, here in the calling thread, around the whole check; the worker threads only
  set which file they are opening (`_local.sink`)."""
  with warnings.catch_warnings():
    warnings.simplefilter("always")  # each file's warning, not only the first of a code line
    forward = warnings.showwarning

    def route(message, category, filename, lineno, file=None, line=None):
      sink = getattr(_local, "sink", None)
      if sink is None:
        forward(message, category, filename, lineno, file, line)
      else:
        sink.append(warnings.WarningMessage(message, category, filename, lineno, file, line))

    warnings.showwarning = route
    yield


def _silence_repeats(reports: Sequence[FileReport]) -> None:
  """Hides, for the rest of the process, the raw warnings the check has reported by file name:
  decoding the same image later (in the loader's threads, where catch_warnings cannot be used)
  raises them again, inside the progress bar."""
  Image = pil_image(NEEDS_PILLOW)
  for report in reports:
    for category, message in report.raised:
      # The bomb warning's text holds the pixel count; one filter for the category will do.
      # (filterwarnings replaces an identical filter rather than adding a second.)
      bomb = issubclass(category, Image.DecompressionBombWarning)
      warnings.filterwarnings("ignore", message="" if bomb else re.escape(message),
                              category=category)


def _relative(path: str, root: Optional[str]) -> str:
  if root:
    rel = os.path.relpath(path, root)
    if not rel.startswith(os.pardir):
      return rel
  return path


def _listing(items: List[str], total: int) -> str:
  more = total - len(items)
  return "; ".join(items) + (f"; and {more} more" if more > 0 else "")


def _fingerprint(paths: Sequence[str]) -> str:
  Image = pil_image(NEEDS_PILLOW)
  digest = hashlib.sha1(str(Image.MAX_IMAGE_PIXELS).encode())
  for path in paths:
    digest.update(os.fsencode(path) + b"\0")
  return digest.hexdigest()


def inspect_all(paths: Sequence[str], what: str = "images", progress: bool = True,
                num_workers: Optional[int] = None) -> List[FileReport]:
  """The report of every file of `paths`, in order (headers read by `num_workers` threads, a
  progress bar after a second)."""
  import tqdm  # the rest of clmim's progress bars are tqdm's too
  workers = num_workers or loader.default_num_workers()
  reports = []
  with _warnings_by_file(), tqdm.tqdm(total=len(paths), desc=f"checking {what}", unit="file",
                                      delay=PROGRESS_AFTER_S, leave=False, dynamic_ncols=True,
                                      disable=not progress) as bar:
    for report in loader.ordered_map(inspect, paths, workers, 8 * workers):
      reports.append(report)
      bar.update(1)
  return reports


def check_files(paths: Sequence[str], root: Optional[str] = None, where: Optional[str] = None,
                progress: bool = True) -> None:
  """Checks the header of every file of `paths` once per process (see the module docstring).

  Args:
    paths: the files, in the order they will be read.
    root: the folder they are in; messages name them relative to it.
    where: what the files are, for the messages (default "Image folder '<root>'").
    progress: allow the progress bar (shown only when the check takes over a second).

  Raises:
    ClmimError: one line with the number of unreadable files and the first few, each with why.
  """
  if not paths:
    return
  key = _fingerprint(paths)
  if key in _checked:
    return
  where = where or (f"Image folder {root!r}" if root else "Images")
  reports = inspect_all(paths, f"{len(paths)} images" + (f" in {root}" if root else ""),
                        progress)
  _silence_repeats(reports)
  noted = [r for r in reports if r.notes and not r.problem]
  if noted:
    named = [f"{_relative(r.path, root)!r} ({', '.join(r.notes)})" for r in noted[:LISTED]]
    advice = "they are read anyway"
    if any(r.oversized for r in noted):
      limit = _megapixels(pil_image(NEEDS_PILLOW).MAX_IMAGE_PIXELS)
      advice = (f"images above PIL's decompression-bomb limit of {limit} are read anyway, but "
                "slowly and with much memory: downscale them")
    print(f"clmim: warning: {where}: PIL warns about {len(noted)} of "
          f"{_count(len(paths), 'image')}: "
          f"{_listing(named, len(noted))}; {advice}.", file=sys.stderr)
  bad = [r for r in reports if r.problem]
  if bad:
    named = [f"{_relative(r.path, root)!r} ({r.problem})" for r in bad[:LISTED]]
    every = f" (python -m clmim.data.image_check {shlex.quote(root)} lists all)" \
        if root and len(bad) > LISTED else ""
    raise ClmimError(f"{where}: {len(bad)} of {_count(len(paths), 'file')} cannot be read as "
                     "images: "
                     f"{_listing(named, len(bad))}{every}; expected every file to be an image "
                     "PIL can read: replace or remove them.")
  _checked.add(key)


def _one_line(error) -> str:
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__


def main(argv: Sequence[str]) -> int:
  """Lists every unreadable file (and every warning) of the image folders named in `argv`."""
  from clmim.data import image_folder
  if len(argv) < 1 or any(a.startswith("-") for a in argv):
    print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
    return 2
  status = 0
  for root in argv:
    try:
      files = image_folder.list_folder(root)
    except ClmimError as e:
      print(f"clmim: error: {e}", file=sys.stderr)
      status = 1
      continue
    reports = inspect_all(files, f"{len(files)} images in {root}")
    for report in reports:
      if report.problem:
        print(f"{report.path}: {report.problem}")
        status = 1
      elif report.notes:
        print(f"{report.path}: readable; {', '.join(report.notes)}")
    bad = sum(1 for r in reports if r.problem)
    print(f"{root}: {len(files)} files, {bad} unreadable.", file=sys.stderr)
  return status


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
