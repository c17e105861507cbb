"""Exact over devices and hosts: 1 vs 8 devices, and 2 processes x 4 devices vs 1 process, for
the analyses and for training (MoCo v3, whose BatchNorm and negatives span the global batch).

The two processes are real: `python -m clmim.main` twice, joined by jax.distributed over
127.0.0.1 with gloo CPU collectives, each reading only its shard of the data.
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
from config_fields import set_fields
from tiny_checkpoints import save_random_checkpoint
from configs import analyze as all_config
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
  # Jitted: op by op, the initialisers cost seconds of per-op compilation.
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
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


def _two_processes(arguments, timeout=300):
  """Runs `python -m clmim.main *arguments(pid)` as processes 0 and 1 of a jax.distributed job
  over 127.0.0.1 (4 CPU devices each, gloo collectives); returns their (stdout, stderr) after
  both exited 0."""
  return _launch(_two_process_envs(), arguments, timeout)


def _two_process_envs():
  """The environments of processes 0 and 1 of one jax.distributed job on a free local port."""
  port = _free_port()
  return [{"CLMIM_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "CLMIM_NUM_PROCESSES": "2",
           "CLMIM_PROCESS_ID": str(pid)} for pid in range(2)]


def _launch(process_envs, arguments, timeout):
  """One `python -m clmim.main *arguments(i)` per entry of process_envs (extra environment), each
  with 4 CPU devices; their (stdout, stderr) after all exited 0."""
  procs = []
  for i, extra_env in enumerate(process_envs):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
                        "--xla_backend_optimization_level=0",  # as conftest: compiles faster
           **extra_env}
    procs.append(subprocess.Popen([sys.executable, "-m", "clmim.main", *arguments(i)],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=timeout))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, (out, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  return outputs


@pytest.mark.slow
def test_two_processes_match_one(checkpoint, folder, tmp_path):
  config = _config(checkpoint, folder)
  want = analyze.run(config, str(tmp_path / "one"))  # this process: 8 devices
  outputs = _two_processes(lambda pid: [
      "--config", "configs/analyze.py:runlocal", f"--config.models={checkpoint}",
      "--config.batch_size=16", "--config.progress=False", "--config.data.source=image_folder",
      f"--config.data.path={folder}", "--config.data.num_images=0",
      f"--workdir={tmp_path / f'process_{pid}'}"])
  # Only process 0 writes (and prints the summary).
  assert not os.path.exists(tmp_path / "process_1" / "results.json")
  assert "Wrote" in outputs[0][0] and "Wrote" not in outputs[1][0]
  got = json.load(open(tmp_path / "process_0" / "results.json"))
  assert got["versions"]["processes"] == 2 and got["versions"]["devices"] == 8
  for name in want["models"]:
    _assert_same(got["models"][name], want["models"][name])
  assert got["num_images"] == NUM_IMAGES


# --- Training: one step on 8 devices vs 1, and a run on 2 processes x 4 devices vs 1 process ---
#
# MoCo's gradients are ill-conditioned in float32: the backward pass of a BatchNorm gives a
# gradient with zero mean over the batch, and the bias gradients of the layers before it are
# sums over the batch of such terms — nearly cancelling, so their round-off is amplified ~1,000x
# and spreads upstream. Measured on runlocal's first step: compiled for 1, 2 or 4 devices the
# gradients agree to 2e-6; compiled for 8 (2 images per device) or run op by op (no jit, no
# sharding: the same single-device computation, compiled differently) to 6e-6; between the two
# groups 1.1e-3 — in every leaf upstream of the predictor's BatchNorm, while the predictor's last
# layer (after it) agrees to 5e-6. (That is at XLA's default optimisation level; at the -O0 the
# tests compile with, 8 devices agree with 1 to 6e-6, measured again with the current model.)
# So the test allows the gradients 3e-3, the spread of two
# compilations of one device's step, while the loss (global-batch BatchNorm statistics and
# negatives: a per-device BatchNorm or per-device negatives would move it by percents), the
# BatchNorm statistics and the last layer's gradient must agree to float32 round-off.
# Some gradients are also zero in exact arithmetic: the key third of every qkv bias (softmax
# ignores a constant added to all logits of a query) and the encoder's final LayerNorm bias (a
# constant the projector's BatchNorm removes). Adam divides such round-off by its own size and
# moves the parameter a full lr step, so whole runs are compared without them.


# MoCo v3's runlocal with test_train.py's pair path (a redrawn second view, eased in), so the
# session's compilation cache serves one file's step to the other.
MOCO_FIELDS = {"augment.second_view": "restyle", "augment.second_view_ramp": (2, 4),
               "data.version": 2, "tensorboard": False}


def _moco_runlocal():
  """MoCo v3's runlocal (6 steps, batch 16): BatchNorm over the global batch in the projector
  and predictor, and every image of the global batch a negative for every other."""
  config = pretrain_moco_v3.get_config("runlocal")
  config.unlock()
  return set_fields(config, MOCO_FIELDS)


def _without_round_off_directions(tree, width):
  """{path: array} of a params (or gradient) tree, less the exactly-zero directions above."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key, leaf = jax.tree_util.keystr(path), np.asarray(leaf, np.float64)
    if key.endswith("['encoder']['norm']['bias']"):
      continue
    if key.endswith("['qkv']['bias']"):
      leaf = np.concatenate([leaf[:width], leaf[2 * width:]])
    out[key] = leaf
  return out


def _flat(tree, width):
  return np.concatenate([v.ravel() for v in _without_round_off_directions(tree, width).values()])


@pytest.mark.slow
def test_one_training_step_on_one_device_matches_eight():
  from clmim.data.synthetic import ShapesTextures
  from clmim.train import objectives, trainer
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  config = _moco_runlocal()
  objective = objectives.load(config)
  state, _, _ = trainer.initial_state(config, objective)
  images = ShapesTextures(32, "train", 16, 0, version=3).batch(range(16))["image"]
  step = jax.value_and_grad(objective.loss, has_aux=True)
  results = []
  for devices in (1, 8):
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    results.append(jax.device_get(jax.jit(
        step, in_shardings=(replicated, replicated, rows, replicated), static_argnums=4)(
            state["params"], state["state"], images, jax.random.PRNGKey(5), 0)))
  ((loss_1, (bn_1, _)), grads_1), ((loss_8, (bn_8, _)), grads_8) = results
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-6)
  _assert_close_trees(bn_8, bn_1)  # the BatchNorm statistics of the global batch, and the EMA
  # The predictor's last layer, after its BatchNorm: no amplified round-off yet.
  last_1, last_8 = (g["predictor"]["linear_1"]["kernel"] for g in (grads_1, grads_8))
  np.testing.assert_allclose(last_8, last_1, rtol=1e-4, atol=1e-5 * np.abs(last_1).max())
  width = objective.encoder.width
  scale = np.linalg.norm(_flat(grads_1, width))
  across = np.linalg.norm(_flat(grads_8, width) - _flat(grads_1, width))
  assert across <= 3e-3 * scale, (across, scale)
  # The directions left out are round-off: below 1e-6 of the whole gradient.
  norm_bias = grads_1["online"]["encoder"]["norm"]["bias"]
  key_bias = grads_1["online"]["encoder"]["block_0"]["attn"]["qkv"]["bias"][width:2 * width]
  assert max(np.linalg.norm(norm_bias), np.linalg.norm(key_bias)) < 1e-6 * scale


def _assert_close_trees(got, want):
  """Every leaf within 1e-5 relative, or 1e-6 of the tree's largest value (a running mean of a
  zero-mean quantity is round-off on both sides)."""
  scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(want))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * scale,
                               err_msg=jax.tree_util.keystr(path))


def _relative_differences(got, want, width):
  got, want = (_without_round_off_directions(t, width) for t in (got, want))
  assert got.keys() == want.keys()
  return {k: np.linalg.norm(got[k] - want[k]) / max(np.linalg.norm(want[k]), 1e-30)
          for k in want}


def _trained_params(config, workdir):
  from clmim.train import objectives, trainer
  objective = objectives.load(config)
  template, _, _ = trainer.initial_state(config, objective)
  manager = trainer.checkpoint_manager(workdir, config.keep_checkpoints)
  return jax.device_get(trainer.restore(manager, config.total_steps, template, workdir))["params"]


@pytest.mark.slow
def test_two_processes_train_what_one_does(tmp_path):
  from clmim.train import objectives, trainer
  config = _moco_runlocal()
  # Processes 0 and 1 of a 2 x 4-device job share one workdir, as on a cluster's filesystem;
  # beside them, the same job in one process on 4 devices.
  outputs = _launch(
      _two_process_envs() + [{}],
      lambda i: ["--config", "configs/pretrain_moco_v3.py:runlocal",
                 f"--workdir={tmp_path / ('two' if i < 2 else 'one')}",
                 *(f"--config.{key}={value}" for key, value in MOCO_FIELDS.items())],
      timeout=300)
  # Process 0 alone logs and exports; the checkpoints hold both processes' shards.
  assert "Exported encoder" in outputs[0][0] and "Exported encoder" not in outputs[1][0]
  one, two = (trainer.read_metrics(str(tmp_path / name)) for name in ("one", "two"))
  assert [r["step"] for r in two] == [2, 4, 6]
  # Step 2's loss is still computed on the initial weights (the warm-up's first lr is 0): the
  # same global batch, BatchNorm and negatives must give it to round-off; later ones drift.
  np.testing.assert_allclose(two[0]["loss"], one[0]["loss"], rtol=1e-6)
  np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=3e-3)
  # The parameters after 6 steps must match the one-process run. The biases start at zero, move
  # a few lr steps, and their gradients are the nearly cancelling sums above, so two
  # compilations of one job can land far apart in them: one process on 8 devices against 4
  # measured 2.5e-2 with clmim's LayerNorm (1.2e-4 with flax's), while the two-process run
  # matched the one-process 4-device run to 1.7e-5. Hence 4 devices here, and 2e-3.
  params = {name: _trained_params(config, str(tmp_path / name)) for name in ("one", "two")}
  differences = _relative_differences(params["two"], params["one"], _encoder_width(config))
  largest = max(differences.items(), key=lambda kv: kv[1])
  print("largest relative difference after 6 steps, two processes against one:", largest)
  assert largest[1] < 2e-3, largest


def _encoder_width(config):
  from clmim.train.common import build_encoder
  return build_encoder(config).width
