"""A folder of images laid out one sub-folder per class (the ImageNet / torchvision layout).

  root/
    n01440764/ a.JPEG b.JPEG ...
    n01443537/ ...

Class names are the sorted sub-folder names and their positions are the label ids; files are
listed recursively under each class folder and sorted by relative path, so index i is the same
image on every machine and every run (the order torchvision's ImageFolder uses, class-major).
Subsampling keeps the first files of each class (a count or a fraction), so it is fixed too.
Decoding runs in the thread pool of `clmim.data.loader`: PIL releases the GIL while decoding and
resizing, so threads overlap decode with whatever consumes the batches.

Nothing is skipped silently: files whose extension clmim does not read are named in one
warning (and a class folder holding only such files is an error), and before any image is
streamed the header of every image to be read is checked (`clmim.data.image_check`), so every
unreadable file is reported in one error, not one per run.

Pillow is imported when a folder is opened, not when this module is: clmim imports and runs on
the procedural data without it (see `clmim.data.preprocess.pil_image`).
"""
from __future__ import annotations

import collections
import os
import sys
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from clmim.data import image_check, loader
from clmim.data.preprocess import pil_image
from clmim.errors import ClmimError

if TYPE_CHECKING:  # annotations only
  from PIL import Image

NEEDS_PILLOW = "reading image folders"  # what the error says needs Pillow

# TIFF too: PIL reads ordinary 8- and 16-bit TIFFs (RGB, L, CMYK; LZW or deflate compressed).
DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

_warned = set()  # (root, extensions) whose skipped files were already named, this process


def _is_hidden(name: str) -> bool:
  return name.startswith(".")


def _unreadable(path: str, error: OSError) -> ClmimError:
  reason = error.strerror or str(error)
  return ClmimError(f"Cannot read image folder {path!r}: {reason}; expected a readable folder "
                    "(check its permissions, or that the disk is mounted).")


def class_names(root: str, extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> List[str]:
  """The sorted class sub-folders of `root` (hidden ones skipped), listed without reading any
  image; a missing, unreadable or empty root is one ClmimError."""
  accepted = ", ".join(extensions)
  if not os.path.isdir(root):
    what = "is not a folder" if os.path.exists(root) else "does not exist"
    raise ClmimError(f"Image folder {root!r} {what}: expected a folder with one "
                     f"sub-folder of images ({accepted}) per class.")
  try:
    with os.scandir(root) as entries:
      classes = sorted(e.name for e in entries if e.is_dir() and not _is_hidden(e.name))
  except OSError as e:
    raise _unreadable(root, e) from e
  if not classes:
    raise ClmimError(f"Image folder {root!r} has no class sub-folders: expected "
                     f"root/<class>/<image> with images ending in {accepted}.")
  return classes


def _list_images(folder: str, extensions: Tuple[str, ...]) -> Tuple[List[str], List[str]]:
  """(image files, other files) under `folder` (recursively, hidden ones left out), the images
  sorted by path relative to `folder`."""
  found, skipped = [], []

  def fail(error: OSError):
    # os.walk skips folders it cannot list; a silently missing class is worse than an error.
    raise _unreadable(error.filename or folder, error)

  for dirpath, dirnames, filenames in os.walk(folder, onerror=fail, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
    for name in filenames:
      if _is_hidden(name):
        continue
      if name.lower().endswith(extensions):
        found.append(os.path.relpath(os.path.join(dirpath, name), folder))
      else:
        skipped.append(os.path.join(dirpath, name))
  return [os.path.join(folder, rel) for rel in sorted(found)], sorted(skipped)


def _kinds(paths: Sequence[str]) -> str:
  """'.tif (3), .txt (1)': the extensions of `paths`, most frequent first."""
  counts = collections.Counter(os.path.splitext(p)[1].lower() or "(no extension)"
                               for p in paths)
  return ", ".join(f"{ext} ({n})" for ext, n in counts.most_common())


def _scan(root: str, extensions: Tuple[str, ...]):
  """(classes, files, labels, skipped) of the folder: every image in dataset order, and the
  files left out for their extension. A class without images is one ClmimError."""
  accepted = ", ".join(extensions)
  classes = class_names(root, extensions)
  files, labels, skipped = [], [], []
  for label, name in enumerate(classes):
    folder = os.path.join(root, name)
    found, others = _list_images(folder, extensions)
    if not found:
      # An empty class keeps a label that never occurs; it is almost always a copy that went
      # wrong, so refuse it (torchvision does too).
      held = (f"; it holds {len(others)} files clmim does not read: {_kinds(others)}, e.g. "
              f"{others[0]!r} (convert them to PNG or JPEG)") if others else ""
      raise ClmimError(f"Class folder {folder!r} has no images: expected files ending in "
                       f"{accepted}{held}.")
    files += found
    labels += [label] * len(found)
    skipped += others
  return classes, files, labels, skipped


def list_folder(root: str, extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> List[str]:
  """Every image file of `root/<class>/**` in dataset order (layout errors as ImageFolder)."""
  return _scan(os.fspath(root), tuple(extensions))[1]


def _warn_skipped(root: str, extensions: Tuple[str, ...], skipped: Sequence[str]) -> None:
  """One warning line, once per folder and process, naming the files left out."""
  if not skipped or (root, extensions) in _warned:
    return
  _warned.add((root, extensions))
  files = f"{len(skipped)} files" if len(skipped) > 1 else "1 file"
  print(f"clmim: warning: Image folder {root!r}: skipped {files} whose extension clmim does not "
        f"read: {_kinds(skipped)}, e.g. {skipped[0]!r}; clmim reads {', '.join(extensions)} "
        "(convert images in other formats to PNG or JPEG).", file=sys.stderr)


class ImageFolder:
  """Indexable image dataset over `root/<class>/**/<image>`.

  Attributes:
    root: the folder given.
    classes: sorted class names; `classes[label]` names a label.
    files: image paths in dataset order.
    labels: int label per file, same order.
  """

  def __init__(self, root: str, preprocess: Callable[[Image.Image], np.ndarray],
               max_images_per_class: Optional[int] = None,
               extensions: Sequence[str] = DEFAULT_EXTENSIONS, *,
               num_workers: Optional[int] = None, fraction_per_class: Optional[float] = None,
               check: bool = True):
    """Lists the files, checks the layout and (with `check`) every selected file's header; no
    pixel is decoded yet.

    Args:
      root: folder with one sub-folder per class.
      preprocess: maps a PIL image to a float32 array [H, W, 3] (e.g. `EvalPreprocess`).
      max_images_per_class: keep only the first n files (in sorted order) of every class.
      extensions: accepted file name endings, case-insensitive.
      num_workers: decoding threads for `batches`; default min(8, number of CPUs).
      fraction_per_class: keep the first int(fraction * n) of the n files of every class (the
        official notebooks' subsample); exclusive with max_images_per_class.
      check: check the header of every selected file now (see `check`); False leaves that to
        the caller, who may read fewer of them (`EvalImages`, with its num_images cap).
    """
    # Before anything else: without Pillow no file of the folder can be decoded, and finding
    # that out after listing (or after the models loaded) wastes the user's time.
    pil_image(NEEDS_PILLOW)
    self.root = os.fspath(root)
    self.preprocess = preprocess
    if isinstance(extensions, str):
      extensions = (extensions,)
    self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower()
                            for e in extensions)
    if max_images_per_class is not None and (
        isinstance(max_images_per_class, bool) or not isinstance(max_images_per_class, int)
        or max_images_per_class <= 0):
      raise ClmimError(f"max_images_per_class = {max_images_per_class!r}: expected a positive "
                       "integer or None.")
    self.classes, files, labels, skipped = _scan(self.root, self.extensions)
    _warn_skipped(self.root, self.extensions, skipped)
    keep = loader.select_per_class(labels, max_images_per_class, fraction_per_class,
                                   where=f"Image folder {self.root!r}")
    self.files = [files[i] for i in keep]
    self.labels = [labels[i] for i in keep]
    self.num_workers = num_workers or loader.default_num_workers()
    if check:
      self.check()

  def check(self, indices: Optional[Sequence[int]] = None, progress: bool = True) -> None:
    """Checks the header of the images at `indices` (all when None), each list once per
    process; every unreadable file is named in one ClmimError (`clmim.data.image_check`)."""
    files = self.files if indices is None else [self.files[int(i)] for i in indices]
    image_check.check_files(files, self.root, progress=progress)

  def __len__(self) -> int:
    return len(self.files)

  def load(self, index: int) -> np.ndarray:
    """Decodes and preprocesses image `index`; undecodable files raise ClmimError naming them."""
    path = self.files[index]
    Image = pil_image(NEEDS_PILLOW)  # the module, under its usual name
    try:
      with Image.open(path) as image:
        image.load()
        return self.preprocess(image)
    except (Image.UnidentifiedImageError, Image.DecompressionBombError, OSError,
            SyntaxError, ValueError) as e:
      # Mostly damage past the header (a truncated copy or download), which the header check
      # cannot see; one line, whatever thread it surfaces from.
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ClmimError(f"Cannot decode image {path!r} ({reason}): expected a complete image "
                       "file (one cut short by an interrupted copy passes the header check and "
                       "fails only here); replace or remove it.") from e

  def __getitem__(self, index: int) -> Tuple[np.ndarray, int]:
    """Returns (image float32 [H, W, 3], label int)."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
      raise TypeError(f"ImageFolder indices are integers, got {type(index).__name__}.")
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} images in {self.root!r}.")
    return self.load(int(index)), self.labels[index]

  def batches(self, batch_size: int, num_images: Optional[int] = None,
              prefetch_batches: int = 2) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Yields (images float32 [b, H, W, 3], labels int32 [b]) in dataset order.

    Covers the first `num_images` images (all when None; more than there are means all); the
    last batch is smaller when batch_size does not divide that count. Up to `prefetch_batches`
    batches beyond the current one are decoded ahead in the thread pool.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
      raise ClmimError(f"batch_size = {batch_size!r}: expected a positive integer.")
    if num_images is not None and (not isinstance(num_images, int) or num_images < 0):
      raise ClmimError(f"num_images = {num_images!r}: expected a non-negative integer or None.")
    n = len(self) if num_images is None else min(num_images, len(self))
    if n == 0:
      return
    # The preprocessing fixes the shape; it is needed only to pad, which never happens here.
    shape = getattr(self.preprocess, "output_shape", None) or self.load(0).shape
    start = 0
    for images, _ in loader.load_batches(self.load, range(n), batch_size, shape,
                                         self.num_workers, prefetch_batches):
      yield images, np.asarray(self.labels[start:start + len(images)], np.int32)
      start += len(images)

  def __repr__(self):
    return (f"ImageFolder({self.root!r}, {len(self.classes)} classes, {len(self)} images, "
            f"preprocess={self.preprocess!r})")
