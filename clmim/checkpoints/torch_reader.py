"""Reads PyTorch checkpoints without PyTorch, and without running code hidden in a pickle.

Formats:
- the zip archive `torch.save` writes (PyTorch >= 1.6): `<dir>/data.pkl` (a pickle of the
  object) plus one uncompressed entry per storage `<dir>/data/<key>`. Tensors come back as numpy
  arrays that view a copy-on-write memory map of the file, so reading is cheap and only the
  tensors a caller touches are paged in;
- `.safetensors` (an 8-byte header length, a JSON header, raw little-endian tensors);
- `.npz` (numpy, read with `allow_pickle=False`).

Safety: the pickle is read by `_Unpickler`, whose `find_class` never imports anything. The few
globals a checkpoint needs (tensor/parameter rebuilds, storage types, OrderedDict, numpy scalars)
map to functions written here; globals from modules that can run code (os, subprocess, builtins
eval/exec/getattr, ...) are refused with a ClmimError; every other global (a yacs CfgNode, an
argparse.Namespace, anything unknown) becomes an inert `Placeholder` that only records what it
was given. Legacy (pre-zip) torch files are refused with an explanation rather than parsed.
"""
from __future__ import annotations

import builtins
import collections
import json
import mmap
import os
import pickle
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np

from clmim.errors import ClmimError

# torch storage class name -> numpy dtype (little-endian; torch writes native = little).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
# Modules whose globals exist to run code, open files or import more of it. A pickle naming
# one of these is malicious or broken; either way it is refused, not merely neutralised.
_DANGEROUS_MODULES = {
    "os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "runpy", "code", "codeop",
    "ctypes", "pty", "socket", "multiprocessing", "pickle", "_pickle", "marshal", "types",
    "functools", "operator", "webbrowser", "platform", "signal", "threading", "_thread",
    "asyncio", "io", "_io", "tempfile", "pathlib", "glob", "urllib", "http", "ftplib",
    "smtplib", "inspect", "pdb", "bdb", "timeit", "trace", "profile", "cProfile", "site",
    "pkgutil", "zipimport", "shelve", "dbm", "sqlite3", "commands", "popen2", "nturl2path",
}
_SAFE_BUILTINS = {"set", "frozenset", "list", "dict", "tuple", "bytearray", "bytes", "complex",
                  "int", "float", "str", "bool", "slice", "range"}


class Placeholder(dict):
  """An inert stand-in for a pickled object of a class clmim does not import.

  It records the constructor arguments (`args`) and pickled state (`state`), keeps dict items
  (a yacs CfgNode is a dict), and answers attribute reads from both, so `ckpt["args"].arch`
  (argparse.Namespace) or `ckpt["config"].MODEL.VIT.DEPTH` (CfgNode) still work.
  """
  global_name = "?"

  def __init__(self, *args, **kwargs):  # never calls anything: just remembers
    super().__init__()
    self.__dict__["args"], self.__dict__["kwargs"], self.__dict__["state"] = args, kwargs, None

  def __setstate__(self, state):
    self.__dict__["state"] = state

  def __getattr__(self, key):
    if key.startswith("__"):
      raise AttributeError(key)
    if key in self:
      return self[key]
    state = self.__dict__.get("state")
    if isinstance(state, tuple) and state and isinstance(state[0], dict):
      state = state[0]  # (dict state, slot state)
    if isinstance(state, dict) and key in state:
      return state[key]
    raise AttributeError(f"{self.global_name} placeholder has no attribute {key!r}")

  def __repr__(self):
    return f"<{self.global_name} placeholder {dict(self) or self.__dict__.get('state')!r}>"


_PLACEHOLDERS: dict = {}


def _placeholder_class(module: str, name: str) -> type:
  key = f"{module}.{name}"
  if key not in _PLACEHOLDERS:
    _PLACEHOLDERS[key] = type(name, (Placeholder,), {"global_name": key})
  return _PLACEHOLDERS[key]


class _StorageType:
  """What a `torch.FloatStorage` global resolves to: just its dtype."""

  def __init__(self, name):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """A numpy view of `storage` with torch's (size, stride) in elements; bounds-checked."""
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
    raise ClmimError(f"malformed tensor record (size {size}, stride {stride}, offset {offset})")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise ClmimError(f"tensor of size {size} reads past the end of its storage "
                     f"({storage.size} elements)")
  item = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(storage[offset:], size, [s * item for s in stride])


def _rebuild_parameter(data, *unused):
  return data  # requires_grad and hooks mean nothing here


def _rebuild_from_type(func, new_type, args, state):
  return func(*args)  # func was itself resolved by find_class, so it is one of ours


def _numpy_reconstruct(subtype, shape, dtype):
  if subtype is not np.ndarray:
    raise ClmimError(f"refusing to rebuild a numpy array of type {subtype!r}")
  return np.ndarray.__new__(np.ndarray, shape, dtype)


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype):
    raise ClmimError(f"refusing numpy scalar of dtype {dtype!r}")
  if dtype.hasobject:
    return data
  return np.frombuffer(data, dtype, count=1)[0]


def _codecs_encode(text, encoding="utf-8"):
  # Protocol-2 pickles of bytes use _codecs.encode(str, 'latin1'); allow only plain codecs.
  if encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii") or not isinstance(text, str):
    raise ClmimError(f"refusing _codecs.encode with encoding {encoding!r}")
  return text.encode(encoding)


def _reconstructor(cls, base, state=None):
  # copyreg._reconstructor as used by protocol 0/1 pickles; only ever builds our own classes.
  if isinstance(cls, type) and issubclass(cls, Placeholder):
    return cls()
  if cls in (dict, collections.OrderedDict, list, set):
    return cls()
  raise ClmimError(f"refusing to reconstruct {cls!r}")


def _newobj(cls, *args):
  return _reconstructor(cls, object)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): lambda *a: collections.defaultdict(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copyreg", "__newobj__"): _newobj,
}


def resolve_global(module: str, name: str) -> Any:
  """What a pickled global `module.name` becomes; see the module docstring. Never imports."""
  if (module, name) in _ALLOWED:
    return _ALLOWED[(module, name)]
  if module == "torch" and name in _STORAGE_DTYPES:
    return _StorageType(name)
  if module in ("builtins", "__builtin__"):
    if name in _SAFE_BUILTINS:
      return getattr(builtins, name)
    if name == "object":
      return _placeholder_class(module, name)
  root = module.split(".")[0]
  if root in _DANGEROUS_MODULES or module in ("builtins", "__builtin__"):
    raise ClmimError(f"refusing to load: the pickle calls {module}.{name}, which can run code. "
                     f"Checkpoints only need tensors and plain containers; this file is "
                     f"malicious or not a checkpoint.")
  return _placeholder_class(module, name)


class _Unpickler(pickle.Unpickler):
  """Restricted unpickler: globals via `resolve_global`, storages via `load_storage`."""

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module, name):
    return resolve_global(module, name)

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
      raise ClmimError(f"unsupported persistent record {str(pid)[:80]}")
    _, storage_type, key, _location, numel = pid[:5]
    if not isinstance(storage_type, _StorageType):
      raise ClmimError(f"unsupported storage type {storage_type!r}")
    return self._load_storage(str(key), storage_type.dtype, int(numel))


def _zip_entry_array(archive: zipfile.ZipFile, mapped, name: str, dtype, numel: int,
                     verify_crc: bool = True):
  """A numpy view of one stored zip entry inside the memory map (no copy), its bytes checked
  against the CRC-32 the archive records for them (`verify_crc`): a flipped byte in a download
  or on a disk is one error, not silently wrong weights. The check reads every byte once
  (about 0.1 s for ViT-B's 350 MB here: benchmarks/checkpoint_crc.py)."""
  info = archive.getinfo(name)
  if info.file_size != numel * dtype.itemsize:
    raise ClmimError(f"storage {name} holds {info.file_size} bytes, expected "
                     f"{numel} x {dtype.itemsize}")
  if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses; be lenient anyway
    return np.frombuffer(bytearray(archive.read(name)), dtype)
  header = mapped[info.header_offset:info.header_offset + 30]
  if len(header) < 30 or header[:4] != b"PK\x03\x04":
    raise ClmimError(f"corrupt zip entry {name}")
  start = (info.header_offset + 30 + int.from_bytes(header[26:28], "little")
           + int.from_bytes(header[28:30], "little"))
  if start + info.file_size > len(mapped):
    raise ClmimError(f"storage {name} ends past the end of the file (truncated download?)")
  if verify_crc and zlib.crc32(memoryview(mapped)[start:start + info.file_size]) != info.CRC:
    raise ClmimError(f"storage {name} fails its CRC-32 check: the file is corrupt (a damaged "
                     f"download or disk); download it again")
  return np.frombuffer(mapped, dtype, count=numel, offset=start)


def _describe_non_zip(path: str, head: bytes) -> str:
  if head.startswith(b"PK"):
    return (f"{path} is a truncated or corrupt zip archive (its central directory is missing); "
            f"download it again.")
  if head[:1] == b"\x80":
    return (f"{path} is a legacy (pre-zip) torch.save file, which clmim does not read. Re-save "
            f"it with PyTorch >= 1.6: torch.save(torch.load(old, weights_only=False), new).")
  return f"{path} is not a PyTorch zip checkpoint (torch.save of PyTorch >= 1.6)."


# CLMIM_VERIFY_CRC=0 skips the CRC-32 check of torch.save storages (see `_zip_entry_array`):
# it reads every byte of the file, about half of an in-cache ViT-B load on 2 cores
# (benchmarks/checkpoint_load.py), for files that are known to be sound.
VERIFY_CRC_VARIABLE = "CLMIM_VERIFY_CRC"


def verify_crc_default() -> bool:
  """Whether storages are CRC-checked: yes, unless $CLMIM_VERIFY_CRC is "0"."""
  value = os.environ.get(VERIFY_CRC_VARIABLE, "1").strip()
  if value not in ("0", "1"):
    raise ClmimError(f"${VERIFY_CRC_VARIABLE}={value!r}: expected 1 (check every storage's "
                     f"CRC-32, the default) or 0 (skip the check).")
  return value == "1"


def load_torch(path: str, verify_crc: bool | None = None) -> Any:
  """Loads a `torch.save` zip archive; tensors come back as numpy arrays (see module doc).
  `verify_crc`: check every storage against its recorded CRC-32 (see `_zip_entry_array`);
  None: as $CLMIM_VERIFY_CRC says (`verify_crc_default`)."""
  if verify_crc is None:
    verify_crc = verify_crc_default()
  with open(path, "rb") as f:
    head = f.read(8)
    if not zipfile.is_zipfile(f):
      raise ClmimError(_describe_non_zip(path, head))
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise ClmimError(_describe_non_zip(path, b"PK") + f" ({e})") from e
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ClmimError(f"{path}: a zip archive but not a torch.save file (no <dir>/data.pkl).")
    prefix = pickles[0][:-len("data.pkl")]
    names, byteorder = set(archive.namelist()), "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode().strip()
    storages = {}

    def load_storage(key, dtype, numel):
      if key not in storages:
        name = prefix + "data/" + key
        if name not in names:
          raise ClmimError(f"storage {name} is missing from the archive")
        array = _zip_entry_array(archive, mapped, name, dtype, numel, verify_crc)
        if byteorder != "little":
          array = array.view(dtype.newbyteorder(">")).astype(dtype)
        storages[key] = array
      return storages[key]

    try:
      with archive.open(pickles[0]) as f:
        return _Unpickler(f, load_storage).load()
    except ClmimError as e:
      raise ClmimError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, AttributeError, TypeError,
            ValueError, IndexError, KeyError, OverflowError, MemoryError, RecursionError) as e:
      raise ClmimError(f"{path}: cannot read the pickled object ({type(e).__name__}: {e}).") from e


def load_safetensors(path: str) -> dict:
  """Loads a .safetensors file as {name: numpy array} (the `__metadata__` entry is skipped)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if header_len <= 0 or header_len > size - 8:
      raise ClmimError(f"{path} is not a valid .safetensors file (bad header length).")
    try:
      header = json.loads(f.read(header_len))
    except ValueError as e:
      raise ClmimError(f"{path} is not a valid .safetensors file (header: {e}).") from e
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
  start, out = 8 + header_len, collections.OrderedDict()
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
      shape, (begin, end) = tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
      raise ClmimError(f"{path}: tensor {name!r} has an unsupported header entry {entry!r}.") from e
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != count * dtype.itemsize or begin < 0 or start + end > size:
      raise ClmimError(f"{path}: tensor {name!r} has inconsistent offsets (file truncated?).")
    out[name] = np.frombuffer(mapped, dtype, count=count, offset=start + begin).reshape(shape)
  return out


def load_npz(path: str) -> dict:
  """Loads an .npz file as {name: numpy array}; never unpickles."""
  try:
    with np.load(path, allow_pickle=False) as data:
      return collections.OrderedDict((k, data[k]) for k in data.files)
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise ClmimError(f"{path} cannot be read as .npz: {e}") from e


def load(path: str) -> Any:
  """Loads a checkpoint file of any supported format, chosen by content (not by suffix)."""
  if not os.path.isfile(path):
    raise ClmimError(f"Checkpoint file {path!r} does not exist.")
  with open(path, "rb") as f:
    head = f.read(10)
  if head.startswith(b"PK") and zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
    if names and all(n.endswith(".npy") for n in names):
      return load_npz(path)
  elif path.endswith(".safetensors") or head[8:9] == b"{":
    return load_safetensors(path)
  return load_torch(path)  # also explains legacy, truncated and foreign files
