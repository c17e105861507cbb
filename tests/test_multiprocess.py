"""Exact over devices and hosts: 1 vs 8 devices, and 2 processes x 4 devices vs 1 process.

The two processes are real: `python -m clmim.main` twice, joined by jax.distributed over
127.0.0.1 with gloo CPU collectives, each reading only its shard of an image folder.
"""
import functools
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from clmim.analysis import attention_distance, fourier, nmi, runner
from clmim.jobs import analyze
from clmim.data.eval_data import EvalImages
from clmim.models.vit import build_vit, forward_with_states
from tiny_checkpoints import save_random_checkpoint
from configs import all as all_config
from configs import pretrain_moco_v3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("attention_distance", "nmi", "attention_entropy", "fourier", "fourier_all_states")
NUM_IMAGES = 21  # 2 steps of 16: the second step is mostly padding, all of it on process 1


def _assert_same(got, want, rtol=1e-6):
  for key in KEYS:
    np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=1e-7, err_msg=key)
  assert got["num_images"] == want["num_images"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  for i in range(NUM_IMAGES):
    rng = np.random.default_rng(i)
    h, w = 30 + 2 * i, 48 - i
    stripes = 60 * np.sin(np.arange(w) / (2 + i % 5))[:, None]
    pixels = rng.integers(0, 255, (h, w, 3)) * 0.5 + stripes
    cls = root / f"class_{i % 3}"
    cls.mkdir(exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(cls / f"{i:02d}.jpg")
  return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt") / "moco"
  # Sharper than the init, so the attention is far from uniform.
  save_random_checkpoint(path, pretrain_moco_v3, seed=3, weight_scale=3.0)
  return str(path)


def _config(checkpoint, folder):
  config = all_config.get_config("runlocal")
  config.models = checkpoint
  config.batch_size = 16
  config.progress = False
  config.data.source = "image_folder"
  config.data.path = str(folder)
  config.data.num_images = 0
  return config


def test_one_vs_eight_devices_on_planned_shards(folder):
  model = build_vit("mu/4", image_size=16, depth=2, block_style="beit",
                    position_embedding="none", rel_pos_bias="shared", layer_scale_init=0.1)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
  config = _config("", folder)
  images = EvalImages(config.data, {"image_size": 16, "interpolation": "bilinear"})
  forward = functools.partial(forward_with_states, model)
  results = []
  for devices in (1, 8):
    analyzer = runner.Analyzer(forward, [attention_distance, nmi, fourier], 4,
                               mesh=runner.make_mesh(jax.devices()[:devices]),
                               device_batch_size=2)
    plan = analyzer.plan(len(images))
    assert plan.num_steps == -(-NUM_IMAGES // (2 * devices))
    batches = images.load_batches(plan.local_indices, analyzer.local_batch_size)
    results.append(analyzer.run(params, batches, progress=False, plan=plan))
  _assert_same(results[0], results[1])
  assert results[1]["num_images"] == NUM_IMAGES
  assert np.asarray(results[1]["attention_entropy"]).min() < 0.9  # not trivially uniform


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(checkpoint, folder, tmp_path):
  config = _config(checkpoint, folder)
  want = analyze.run(config, str(tmp_path / "one"))  # this process: 8 devices
  port = _free_port()
  procs = []
  for pid in range(2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "CLMIM_DISTRIBUTED": "1",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "CLMIM_NUM_PROCESSES": "2",
           "CLMIM_PROCESS_ID": str(pid)}
    args = [sys.executable, "-m", "clmim.main", "--config", "configs/all.py:runlocal",
            f"--config.models={checkpoint}", "--config.batch_size=16",
            "--config.progress=False", "--config.data.source=image_folder",
            f"--config.data.path={folder}", "--config.data.num_images=0",
            f"--workdir={tmp_path / f'process_{pid}'}"]
    procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=240))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, (out, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  # Only process 0 writes (and prints the summary).
  assert not os.path.exists(tmp_path / "process_1" / "results.json")
  assert "Wrote" in outputs[0][0] and "Wrote" not in outputs[1][0]
  got = json.load(open(tmp_path / "process_0" / "results.json"))
  assert got["versions"]["processes"] == 2 and got["versions"]["devices"] == 8
  for name in want["models"]:
    _assert_same(got["models"][name], want["models"][name])
  assert got["num_images"] == NUM_IMAGES
