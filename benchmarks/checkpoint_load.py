r"""Time to load an official-layout ViT-B/16 checkpoint into clmim (target: under 5 s).

Writes a MoCo v3 `vit-b-300ep.pth.tar`-shaped file with random weights: {'epoch', 'arch',
'state_dict': module.base_encoder.* (+ projector head), module.momentum_encoder.*,
module.predictor.*} (~0.9 GB; `--optimizer` adds AdamW moments as in the training
checkpoints, ~1.7 GB). It is written with torch.save when torch is importable, otherwise with
the numpy-only writer below (the same zip layout). Then it times, as medians over `--repeats`:
  read_s      torch_reader.load (zip index + restricted unpickling + each storage's CRC-32
              check, which reads every byte once; tensors are mmap views)
  convert_s   converters.convert: architecture inference, strict accounting, param tree
  to_device_s the params onto the default device (this is where the bytes are actually read)
  resolve_s   registry.resolve(path) end to end (all of the above + family detection)
  resolve_without_crc_s  the same with the CRC-32 check skipped (torch_reader.load_torch's
              verify_crc=False), alternated with resolve_s; crc_share = 1 - without / with
The file was just written, so it is in the page cache; a cold read adds the disk time.
Prints one JSON object:

  python benchmarks/checkpoint_load.py [--repeats 3] [--optimizer] [--writer numpy|torch]
"""
import argparse
import importlib.util
import json
import os
import platform
import statistics
import struct
import tempfile
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from clmim.checkpoints import converters, registry, torch_reader

_STORAGE = {np.dtype(np.float32): b"FloatStorage", np.dtype(np.int64): b"LongStorage"}


def _unicode(text: str) -> bytes:
  raw = text.encode()
  return b"X" + struct.pack("<I", len(raw)) + raw


def _pickle(obj, out: list, storages: list) -> None:
  """Protocol-2 opcodes for dicts/lists/tuples/str/int/float/bool/None and numpy tensors."""
  if isinstance(obj, dict):
    out.append(b"}(")
    for key, value in obj.items():
      _pickle(key, out, storages)
      _pickle(value, out, storages)
    out.append(b"u")
  elif isinstance(obj, (list, tuple)):
    out.append(b"](" if isinstance(obj, list) else b"(")
    for value in obj:
      _pickle(value, out, storages)
    out.append(b"e" if isinstance(obj, list) else b"t")
  elif isinstance(obj, str):
    out.append(_unicode(obj))
  elif isinstance(obj, bool):
    out.append(b"\x88" if obj else b"\x89")
  elif isinstance(obj, int):
    out.append(b"J" + struct.pack("<i", obj))
  elif isinstance(obj, float):
    out.append(b"G" + struct.pack(">d", obj))
  elif obj is None:
    out.append(b"N")
  elif isinstance(obj, np.ndarray):
    key = str(len(storages))
    storages.append(np.ascontiguousarray(obj).reshape(obj.shape))  # keeps 0-d arrays 0-d
    strides = [s // obj.itemsize for s in storages[-1].strides]
    out.append(b"ctorch._utils\n_rebuild_tensor_v2\n((" + _unicode("storage") + b"ctorch\n"
               + _STORAGE[obj.dtype] + b"\n" + _unicode(key) + _unicode("cpu"))
    out.append(b"J" + struct.pack("<i", obj.size) + b"tQK\x00")
    _pickle(tuple(obj.shape), out, storages)
    _pickle(tuple(strides), out, storages)
    out.append(b"\x89ccollections\nOrderedDict\n)RtR")
  else:
    raise TypeError(f"cannot write {type(obj)}")


def write_torch_zip(path: str, obj) -> None:
  """Writes `obj` in torch.save's zip layout without torch (storages 64-byte aligned)."""
  out, storages = [b"\x80\x02"], []
  _pickle(obj, out, storages)
  out.append(b".")
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
    archive.writestr("archive/data.pkl", b"".join(out))
    archive.writestr("archive/byteorder", "little")
    for key, array in enumerate(storages):
      info = zipfile.ZipInfo(f"archive/data/{key}")
      start = archive.fp.tell() + 30 + len(info.filename) + 4
      pad = -start % 64
      info.extra = struct.pack("<HH", 0x4647, pad) + b"Z" * pad  # alignment padding field
      with archive.open(info, "w", force_zip64=array.nbytes > 2**31) as f:
        f.write(memoryview(array).cast("B"))
    archive.writestr("archive/version", "3\n")


def moco_v3_layout(optimizer: bool, seed: int = 0) -> dict:
  """Random tensors in the layout (and sizes) of MoCo v3's ViT-B/16 300-epoch checkpoint."""
  rng = np.random.default_rng(seed)
  rand = lambda *shape: rng.standard_normal(shape, dtype=np.float32) * 0.02
  encoder = {"cls_token": rand(1, 1, 768), "pos_embed": rand(1, 197, 768),
             "patch_embed.proj.weight": rand(768, 3, 16, 16), "patch_embed.proj.bias": rand(768),
             "norm.weight": rand(768), "norm.bias": rand(768)}
  for i in range(12):
    b = f"blocks.{i}."
    encoder.update({
        b + "norm1.weight": rand(768), b + "norm1.bias": rand(768),
        b + "attn.qkv.weight": rand(2304, 768), b + "attn.qkv.bias": rand(2304),
        b + "attn.proj.weight": rand(768, 768), b + "attn.proj.bias": rand(768),
        b + "norm2.weight": rand(768), b + "norm2.bias": rand(768),
        b + "mlp.fc1.weight": rand(3072, 768), b + "mlp.fc1.bias": rand(3072),
        b + "mlp.fc2.weight": rand(768, 3072), b + "mlp.fc2.bias": rand(768)})

  def mlp(dims, last_affine=False):
    layers = {}
    for j, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
      layers[f"{3 * j}.weight"] = rand(d_out, d_in)
      bn = f"{3 * j + 1}."
      if j < len(dims) - 2 or last_affine:
        layers.update({bn + "weight": rand(d_out), bn + "bias": rand(d_out)})
      layers.update({bn + "running_mean": rand(d_out), bn + "running_var": rand(d_out) ** 2 + 1,
                     bn + "num_batches_tracked": np.array(1000, np.int64)})
    return layers

  state = {}
  for tower in ("base_encoder", "momentum_encoder"):
    state.update({f"module.{tower}.{k}": v for k, v in encoder.items()})
    state.update({f"module.{tower}.head.{k}": v for k, v in mlp([768, 4096, 4096, 256]).items()})
  state.update({f"module.predictor.{k}": v for k, v in mlp([256, 4096, 256]).items()})
  ckpt = {"epoch": 300, "arch": "vit_base", "state_dict": state}
  if optimizer:  # AdamW moments for the online network (base encoder + predictor)
    online = [v for k, v in state.items() if "momentum" not in k and v.dtype == np.float32]
    ckpt["optimizer"] = {"state": {i: {"step": 1.0, "exp_avg": np.zeros_like(v),
                                       "exp_avg_sq": np.zeros_like(v)}
                                   for i, v in enumerate(online)},
                         "param_groups": [{"lr": 1e-4, "params": list(range(len(online)))}]}
    ckpt["scaler"] = {"scale": 65536.0, "growth_factor": 2.0}
  return ckpt


def _median(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times, result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--optimizer", action="store_true", help="add AdamW state (~1.7 GB file)")
  parser.add_argument("--writer", choices=["auto", "numpy", "torch"], default="auto")
  parser.add_argument("--dir", default=None, help="where to write the file (default: a temp dir)")
  args = parser.parse_args()

  writer = args.writer
  if writer == "auto":  # torch only writes the file, as the official code did
    writer = "torch" if importlib.util.find_spec("torch") else "numpy"
  ckpt = moco_v3_layout(args.optimizer)
  with tempfile.TemporaryDirectory(dir=args.dir) as folder:
    path = os.path.join(folder, "vit-b-300ep.pth.tar")
    start = time.perf_counter()
    if writer == "torch":
      import torch
      as_torch = lambda x: ({k: as_torch(v) for k, v in x.items()} if isinstance(x, dict) else
                            torch.from_numpy(x) if isinstance(x, np.ndarray) else x)
      torch.save(as_torch(ckpt), path)
    else:
      write_torch_zip(path, ckpt)
    write_s = time.perf_counter() - start
    del ckpt

    read_s, read_all, loaded = _median(lambda: torch_reader.load(path), args.repeats)
    convert_s, convert_all, converted = _median(
        lambda: converters.convert(loaded, "moco_v3", path, variant="B/16"), args.repeats)
    device_s, device_all, _ = _median(lambda: jax.block_until_ready(
        jax.tree.map(jnp.asarray, converted.params)), args.repeats)
    checked = torch_reader.load_torch
    unchecked = lambda p, verify_crc=None: checked(p, verify_crc=False)
    resolve_all, without_all = [], []
    for _ in range(args.repeats):  # alternated, so drift in the machine hits both alike
      for reader, times in ((checked, resolve_all), (unchecked, without_all)):
        torch_reader.load_torch = reader
        try:
          start = time.perf_counter()
          jax.block_until_ready(registry.resolve(path).params)
          times.append(time.perf_counter() - start)
        finally:
          torch_reader.load_torch = checked
    resolve_s, without_s = statistics.median(resolve_all), statistics.median(without_all)
    print(json.dumps({
        "benchmark": "checkpoint_load", "file_bytes": os.path.getsize(path), "writer": writer,
        "tensors_in_file": len(loaded["state_dict"]),
        "encoder_params": converted.info["num_params"],
        "write_s": round(write_s, 3), "read_s": round(read_s, 3),
        "convert_s": round(convert_s, 3), "to_device_s": round(device_s, 3),
        "read_convert_to_device_s": round(read_s + convert_s + device_s, 3),
        "resolve_s": round(resolve_s, 3), "resolve_all_s": [round(t, 3) for t in resolve_all],
        "resolve_without_crc_s": round(without_s, 3),
        "resolve_without_crc_all_s": [round(t, 3) for t in without_all],
        "crc_share": round(1 - without_s / resolve_s, 3),
        "target_s": 5.0, "backend": jax.default_backend(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "load_average": os.getloadavg()}, indent=1))


if __name__ == "__main__":
  main()
