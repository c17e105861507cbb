"""Real data for training (grain over an image folder) and preemption: a run stopped by SIGTERM,
then killed by SIGKILL, then resumed, ends bit-identical to an uninterrupted run."""
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from clmim import config_lib, main, preflight
from clmim.data import train_data
from clmim.data.synthetic import ShapesTextures
from clmim.errors import ClmimError
from clmim.train import trainer
from config_fields import set_fields
from configs import pretrain_hybrid

TOTAL = 6  # runlocal's: the same compiled step as test_hybrid's run (the session's cache)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """40 procedural images as PNG files in two class folders."""
  from PIL import Image
  root = tmp_path_factory.mktemp("folder")
  images = ShapesTextures(40, "train", 40, 0, version=3).batch(range(40))["image"]
  for i, image in enumerate(images):
    (root / f"class_{i % 2}").mkdir(exist_ok=True)
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(
        root / f"class_{i % 2}" / f"{i:02d}.png")
  return str(root)


OVERRIDES = {"data.source": "image_folder", "augment.second_view": "",
             "augment.second_view_ramp": (0, 0), "total_steps": TOTAL, "checkpoint_every": 1,
             "log_every": 2, "data.read_threads": 3, "keep_checkpoints": 3, "tensorboard": False}


def _config(folder, cache):
  config = pretrain_hybrid.get_config("runlocal")
  config.unlock()
  return set_fields(config, {**OVERRIDES, "data.path": folder, "compilation_cache": cache})


def _flags(folder, cache):  # the same fields on the command line
  flags = {**OVERRIDES, "data.path": folder, "compilation_cache": cache}
  return [f"--config.{k}={v}" for k, v in flags.items()]


def _final_state(workdir, config):
  objective = trainer.load_objective(config)
  template, _, _ = trainer.initial_state(config, objective)
  manager = trainer.checkpoint_manager(workdir, config.keep_checkpoints)
  return jax.device_get(trainer.restore(manager, TOTAL, template, workdir))


def _wait_for_checkpoint(workdir, after, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = preflight.checkpoint_steps(workdir)
    if steps and max(steps) > after:
      return max(steps)
    time.sleep(0.01)
  raise AssertionError(f"no checkpoint after step {after} in {workdir} within {timeout} s")


@pytest.mark.slow
def test_killed_and_resumed_run_is_bit_identical(folder, tmp_path):
  # Each run compiles its own jitted step (~13 s for the hybrid on 2 cores); all but the first
  # load it from the session's persistent cache (tests/conftest.py), the other process too.
  cache = config_lib.COMPILATION_CACHE
  main.enable_compilation_cache(cache)  # again: an earlier test may have pointed JAX elsewhere
  config = _config(folder, cache)
  trainer.train(config, str(tmp_path / "straight"))
  assert not (tmp_path / "straight" / "tensorboard").exists()  # config.tensorboard=False

  # SIGTERM once the first checkpoint exists: the run saves the step it is at and stops.
  interrupted = str(tmp_path / "interrupted")
  notice = threading.Thread(target=lambda: (_wait_for_checkpoint(interrupted, 0),
                                            os.kill(os.getpid(), signal.SIGTERM)))
  handler = signal.getsignal(signal.SIGTERM)
  notice.start()
  with pytest.raises(ClmimError, match=r"Stopped by SIGTERM after step (\d+)") as stopped:
    trainer.train(_config(folder, cache), interrupted)
  notice.join()
  stopped_at = int(stopped.value.args[0].split("after step ")[1].split(":")[0])
  assert max(preflight.checkpoint_steps(interrupted)) == stopped_at < TOTAL
  assert signal.getsignal(signal.SIGTERM) == handler  # the trainer's handler is gone again

  # Resumed in another process and killed outright after its next checkpoint.
  env = {**os.environ, "PYTHONPATH": REPO, "TQDM_DISABLE": "1",  # the tests' precision (conftest):
         "JAX_DEFAULT_MATMUL_PRECISION": str(jax.config.jax_default_matmul_precision)}
  process = subprocess.Popen(
      [sys.executable, "-m", "clmim.main", "--config",
       os.path.join(REPO, "configs", "pretrain_hybrid.py") + ":runlocal",
       *_flags(folder, cache), "--workdir", interrupted],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    killed_after = _wait_for_checkpoint(interrupted, stopped_at)
  finally:
    process.kill()
    _, errors = process.communicate()
  assert process.returncode == -signal.SIGKILL, errors.decode()[-2000:]
  assert stopped_at < killed_after < TOTAL

  trainer.train(_config(folder, cache), interrupted)
  straight = _final_state(str(tmp_path / "straight"), config)
  resumed = _final_state(interrupted, config)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(straight)[0],
                          jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_each_process_reads_its_rows_of_the_same_order(folder):
  config = _config(folder, "")
  images = train_data.open_images(config.data)
  assert len(images) == 40
  whole = next(train_data.real_batches(images, 8, 5, (0, 8), seed=0, read_threads=2))["image"]
  halves = [next(train_data.real_batches(images, 8, 5, rows, seed=0, read_threads=4))["image"]
            for rows in ((0, 4), (4, 8))]
  np.testing.assert_array_equal(np.concatenate(halves), whole)
  again = next(train_data.real_batches(images, 8, 5, (0, 8), seed=1, read_threads=2))["image"]
  assert not np.array_equal(again, whole)  # the seed picks the order
  assert train_data.local_rows(8, 1, 2) == (4, 8)


@pytest.mark.parametrize("fields, message", [
    ({"data.source": "webdataset"}, "config.data.source='webdataset'"),
    ({"data.source": "image_folder", "data.path": ""}, "needs config.data.path"),
    ({"data.source": "tfds"}, "needs config.data.tfds_name"),
    ({"augment.second_view": "background"}, "redraws procedural images"),
    ({"data.read_threads": 0}, "config.data.read_threads=0"),
])
def test_bad_training_data_is_one_line(folder, tmp_path, fields, message):
  config = set_fields(_config(folder, ""), fields)
  with pytest.raises(ClmimError, match=message):
    preflight.check_fields(config, "pretrain", jax.device_count())


def test_a_missing_folder_fails_before_training(tmp_path):
  config = _config(str(tmp_path / "nowhere"), "")
  with pytest.raises(ClmimError, match="does not exist"):
    trainer.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()
