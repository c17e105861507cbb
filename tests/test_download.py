"""The known-checkpoint cache, against a local HTTP server on 127.0.0.1 (never the network)."""
import dataclasses
import hashlib
import http.server
import json
import os
import threading

import numpy as np
import pytest

from clmim.checkpoints import known, registry
from clmim.errors import ClmimError

DATA = np.random.default_rng(0).bytes(3 * (1 << 20) + 12345)  # > 3 chunks of 1 MiB
SHA = hashlib.sha256(DATA).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves `server.files`; honours `Range: bytes=N-`; can cut a response short."""

  def do_GET(self):  # noqa: N802 (http.server's naming)
    server = self.server
    server.requests.append((self.path, self.headers.get("Range")))
    data = server.files.get(self.path)
    if data is None:
      self.send_error(404)
      return
    start, status = 0, 200
    wanted = self.headers.get("Range")
    if wanted and server.ranges:
      start = int(wanted.split("=")[1].split("-")[0])
      if start >= len(data):
        self.send_response(416)
        self.send_header("Content-Range", f"bytes */{len(data)}")
        self.end_headers()
        return
      status = 206
    body = data[start:]
    self.send_response(status)
    self.send_header("Content-Type", server.content_type)
    self.send_header("Content-Length", str(len(body)))
    if status == 206:
      self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    self.end_headers()
    if server.cut_after is not None:  # simulate a dropped connection
      body, server.cut_after = body[:server.cut_after], None
    try:
      self.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):
      pass  # the client gave up early (e.g. on an HTML page): expected

  def log_message(self, *args):
    pass


@pytest.fixture
def server():
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  httpd.files, httpd.requests, httpd.ranges = {"/ckpt.pth": DATA}, [], True
  httpd.cut_after, httpd.content_type = None, "application/octet-stream"
  thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                            daemon=True)
  thread.start()
  httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
  yield httpd
  httpd.shutdown()
  httpd.server_close()


def test_download_verifies_and_renames_atomically(server, tmp_path):
  dest = str(tmp_path / "cache" / "ckpt.pth")
  assert known.download(server.url + "/ckpt.pth", dest, len(DATA), SHA, offline=False) == dest
  assert open(dest, "rb").read() == DATA and not os.path.exists(dest + ".part")
  assert json.load(open(dest + ".json"))["sha256"] == SHA
  assert server.requests == [("/ckpt.pth", None)]


def test_resume_of_a_partial_download(server, tmp_path):
  dest = str(tmp_path / "ckpt.pth")
  open(dest + ".part", "wb").write(DATA[:1000003])
  known.download(server.url + "/ckpt.pth", dest, len(DATA), SHA, offline=False, progress=False)
  assert open(dest, "rb").read() == DATA
  assert server.requests == [("/ckpt.pth", "bytes=1000003-")]


def test_interrupted_download_is_kept_and_resumed(server, tmp_path):
  dest = str(tmp_path / "ckpt.pth")
  server.cut_after = 1 << 20
  with pytest.raises(ClmimError, match="resumes it"):
    known.download(server.url + "/ckpt.pth", dest, len(DATA), SHA, offline=False, timeout=10)
  assert not os.path.exists(dest) and os.path.getsize(dest + ".part") == 1 << 20
  known.download(server.url + "/ckpt.pth", dest, len(DATA), SHA, offline=False)
  assert open(dest, "rb").read() == DATA
  assert server.requests[-1] == ("/ckpt.pth", f"bytes={1 << 20}-")


def test_server_without_range_support_restarts(server, tmp_path):
  server.ranges = False
  dest = str(tmp_path / "ckpt.pth")
  open(dest + ".part", "wb").write(b"stale bytes")
  known.download(server.url + "/ckpt.pth", dest, len(DATA), SHA, offline=False)
  assert open(dest, "rb").read() == DATA


def test_checksum_mismatch_and_http_errors(server, tmp_path):
  dest = str(tmp_path / "ckpt.pth")
  with pytest.raises(ClmimError, match=r"corrupt: got 3158073 bytes with sha256 .*expected 3158073 "
                                       r"bytes with sha256 000000000000"):
    known.download(server.url + "/ckpt.pth", dest, len(DATA), "0" * 64, offline=False)
  assert not os.path.exists(dest) and not os.path.exists(dest + ".part")
  with pytest.raises(ClmimError, match="HTTP 404"):
    known.download(server.url + "/missing.pth", dest, offline=False)
  server.content_type = "text/html; charset=utf-8"
  with pytest.raises(ClmimError, match="web page, not a checkpoint"):
    known.download(server.url + "/ckpt.pth", dest, offline=False)


def test_cached_reuse_and_offline_mode(server, tmp_path, monkeypatch):
  dest = str(tmp_path / "ckpt.pth")
  known.download(server.url + "/ckpt.pth", dest, len(DATA), SHA, offline=False)
  # Reuse: no request, and no re-hash (the record matches size and mtime).
  monkeypatch.setattr(known, "sha256_of", lambda path: pytest.fail("re-hashed a cached file"))
  assert known.download(server.url + "/ckpt.pth", dest, len(DATA), SHA, offline=False) == dest
  monkeypatch.setenv(known.OFFLINE_ENV, "1")
  assert known.download(server.url + "/ckpt.pth", dest, len(DATA), SHA) == dest
  assert len(server.requests) == 1
  with pytest.raises(ClmimError, match="not in the cache .* offline mode is on"):
    known.download(server.url + "/ckpt.pth", str(tmp_path / "other.pth"))
  assert len(server.requests) == 1
  monkeypatch.undo()
  with open(dest, "r+b") as f:  # corrupt the cached file: its record no longer matches
    f.write(b"garbage")
  stat = os.stat(dest)
  os.utime(dest, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # however coarse the clock
  with pytest.raises(ClmimError, match="does not match its expected sha256"):
    known.download(server.url + "/ckpt.pth", dest, len(DATA), SHA, offline=True)


def _timm_safetensors(width=128, depth=6, mlp=256, patch=8, grid=2):
  """A tiny DINO-layout (flat timm keys) .safetensors file, written with numpy only."""
  rng = np.random.default_rng(1)
  shapes = {"cls_token": (1, 1, width), "pos_embed": (1, grid * grid + 1, width),
            "patch_embed.proj.weight": (width, 3, patch, patch), "patch_embed.proj.bias": (width,),
            "norm.weight": (width,), "norm.bias": (width,)}
  for i in range(depth):
    b = f"blocks.{i}."
    shapes.update({b + "norm1.weight": (width,), b + "norm1.bias": (width,),
                   b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
                   b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
                   b + "norm2.weight": (width,), b + "norm2.bias": (width,),
                   b + "mlp.fc1.weight": (mlp, width), b + "mlp.fc1.bias": (mlp,),
                   b + "mlp.fc2.weight": (width, mlp), b + "mlp.fc2.bias": (width,)})
  header, blobs, offset = {}, [], 0
  for name, shape in shapes.items():
    array = rng.normal(size=shape).astype(np.float32)
    header[name] = {"dtype": "F32", "shape": list(shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    blobs.append(array.tobytes())
    offset += array.nbytes
  raw = json.dumps(header).encode()
  return len(raw).to_bytes(8, "little") + raw + b"".join(blobs)


def test_known_name_end_to_end(server, tmp_path, monkeypatch):
  data = _timm_safetensors()
  server.files["/tiny.safetensors"] = data
  entry = known.Known("tiny_dino", "dino", "mu/8", server.url + "/tiny.safetensors",
                      "tiny.safetensors", "a test entry", len(data),
                      hashlib.sha256(data).hexdigest())
  monkeypatch.setitem(known.KNOWN, "tiny_dino", entry)
  monkeypatch.setenv(known.CACHE_ENV, str(tmp_path / "cache"))
  model = registry.resolve("tiny_dino")
  assert model.name == "tiny_dino" and model.family == "cl" and model.vit.depth == 6
  assert model.info["sha256"] == entry.sha256 and model.info["url"] == entry.url
  assert model.preprocessing == {"image_size": 16, "mean": "imagenet", "std": "imagenet",
                                 "interpolation": "bicubic", "crop_pct": 0.875}
  assert os.path.exists(tmp_path / "cache" / "tiny.safetensors")
  monkeypatch.setenv(known.OFFLINE_ENV, "1")
  assert registry.resolve("tiny_dino").vit == model.vit and len(server.requests) == 1
  monkeypatch.setitem(known.KNOWN, "tiny_dino", dataclasses.replace(entry, variant="S/8"))
  with pytest.raises(ClmimError, match="contradict the requested variant 'S/8'"):
    registry.resolve("tiny_dino")


def test_unknown_checkpoint_name_suggests_the_closest(tmp_path):
  with pytest.raises(ClmimError) as error:
    known.fetch("mae_vitb", cache=str(tmp_path), offline=True)
  assert "Unknown checkpoint 'mae_vitb' (did you mean 'mae_vitb16'?)" in str(error.value)
  assert not os.listdir(tmp_path)  # nothing fetched, nothing created
