"""Real data for training (grain over an image folder) and preemption: a run stopped by SIGTERM,
then killed by SIGKILL, then resumed, ends bit-identical to an uninterrupted run; Ctrl-C (SIGINT)
stops a run the same way, and a second Ctrl-C stops it at once."""
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
from clmim.data import synthetic, train_data
from clmim.data.synthetic import ShapesTextures
from clmim.errors import ClmimError
from clmim.train import objectives, trainer
from clmim.jobs import pretrain
from config_fields import set_fields
from configs import pretrain_hybrid, pretrain_simmim

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
  objective = objectives.load(config)
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
def test_killed_and_resumed_run_is_bit_identical(folder, tmp_path, ctrl_c_handled):
  # Each run compiles its own jitted step (~13 s for the hybrid on 2 cores); all but the first
  # load it from the session's persistent cache (tests/conftest.py), the other process too.
  cache = config_lib.COMPILATION_CACHE
  main.enable_compilation_cache(cache)  # again: an earlier test may have pointed JAX elsewhere
  config = _config(folder, cache)
  pretrain.run(config, str(tmp_path / "straight"))
  assert not (tmp_path / "straight" / "tensorboard").exists()  # config.tensorboard=False

  # SIGTERM once the first checkpoint exists: the run saves the step it is at and stops.
  interrupted = str(tmp_path / "interrupted")
  notice = threading.Thread(target=lambda: (_wait_for_checkpoint(interrupted, 0),
                                            os.kill(os.getpid(), signal.SIGTERM)))
  handler = signal.getsignal(signal.SIGTERM)
  notice.start()
  with pytest.raises(ClmimError, match=r"Stopped by SIGTERM after step (\d+)") as stopped:
    pretrain.run(_config(folder, cache), interrupted)
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

  pretrain.run(_config(folder, cache), interrupted)
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
    pretrain.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture
def ctrl_c_handled():
  """SIGINT and SIGTERM as an interactive process has them, restored afterwards. The test
  process inherits its dispositions from whatever started it: a shell without job control
  starts a `&` job (and nohup, a CI runner...) with SIGINT ignored, and a process that ignores
  SIGINT keeps ignoring it (PreemptionNotice) — the case the Ctrl-C tests check last, on
  purpose, not by accident of how pytest was launched."""
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  signal.signal(signal.SIGINT, signal.default_int_handler)
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  yield
  for signum, handler in before.items():
    signal.signal(signum, handler)


def _signal_soon(signum):
  """Sends `signum` to this process and gives its handler the main thread to run in."""
  os.kill(os.getpid(), signum)
  for _ in range(100):
    time.sleep(0.001)


def test_ctrl_c_asks_to_stop_and_a_second_ctrl_c_stops_at_once(ctrl_c_handled):
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  notice = pretrain.PreemptionNotice()
  try:
    _signal_soon(signal.SIGINT)  # no KeyboardInterrupt: the loop saves first
    assert notice.requested and notice.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):  # while saving: the user is not trapped
      _signal_soon(signal.SIGINT)
  finally:
    notice.close()
  assert {s: signal.getsignal(s) for s in before} == before
  # A process that ignores SIGINT (a job started with '&') keeps ignoring it.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    notice = pretrain.PreemptionNotice()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    _signal_soon(signal.SIGTERM)
    assert notice.signal_name == "SIGTERM"
    notice.close()
  finally:
    signal.signal(signal.SIGINT, before[signal.SIGINT])


def test_render_processes_ignore_the_terminals_ctrl_c():
  """A terminal sends Ctrl-C to the whole process group: the render workers
  (config.data.render_workers > 1) must live on for the trainer to save its step."""
  import multiprocessing
  from clmim.data.synthetic import training_stream
  dataset = ShapesTextures(16, "train", 40, version=3)
  before = set(multiprocessing.active_children())
  stream = training_stream(dataset, 4, workers=2)
  first = next(stream)
  workers = [p for p in multiprocessing.active_children() if p not in before]
  assert len(workers) == 2

  def ignores_sigint(pid):  # the kernel's record of the process's ignored signals (Linux)
    with open(f"/proc/{pid}/status") as f:
      mask = next(line for line in f if line.startswith("SigIgn:")).split()[1]
    return bool(int(mask, 16) & (1 << (signal.SIGINT - 1)))

  deadline = time.time() + 20  # a spawned worker boots (imports numpy) before it can ignore
  while not all(ignores_sigint(w.pid) for w in workers) and time.time() < deadline:
    time.sleep(0.05)
  for worker in workers:
    os.kill(worker.pid, signal.SIGINT)
  time.sleep(0.5)
  assert all(worker.is_alive() for worker in workers)
  for step in range(1, 5):  # every batch still comes, the same as without the interruption
    np.testing.assert_array_equal(next(stream)["image"],
                                  dataset.batch(range(4 * step, 4 * step + 4))["image"])
  stream.close()
  np.testing.assert_array_equal(first["image"], dataset.batch(range(4))["image"])


@pytest.mark.slow
def test_ctrl_c_saves_the_step_and_the_resumed_run_ends_as_the_straight_one(
    tmp_path, capsys, monkeypatch, ctrl_c_handled):
  """Ctrl-C while step 3 runs (sent as its batch is read): the run saves step 3 and stops with
  one line; the same command resumes it, and it ends bit-identical to an uninterrupted run."""
  config = lambda: pretrain_simmim.get_config("runlocal")
  pretrain.run(config(), str(tmp_path / "straight"))
  stream = synthetic.training_stream

  def interrupted(dataset, batch_size, start_step, **kwargs):
    for step, batch in enumerate(stream(dataset, batch_size, start_step, **kwargs), start_step):
      if step == 2:
        os.kill(os.getpid(), signal.SIGINT)
      yield batch

  monkeypatch.setattr(synthetic, "training_stream", interrupted)
  handler = signal.getsignal(signal.SIGINT)
  workdir = str(tmp_path / "interrupted")
  with pytest.raises(ClmimError) as stopped:
    pretrain.run(config(), workdir)
  assert str(stopped.value) == (f"Stopped by SIGINT after step 3: checkpoint saved in "
                                f"{workdir}/checkpoints; run the same command again to resume.")
  assert stopped.value.exit_status == 130  # clmim.main exits with it, as for any Ctrl-C
  assert "Ctrl-C: saving the checkpoint of step 3" in capsys.readouterr().err
  assert preflight.checkpoint_steps(workdir)[-1] == 3 and not os.path.exists(
      os.path.join(workdir, "export"))
  assert signal.getsignal(signal.SIGINT) == handler
  monkeypatch.setattr(synthetic, "training_stream", stream)
  pretrain.run(config(), workdir)
  assert "Resumed from step 3" in capsys.readouterr().out
  straight = _final_state(str(tmp_path / "straight"), config())
  resumed = _final_state(workdir, config())
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(straight)[0],
                          jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  losses = lambda run: [(r["step"], r["loss"]) for r in trainer.read_metrics(str(tmp_path / run))]
  assert losses("interrupted") == losses("straight")
