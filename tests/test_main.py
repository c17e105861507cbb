"""The command line, end to end: results.json, figures, summary, and one clear error per bad input.

The bad inputs that the jobs find (a corrupt checkpoint, an unknown model or analysis, an image
folder without images or with an undecodable image) run in-process through `clmim.main.run`, what
the command line calls after parsing its flags, with the compute replaced by a tripwire: a
subprocess would add ~2 s of imports each and prove nothing more. The command line itself, its
one `clmim: error:` line and exit status, is shown by a missing checkpoint (an error found by a
job) and an unknown config field (one found while parsing the flags); Ctrl-C and a whole run go
through it too.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from clmim import main as clmim_main
from config_fields import set_fields
from refusals import refused
from tiny_checkpoints import save_random_checkpoint
from configs import analyze, nmi, pretrain_moco_v3, pretrain_simmim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=300):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "clmim.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """Two small randomly initialised checkpoints, one per family (depth 2, 32 px)."""
  root = tmp_path_factory.mktemp("ckpts")
  paths = []
  for module, seed in ((pretrain_moco_v3, 0), (pretrain_simmim, 1)):
    path = str(root / module.get_config("runlocal").name)
    save_random_checkpoint(path, module, seed=seed)
    paths.append(path)
  return paths


@pytest.mark.slow
def test_analysis_run_writes_results_figures_and_summary(checkpoints, tmp_path):
  workdir = tmp_path / "out"
  result = _cli("--config", "configs/analyze.py:runlocal", f"--config.models={','.join(checkpoints)}",
                "--config.include_untrained=True", "--config.batch_size=16",
                f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Wrote {workdir}/results.json" in result.stdout
  assert "attention distance (px) (mean over heads, by block; uniform attention" in result.stdout
  assert "high-frequency ΔlogA (by stage, emb = embedding):" in result.stdout
  fourier_header = result.stdout.split("emb = embedding):")[1].splitlines()[1].split()
  assert fourier_header == ["model", "family", "emb", "1", "2"]  # stage 0 = the embedding
  assert (workdir / "summary.txt").read_text().startswith("64 images per model; 2 compilation(s)")
  assert "NMI (paper: CL lower)" in result.stdout
  assert results_run_recorded(workdir)
  results = json.load(open(workdir / "results.json"))
  moco, simmim = (_manifest_name(path) for path in checkpoints)
  assert set(results["models"]) == {moco, simmim, f"{moco} (untrained)", f"{simmim} (untrained)"}
  assert results["num_images"] == 64
  # An analysis run leaves glibc alone (clmim/host_memory.py), and says so.
  assert results["versions"]["host_memory"] == "system (not requested: not a training run)"
  for name, r in results["models"].items():
    assert np.shape(r["attention_distance"]) == (2, 4), name
    assert np.shape(r["nmi"]) == np.shape(r["attention_entropy"]) == (2, 4)
    assert np.shape(r["fourier"]) == (3, 4) and np.shape(r["fourier_all_states"]) == (5, 4)
  assert results["model_info"][moco]["family"] == "cl"
  assert results["model_info"][f"{simmim} (untrained)"]["family"] == "random"
  assert results["model_info"][moco]["uniform_attention_distance"] == \
      pytest.approx(16.546, abs=1e-3)
  assert results["config"]["analyses"] == "attention_distance,nmi,fourier"
  assert results["versions"]["jax"] == jax.__version__
  for figure in ("attention_distance.png", "nmi.png", "attention_entropy.png", "fourier.png"):
    assert Image.open(workdir / figure).size[0] > 300
  assert sorted(results["figures"]) == sorted(f for f in os.listdir(workdir) if f.endswith(".png"))


def _manifest_name(path) -> str:
  """The name a checkpoint's manifest gives it (what results show)."""
  with open(os.path.join(path, "manifest.json")) as f:
    return json.load(f)["name"]


def results_run_recorded(workdir):
  """results.json records the real command line, its overrides and the workdir."""
  run = json.load(open(workdir / "results.json"))["run"]
  return (run["command"].startswith("python -m clmim.main --config configs/analyze.py:runlocal")
          and "--config.batch_size=16" in run["overrides"] and run["workdir"] == str(workdir))


def _assert_clean_failure(result, workdir, *fragments):
  assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("clmim: error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  assert not os.path.exists(os.path.join(workdir, "results.json"))


def test_missing_checkpoint(checkpoints, tmp_path):
  missing = str(tmp_path / "no_such_ckpt")
  result = _cli("--config", "configs/nmi.py:runlocal", f"--config.models={checkpoints[0]},{missing}",
                f"--workdir={tmp_path}")
  _assert_clean_failure(result, tmp_path, missing, "does not exist")


def _nmi(**fields):
  """configs/nmi.py:runlocal with `--config.<field>=<value>` overrides."""
  return set_fields(nmi.get_config("runlocal"), fields)


def test_corrupt_checkpoint(checkpoints, tmp_path, no_compute):
  import shutil
  corrupt = tmp_path / "corrupt"
  shutil.copytree(checkpoints[1], corrupt)
  (corrupt / "encoder.npz").write_bytes(b"PK\x03\x04 truncated")
  refused(_nmi(models=str(corrupt)), tmp_path, str(corrupt / "encoder.npz"), "corrupt",
          root=str(tmp_path))


def test_unknown_model_name(tmp_path, no_compute):
  refused(_nmi(models="moco_v9"), tmp_path, "Unknown model 'moco_v9'", root=str(tmp_path))


def _ctrl_c_while_computing(workdir, num_images, ignoring: bool):
  """Runs configs/nmi.py:runlocal on `num_images` images, with SIGINT ignored when `ignoring`
  (as a shell starts a `&` job without job control), else default; sends the
  whole process group a Ctrl-C once it computes: (exit status, stderr)."""
  import signal
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  command = ["-m", "clmim.main", "--config", "configs/nmi.py:runlocal",
             f"--config.data.num_images={num_images}", "--config.progress=False",
             f"--workdir={workdir}"]
  # As a shell starts a command: the disposition set, then exec (which keeps SIG_IGN and
  # SIG_DFL). Not inherited from this test process, which may itself ignore SIGINT (nohup, `&`).
  disposition = "SIG_IGN" if ignoring else "SIG_DFL"
  command = ["-c", f"import os, signal, sys; signal.signal(signal.SIGINT, signal.{disposition}); "
             "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])", *command]
  process = subprocess.Popen(
      [sys.executable, *command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    started = process.stdout.readline()  # "<model>: synthetic shapes x textures, ..."
    assert f"{num_images} images" in started, started + process.stderr.read()
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
  finally:
    if process.poll() is None:
      process.kill()
  return process.returncode, stderr


def test_ctrl_c_prints_one_line_and_leaves_no_results(tmp_path):
  """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the analysis
  computes: one line, status 130, no results.json, no traceback."""
  workdir = tmp_path / "out"
  # Far more images than it gets through before the signal: it is computing when it comes.
  status, stderr = _ctrl_c_while_computing(workdir, 20000, ignoring=False)
  assert status == 130, stderr
  assert stderr.strip().splitlines() == [
      f"clmim: interrupted (Ctrl-C); nothing was written in {workdir} (an analysis writes its "
      f"outputs together, at the end)."], stderr
  assert not os.path.exists(workdir / "results.json")


@pytest.mark.slow
def test_a_run_started_ignoring_ctrl_c_keeps_ignoring_it(tmp_path):
  """A background job of a script (`clmim ... &` without job control) starts with SIGINT
  ignored; the Ctrl-C a user types for the foreground command must not stop it."""
  workdir = tmp_path / "out"
  status, stderr = _ctrl_c_while_computing(workdir, 64, ignoring=True)
  assert status == 0, stderr
  assert os.path.exists(workdir / "results.json")


def test_a_ctrl_c_python_would_ignore_is_raised_again():
  """A KeyboardInterrupt raised inside a garbage-collector callback is ignored by Python (the
  run went on to the end); clmim.main raises it again in the main thread's own code."""
  script = (
      "import gc, signal, sys, time\n"
      "from clmim import main\n"
      "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
      "sys.unraisablehook = main._interrupt_again\n"
      "def callback(phase, info):\n"
      "  if phase == 'start':\n"
      "    gc.callbacks.remove(callback)  # once\n"
      "    raise KeyboardInterrupt\n"
      "gc.callbacks.append(callback)\n"
      "try:\n"
      "  gc.collect()\n"
      "  time.sleep(5)\n"
      "  print('not interrupted')\n"
      "except KeyboardInterrupt:\n"
      "  print('interrupted')\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
  assert result.stdout.strip() == "interrupted", result.stdout + result.stderr
  assert "Exception ignored" not in result.stderr


def test_interrupted_line_says_what_the_run_left(tmp_path):
  from clmim import main
  assert main.interrupted_line() == \
      "clmim: interrupted (Ctrl-C) before the run started; nothing was written."
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "results.json").write_text("{}")
  (workdir / "notes.txt").write_text("mine")
  before = main.listing(workdir)
  (workdir / "results.json").unlink()  # --config.overwrite=True removed the earlier run's
  assert main.interrupted_line("analyze", str(workdir), before) == (
      f"clmim: interrupted (Ctrl-C); nothing was written in {workdir}, removed results.json "
      f"(--config.overwrite=True) (an analysis writes its outputs together, at the end).")
  (workdir / "checkpoints" / "4").mkdir(parents=True)
  (workdir / "config.json").write_text("{}")
  assert main.interrupted_line("pretrain", str(workdir), before) == (
      f"clmim: interrupted (Ctrl-C); wrote checkpoints/, config.json in {workdir}, removed "
      f"results.json; the checkpoint of step 4 is kept: the same command resumes from it.")


def test_unknown_config_field(tmp_path):
  result = _cli("--config", "configs/nmi.py", "--config.data.num_imagez=3", f"--workdir={tmp_path}")
  _assert_clean_failure(result, tmp_path, "--config.data.num_imagez=3", "num_images")


def test_unknown_analysis(checkpoints, tmp_path, no_compute):
  refused(_nmi(models=checkpoints[0], analyses="nmi,nmy"), tmp_path,
          "unknown analysis 'nmy'", "attention_distance", "fourier", root=str(tmp_path))


def test_image_folder_without_images(checkpoints, tmp_path, no_compute):
  (tmp_path / "data" / "cat").mkdir(parents=True)
  (tmp_path / "data" / "cat" / "notes.txt").write_text("no images here")
  config = _nmi(models=checkpoints[0], **{"data.source": "image_folder",
                                           "data.path": str(tmp_path / "data")})
  refused(config, tmp_path, str(tmp_path / "data"), root=str(tmp_path))


def test_undecodable_image(checkpoints, tmp_path, no_compute):
  folder = tmp_path / "data" / "dog"
  folder.mkdir(parents=True)
  for i in range(3):
    Image.fromarray(np.full((40, 50, 3), 40 * i, np.uint8)).save(folder / f"ok_{i}.png")
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
  config = _nmi(models=checkpoints[0], **{"data.source": "image_folder",
                                           "data.path": str(tmp_path / "data")})
  refused(config, tmp_path, "broken.jpg", root=str(tmp_path))


def test_image_folder_runs(checkpoints, tmp_path):
  for label in ("a", "b"):
    folder = tmp_path / "data" / label
    folder.mkdir(parents=True)
    for i in range(3):
      pixels = np.random.default_rng(i).integers(0, 255, (60, 45, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(folder / f"{i}.jpg")
  workdir = tmp_path / "out"
  config = set_fields(analyze.get_config("attention_distance:runlocal"), {
      "models": checkpoints[1], "data.source": "image_folder",
      "data.path": str(tmp_path / "data"), "data.num_images": 0, "progress": False})
  clmim_main.run(config, str(workdir))
  results = json.load(open(workdir / "results.json"))
  assert results["num_images"] == 6
  assert "image folder" in results["model_info"][_manifest_name(checkpoints[1])]["data"]
