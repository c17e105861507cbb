"""The torch-free checkpoint reader: fidelity, formats, and refusal of malicious or broken files."""
import argparse
import collections
import json
import os
import pickle
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest

from clmim.checkpoints import registry, torch_reader
from clmim.errors import ClmimError


def _zip_checkpoint(path, data_pkl: bytes, storages=None):
  """A torch.save-shaped zip archive written by hand (no torch needed)."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr("archive/data.pkl", data_pkl)
    for key, raw in (storages or {}).items():
      archive.writestr(f"archive/data/{key}", raw)
    archive.writestr("archive/version", "3\n")
  return str(path)


def _unicode(text: str) -> bytes:
  raw = text.encode()
  return b"X" + len(raw).to_bytes(4, "little") + raw


def _tensor_pickle(numel: int, size: int) -> bytes:
  """Protocol-2 opcodes of {'w': a float tensor of `size` elements over a `numel` storage}."""
  return (b"\x80\x02}" + _unicode("w") + b"ctorch._utils\n_rebuild_tensor_v2\n("
          + b"(" + _unicode("storage") + b"ctorch\nFloatStorage\n" + _unicode("0")
          + _unicode("cpu") + b"K" + bytes([numel]) + b"tQ"   # persistent id -> storage
          + b"K\x00" + b"K" + bytes([size]) + b"\x85" + b"K\x01\x85" + b"\x89"
          + b"ccollections\nOrderedDict\n)RtRs.")


class _Evil:
  """Pickles as a call to os.system: what a malicious checkpoint looks like."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({"state_dict": {}, "x": _Evil(f"touch {marker}")}, protocol=2)
  path = _zip_checkpoint(tmp_path / "evil.pth", payload)
  with pytest.raises(ClmimError, match=r"refusing to load: the pickle calls posix\.system"):
    torch_reader.load(path)
  with pytest.raises(ClmimError, match="refusing to load"):
    registry.resolve(f"moco_v3:{path}")
  for module, name in (("builtins", "eval"), ("builtins", "getattr"), ("subprocess", "Popen"),
                       ("os.path", "join"), ("importlib", "import_module")):
    with pytest.raises(ClmimError, match=f"{module}.{name}"):
      torch_reader.resolve_global(module, name)
  assert not marker.exists()


def test_unknown_globals_become_inert_placeholders(tmp_path):
  marker = tmp_path / "ran"
  # {'x': somepkg.evil.run('touch <marker>')}, as opcodes: the module does not even exist.
  payload = (b"\x80\x02}" + _unicode("x") + b"csomepkg.evil\nrun\n("
             + _unicode(f"touch {marker}") + b"tRs.")
  loaded = torch_reader.load(_zip_checkpoint(tmp_path / "sneaky.pth", payload))
  assert isinstance(loaded["x"], torch_reader.Placeholder)
  assert loaded["x"].global_name == "somepkg.evil.run"
  assert loaded["x"].args == (f"touch {marker}",) and not marker.exists()
  assert "somepkg" not in sys.modules  # nothing was imported


def test_hand_written_tensor_and_out_of_bounds_record(tmp_path):
  values = np.arange(4, dtype=np.float32)
  ok = _zip_checkpoint(tmp_path / "ok.pth", _tensor_pickle(4, 4), {"0": values.tobytes()})
  np.testing.assert_array_equal(torch_reader.load(ok)["w"], values)
  bad = _zip_checkpoint(tmp_path / "bad.pth", _tensor_pickle(4, 9), {"0": values.tobytes()})
  with pytest.raises(ClmimError, match="reads past the end of its storage"):
    torch_reader.load(bad)
  short = _zip_checkpoint(tmp_path / "short.pth", _tensor_pickle(4, 4), {"0": b"\0" * 8})
  with pytest.raises(ClmimError, match="holds 8 bytes, expected 4 x 4"):
    torch_reader.load(short)


def test_broken_and_foreign_files(tmp_path):
  with pytest.raises(ClmimError, match="does not exist"):
    torch_reader.load(str(tmp_path / "nothing.pth"))
  text = tmp_path / "notes.pth"
  text.write_text("hello, not a checkpoint")
  with pytest.raises(ClmimError, match="not a PyTorch zip checkpoint"):
    torch_reader.load(str(text))
  zipped = tmp_path / "other.zip"
  with zipfile.ZipFile(zipped, "w") as archive:
    archive.writestr("readme.txt", "hi")
  with pytest.raises(ClmimError, match="not a torch.save file"):
    torch_reader.load(str(zipped))


def test_safetensors_and_npz(tmp_path):
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
             "b": np.arange(4, dtype=np.int64), "c": np.ones(3, ml_dtypes.bfloat16)}
  codes = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64",
           np.dtype(ml_dtypes.bfloat16): "BF16"}
  header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
  for name, array in tensors.items():
    header[name] = {"dtype": codes[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    blobs.append(array.tobytes())
    offset += array.nbytes
  raw = json.dumps(header).encode()
  path = tmp_path / "model.safetensors"
  path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
  loaded = torch_reader.load(str(path))
  assert list(loaded) == ["a", "b", "c"]
  for name, array in tensors.items():
    assert loaded[name].dtype == array.dtype
    np.testing.assert_array_equal(loaded[name], array)
  path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs)[:-5])
  with pytest.raises(ClmimError, match="inconsistent offsets"):
    torch_reader.load(str(path))
  np.savez(tmp_path / "w.npz", **{"blocks.0.x": tensors["a"]})
  np.testing.assert_array_equal(torch_reader.load(str(tmp_path / "w.npz"))["blocks.0.x"],
                                tensors["a"])


def test_torch_save_round_trip_of_every_dtype_and_layout(tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  cfg_module = types.ModuleType("yacs.config")

  class CfgNode(dict):
    pass

  CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
  cfg_module.CfgNode = CfgNode
  monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
  monkeypatch.setitem(sys.modules, "yacs.config", cfg_module)
  base = torch.randn(6, 5)
  tensors = {
      "f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(5).bfloat16(),
      "f64": torch.randn(2).double(), "i64": torch.arange(7), "i32": torch.arange(3).int(),
      "u8": torch.arange(4).to(torch.uint8), "bool": torch.tensor([True, False]),
      "transposed": base.t(), "offset_view": base[2:, 1:3], "scalar": torch.tensor(2.5),
      "empty": torch.zeros(0, 3), "param": torch.nn.Parameter(torch.randn(2, 2)),
  }
  obj = {"state_dict": collections.OrderedDict(tensors), "shared": base, "epoch": 7,
         "args": argparse.Namespace(arch="vit_small", lr=1e-3),
         "config": CfgNode(MODEL=CfgNode(VIT=CfgNode(DEPTH=12))), "device": torch.device("cpu"),
         "nested": [{"step": torch.tensor(3)}, (1.5, "x", None)]}
  path = tmp_path / "all.pth"
  torch.save(obj, path)
  loaded = torch_reader.load(str(path))
  assert isinstance(loaded["state_dict"], collections.OrderedDict)
  for name, tensor in tensors.items():
    got, want = loaded["state_dict"][name], tensor.detach()
    assert got.shape == tuple(want.shape), name
    if want.dtype == torch.bfloat16:
      assert got.dtype == ml_dtypes.bfloat16
      want = want.float()
    np.testing.assert_array_equal(np.asarray(got, want.numpy().dtype), want.numpy(), err_msg=name)
  np.testing.assert_array_equal(loaded["shared"], base.numpy())
  assert loaded["args"].arch == "vit_small" and loaded["config"].MODEL.VIT.DEPTH == 12
  assert loaded["epoch"] == 7 and loaded["nested"][1] == (1.5, "x", None)
  assert int(loaded["nested"][0]["step"]) == 3
  assert loaded["device"].global_name == "torch.device"


def test_truncated_and_legacy_torch_files(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "ckpt.pth"
  torch.save({"model": {"w": torch.randn(64, 64)}}, path)
  data = path.read_bytes()
  for cut in (len(data) // 2, len(data) - 10):
    path.write_bytes(data[:cut])
    with pytest.raises(ClmimError, match="truncated or corrupt zip"):
      torch_reader.load(str(path))
  legacy = tmp_path / "legacy.pth"
  torch.save({"w": torch.randn(3)}, legacy, _use_new_zipfile_serialization=False)
  with pytest.raises(ClmimError, match=r"legacy \(pre-zip\) torch.save file"):
    torch_reader.load(str(legacy))
  marker = tmp_path / "pwned-by-torch-save"
  torch.save({"model": {"w": torch.zeros(2)}, "x": _Evil(f"touch {marker}")}, path)
  with pytest.raises(ClmimError, match="refusing to load"):
    torch_reader.load(str(path))
  assert not marker.exists()


def test_a_flipped_byte_in_any_tensor_is_refused(tmp_path):
  # Every storage is checked against the CRC-32 its zip entry records: a flipped byte anywhere
  # in the tensor data is one error naming the storage, never silently different weights.
  values = np.arange(64, dtype=np.float32)
  path = _zip_checkpoint(tmp_path / "ok.pth", _tensor_pickle(64, 64), {"0": values.tobytes()})
  np.testing.assert_array_equal(torch_reader.load_torch(path)["w"], values)
  raw = open(path, "rb").read()
  start = raw.index(values.tobytes())
  rng = np.random.default_rng(0)
  for trial, offset in enumerate(rng.integers(0, values.nbytes, 50)):
    flipped = bytearray(raw)
    flipped[start + int(offset)] ^= 1 << int(rng.integers(0, 8))
    bad = tmp_path / f"bad{trial}.pth"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ClmimError, match=r"archive/data/0 fails its CRC-32 check"):
      torch_reader.load_torch(str(bad))
    # Skipping the check (verify_crc=False) reads the damaged values: what the check prevents.
    damaged = torch_reader.load_torch(str(bad), verify_crc=False)["w"]
    assert not np.array_equal(damaged, values, equal_nan=True)


def test_the_crc_check_can_be_skipped_by_the_environment(tmp_path, monkeypatch):
  values = np.arange(8, dtype=np.float32)
  path = _zip_checkpoint(tmp_path / "ok.pth", _tensor_pickle(8, 8), {"0": values.tobytes()})
  raw = bytearray(open(path, "rb").read())
  raw[raw.index(values.tobytes()) + 5] ^= 4
  (tmp_path / "bad.pth").write_bytes(bytes(raw))
  with pytest.raises(ClmimError, match="CRC-32"):
    torch_reader.load(str(tmp_path / "bad.pth"))
  monkeypatch.setenv("CLMIM_VERIFY_CRC", "0")
  assert torch_reader.load(str(tmp_path / "bad.pth"))["w"][1] != values[1]
  monkeypatch.setenv("CLMIM_VERIFY_CRC", "yes")
  with pytest.raises(ClmimError, match=r"\$CLMIM_VERIFY_CRC='yes': expected 1"):
    torch_reader.load(str(tmp_path / "bad.pth"))
