"""Official checkpoints clmim knows by name, and the download cache that holds them.

Each `Known` entry names the file's source URL, its family and ViT variant (checked against the
file's shapes on load), expected size / sha256 where published, and the eval preprocessing the
model's authors used. Files are cached in $CLMIM_CACHE_DIR (default ~/.cache/clmim/checkpoints).

Downloads show a tqdm progress bar, resume a partial `<file>.part` with an HTTP Range request,
verify size and sha256, and become visible only through an atomic rename. A `<file>.json`
record next to each cached file holds its sha256, so later runs need not re-hash it. With
CLMIM_OFFLINE=1 (or `offline=True`) nothing touches the network: a cached file is used, a
missing one is an error that says where to put it. To add a checkpoint, add an entry to
`KNOWN` (a name, the family, the URL, the variant, the preprocessing) and, once you have the
file, its size and sha256 (`sha256sum file`), so every later download is verified.
"""
from __future__ import annotations

import dataclasses
import json
import os
import urllib.error
import urllib.request
from typing import Optional

from clmim.atomic import write_json_atomic
from clmim.checkpoints import families
from clmim.checkpoints.native import sha256_of
from clmim.errors import ClmimError
from clmim.suggestions import did_you_mean

CACHE_ENV = "CLMIM_CACHE_DIR"
OFFLINE_ENV = "CLMIM_OFFLINE"

@dataclasses.dataclass(frozen=True)
class Known:
  """One official checkpoint: where it lives and what it is."""
  name: str
  family: str
  variant: str
  url: str
  filename: str
  description: str
  size: Optional[int] = None     # bytes, where published
  sha256: Optional[str] = None   # where published or pinned after a first download

  @property
  def preprocessing(self) -> dict:
    return dict(families.get(self.family).preprocessing)


_FB = "https://dl.fbaipublicfiles.com"
# BEiT's files moved to this Azure container; the read-only token in the query runs to 2033.
_BEIT = ("https://conversationhub.blob.core.windows.net/beit-share-public/beit/{}?sv=2021-10-04"
         "&st=2023-06-08T11%3A16%3A02Z&se=2033-06-09T11%3A16%3A00Z&sr=c&sp=r"
         "&sig=N4pfCVmSeq4L4tS8QbrFVsX6f6q844eft8xSuXdxU48%3D")
# SimMIM's ViT-B is only on Google Drive, which may answer with a confirmation page instead.
_SIMMIM = ("https://drive.usercontent.google.com/download?id=1dJn6GYkwMIcoP3zqOEyW1_iQfpBi8UOw"
           "&export=download&confirm=t")


def _entry(name, family, variant, url, description, filename=None):
  filename = filename or url.split("?")[0].rsplit("/", 1)[-1]
  return name, Known(name, family, variant, url, filename, description)


KNOWN = dict([
    _entry("moco_v3_vits16", "moco_v3", "S/16", f"{_FB}/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar",
           "MoCo v3 ViT-S/16, 300 epochs ImageNet-1k (12 heads)"),
    _entry("moco_v3_vitb16", "moco_v3", "B/16", f"{_FB}/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
           "MoCo v3 ViT-B/16, 300 epochs ImageNet-1k (the paper's CL model)"),
    _entry("simmim_vitb16", "simmim", "B/16", _SIMMIM,
           "SimMIM ViT-B/16, 800 epochs ImageNet-1k (the paper's MIM model)",
           "simmim_pretrain__vit_base__img224__800ep.pth"),
    _entry("mae_vitb16", "mae", "B/16", f"{_FB}/mae/pretrain/mae_pretrain_vit_base.pth",
           "MAE ViT-B/16 encoder, 1600 epochs ImageNet-1k"),
    _entry("mae_vitl16", "mae", "L/16", f"{_FB}/mae/pretrain/mae_pretrain_vit_large.pth",
           "MAE ViT-L/16 encoder"),
    _entry("mae_vith14", "mae", "H/14", f"{_FB}/mae/pretrain/mae_pretrain_vit_huge.pth",
           "MAE ViT-H/14 encoder"),
    _entry("mae_vitb16_visualize", "mae", "B/16",
           f"{_FB}/mae/visualize/mae_visualize_vit_base.pth",
           "MAE ViT-B/16 with decoder, pixel target (different weights from mae_vitb16)"),
    _entry("mae_vitb16_full", "mae", "B/16", f"{_FB}/mae/pretrain/mae_pretrain_vit_base_full.pth",
           "MAE ViT-B/16 with decoder, normalised-pixel target"),
    _entry("dino_vits16", "dino", "S/16",
           f"{_FB}/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
           "DINO ViT-S/16 teacher backbone"),
    _entry("dino_vits8", "dino", "S/8",
           f"{_FB}/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
           "DINO ViT-S/8 teacher backbone"),
    _entry("dino_vitb16", "dino", "B/16",
           f"{_FB}/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
           "DINO ViT-B/16 teacher backbone"),
    _entry("dino_vitb8", "dino", "B/8",
           f"{_FB}/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
           "DINO ViT-B/8 teacher backbone"),
    _entry("dino_vitb16_full", "dino", "B/16",
           f"{_FB}/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain_full_checkpoint.pth",
           "DINO ViT-B/16 full training checkpoint (teacher read; student, heads dropped)"),
    _entry("beit_vitb16", "beit", "B/16", _BEIT.format("beit_base_patch16_224_pt22k.pth"),
           "BEiT ViT-B/16 self-supervised on ImageNet-22k (no fine-tuning)"),
    _entry("beit_vitl16", "beit", "L/16", _BEIT.format("beit_large_patch16_224_pt22k.pth"),
           "BEiT ViT-L/16 self-supervised on ImageNet-22k (no fine-tuning)"),
])


def cache_dir() -> str:
  """$CLMIM_CACHE_DIR, or ~/.cache/clmim/checkpoints."""
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "clmim",
                                                   "checkpoints")


def offline_mode() -> bool:
  return os.environ.get(OFFLINE_ENV, "").lower() not in ("", "0", "false", "no")


def _write_record(path: str, record: dict) -> None:
  write_json_atomic(path + ".json", record)


def cached_sha256(path: str) -> str:
  """The cached file's sha256, from its record when size and mtime still match."""
  stat = os.stat(path)
  try:
    with open(path + ".json") as f:
      record = json.load(f)
    if record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
      return record["sha256"]
  except (OSError, ValueError, KeyError):
    pass
  digest = sha256_of(path)
  _write_record(path, {"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
  return digest


def _stream(url: str, part: str, timeout: float, progress: bool, expected_size) -> None:
  """Appends the rest of `url` to `part` (resuming with a Range request when it exists)."""
  from tqdm import tqdm  # imported late: only downloads need it
  have = os.path.getsize(part) if os.path.exists(part) else 0
  headers = {"User-Agent": "clmim"}
  if have:
    headers["Range"] = f"bytes={have}-"
  try:
    response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=timeout)
  except urllib.error.HTTPError as e:
    if e.code == 416 and have and (expected_size is None or have == expected_size):
      return  # the partial file is already complete
    raise ClmimError(f"Download of {url} failed: HTTP {e.code} {e.reason}.") from e
  except (urllib.error.URLError, OSError) as e:
    raise ClmimError(f"Cannot download {url}: {getattr(e, 'reason', e)}. Check the network, or "
                     f"download the file yourself and pass its path.") from e
  with response:
    if "text/html" in response.headers.get("Content-Type", ""):
      raise ClmimError(f"{url} answered with a web page, not a checkpoint (Google Drive does this"
                       f" for large files). Download it in a browser or with gdown and save it "
                       f"as {part[:-len('.part')]}.")
    resumed = have and response.status == 206 and response.headers.get(
        "Content-Range", "").startswith(f"bytes {have}-")
    if not resumed:
      have = 0  # the server ignored the Range request: start over
    length = response.headers.get("Content-Length")
    total = have + int(length) if length else expected_size
    written = 0
    with open(part, "ab" if resumed else "wb") as f, tqdm(
        total=total, initial=have, unit="B", unit_scale=True, disable=not progress,
        desc=os.path.basename(part[:-len(".part")])) as bar:
      try:
        for chunk in iter(lambda: response.read(1 << 20), b""):
          f.write(chunk)
          written += len(chunk)
          bar.update(len(chunk))
      except OSError as e:  # includes http.client.IncompleteRead and timeouts
        raise ClmimError(f"Download of {url} was interrupted ({e}); the partial file {part} is "
                         f"kept and the next attempt resumes it.") from e
    if length and written != int(length):
      raise ClmimError(f"Download of {url} ended early ({have + written} of {total} bytes); the "
                       f"partial file {part} is kept and the next attempt resumes it.")


def download(url: str, dest: str, size: Optional[int] = None, sha256: Optional[str] = None,
             offline: Optional[bool] = None, progress: bool = True,
             timeout: float = 60.0) -> str:
  """Makes sure `dest` holds the file at `url` (verified); returns `dest`. See module doc."""
  offline = offline_mode() if offline is None else offline
  if os.path.exists(dest):
    if sha256 and cached_sha256(dest) != sha256:
      raise ClmimError(f"The cached file {dest} does not match its expected sha256 "
                       f"{sha256[:12]}...; delete it to download it again.")
    return dest
  if offline:
    raise ClmimError(f"{os.path.basename(dest)} is not in the cache ({dest}) and offline mode is "
                     f"on ({OFFLINE_ENV}); download {url} to that path, or pass a local file.")
  os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
  part = dest + ".part"
  _stream(url, part, timeout, progress, size)
  got_size = os.path.getsize(part)
  digest = sha256_of(part)
  if (size is not None and got_size != size) or (sha256 and digest != sha256):
    os.remove(part)  # a corrupt partial must not be resumed
    raise ClmimError(f"Download of {url} is corrupt: got {got_size} bytes with sha256 "
                     f"{digest[:12]}..., expected {size if size is not None else '?'} bytes with "
                     f"sha256 {(sha256 or '?')[:12]}...; the partial file was removed.")
  os.replace(part, dest)  # atomic: readers never see a half-written checkpoint
  stat = os.stat(dest)
  _write_record(dest, {"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                       "url": url})
  return dest


def fetch(name: str, cache: Optional[str] = None, offline: Optional[bool] = None,
          progress: bool = True) -> str:
  """The local path of the known checkpoint `name`, downloading it when needed."""
  if name not in KNOWN:
    raise ClmimError(f"Unknown checkpoint {name!r}{did_you_mean(name, KNOWN)}; known: "
                     f"{', '.join(sorted(KNOWN))}.")
  entry = KNOWN[name]
  return download(entry.url, os.path.join(cache or cache_dir(), entry.filename),
                  entry.size, entry.sha256, offline, progress)
