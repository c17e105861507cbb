"""Every user error is found before any compute, named in one line, and leaves the disk as it was.

Most cases run in-process through `clmim.main.run` with the analysis/training compute replaced
by a tripwire, so a check that came too late fails the test; a few go through the command line
to show the one-line format and the exit status.
"""
import json
import os
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest

from clmim import main as clmim_main
from clmim import preflight
from config_fields import set_fields
from refusals import listing, refused
from configs import nmi, pretrain_moco_v3, pretrain_simmim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def _analysis(**fields):
  return set_fields(nmi.get_config("runlocal"), fields)


@pytest.mark.parametrize("value", [0, -4, 3])
def test_analysis_batch_size_must_split_over_the_devices(tmp_path, no_compute, value):
  assert jax.device_count() == 8
  refused(_analysis(batch_size=value), tmp_path / "out", f"config.batch_size={value}")


def test_negative_counts_arerefused(tmp_path, no_compute):
  refused(_analysis(**{"data.num_images": -1}), tmp_path / "out", "config.data.num_images=-1",
           ">= 0")
  refused(_analysis(**{"data.max_batches": -2}), tmp_path / "out", "config.data.max_batches")


def test_unknown_data_version_and_render_workers_arerefused(tmp_path, no_compute):
  refused(_analysis(**{"data.version": 4}), tmp_path / "out", "config.data.version=4",
           "1: the four shapes")
  config = pretrain_moco_v3.get_config("runlocal")
  config.data.version = 0
  refused(config, tmp_path / "run", "config.data.version=0")
  config.data.version = 2
  config.data.render_workers = 0
  refused(config, tmp_path / "run", "config.data.render_workers=0", ">= 1")
  config = pretrain_moco_v3.get_config("runlocal")
  config.augment.second_view = "redraw:background+colour"
  refused(config, tmp_path / "run", "config.augment.second_view='redraw:background+colour'",
           "redraw:background+colours")
  config = pretrain_moco_v3.get_config("runlocal")
  config.augment.second_view_ramp = (100, -1)
  refused(config, tmp_path / "run", "config.augment.second_view_ramp=(100, -1)", "two steps")


def test_workdir_that_is_a_file_or_unwritable(tmp_path, no_compute):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  refused(_analysis(), blocker, "is a file")
  refused(_analysis(), blocker / "sub", "is a file")
  refused(_analysis(), "/proc/clmim-out", "/proc/clmim-out", "cannot write", root=str(tmp_path))


def test_read_only_workdir(tmp_path, no_compute):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
  try:
    if os.access(locked, os.W_OK) and os.geteuid() == 0:
      pytest.skip("root writes into read-only folders; /proc covers unwritable workdirs")
    refused(_analysis(), locked / "out", "cannot write")
  finally:
    locked.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("mode", ["pretrain", "export", "snapshots"])
def test_analysis_config_in_a_training_mode(tmp_path, no_compute, mode):
  refused(_analysis(mode=mode), tmp_path / "out",
           f"config.mode={mode!r} does not apply to an analysis config")


def test_pretraining_config_in_analyze_mode(tmp_path, no_compute):
  config = pretrain_moco_v3.get_config("runlocal")
  config.mode = "analyze"
  refused(config, tmp_path / "out", "config.mode='analyze'", "pretraining config")


def test_unknown_family_and_missing_heads(tmp_path, no_compute):
  refused(_analysis(models="mea:/x.pth"), tmp_path / "out", "unknown family 'mea'", "moco_v3",
           "did you mean 'mae'?")
  refused(_analysis(models="moco_v3_demo?heads=3"), tmp_path / "out", "unknown option 'heads'")


@pytest.mark.parametrize("typo, meant", [("moco_v3_dmo", "moco_v3_demo"),
                                         ("simim_demo", "simmim_demo"),
                                         ("moco_v3_vitb", "moco_v3_vitb16"),
                                         ("random:simim_demo", "simmim_demo")])
def test_model_name_typos_suggest_the_closest_name(tmp_path, no_compute, typo, meant):
  refused(_analysis(models=typo), tmp_path / "out", f"Unknown model {typo.split(':')[-1]!r}",
           f"(did you mean {meant!r}?)")


@pytest.mark.parametrize("variant", ["B16", "b/16", "vit_b16"])
def test_a_misspelt_variant_is_named_as_a_variant(tmp_path, no_compute, variant):
  message = refused(_analysis(models=f"random:{variant}"), tmp_path / "out",
                     f"unknown ViT variant {variant!r}", "(did you mean 'B/16'?)",
                     "mu, Ti, S, M, B, L, H")
  assert "Unknown model" not in message


def test_workdir_of_another_run_kind_isrefused(tmp_path, no_compute):
  analysis_dir, training_dir = tmp_path / "analysis", tmp_path / "training"
  analysis_dir.mkdir()
  (analysis_dir / "results.json").write_text("{}")
  training = pretrain_moco_v3.get_config("runlocal")
  refused(training, analysis_dir, "holds an analysis run (results.json)",
           f"{analysis_dir}/pretrain")
  training_dir.mkdir()
  (training_dir / preflight.CONFIG_RECORD).write_text(json.dumps(training.to_dict()))
  refused(_analysis(), training_dir, "holds a training run (config.json)",
           f"{training_dir}/analysis")
  refused(_analysis(overwrite=True), training_dir, "holds a training run")


def test_workdir_holding_both_run_kinds_is_used_with_a_warning(tmp_path, capsys):
  workdir = tmp_path / "both"
  workdir.mkdir()
  training = pretrain_moco_v3.get_config("runlocal")
  (workdir / preflight.CONFIG_RECORD).write_text(json.dumps(training.to_dict()))
  (workdir / "results.json").write_text("{}")
  assert preflight.check_run(training, str(workdir), 8) == "pretrain"  # resumable as before
  warning = capsys.readouterr().err.strip().splitlines()
  assert len(warning) == 1 and warning[0].startswith("clmim: warning: --workdir"), warning
  assert "holds both an analysis run (results.json) and a training run (config.json)" in \
      warning[0]


def test_pretraining_batch_size_zero_leaves_no_checkpoints(tmp_path, no_compute):
  config = pretrain_simmim.get_config("runlocal")
  config.batch_size = 0
  refused(config, tmp_path / "run", "config.batch_size=0")
  config.batch_size = 12  # not a multiple of 8 devices
  refused(config, tmp_path / "run", "config.batch_size=12", "multiple of the 8 devices")


@pytest.mark.parametrize("mode", ["export", "snapshots"])
def test_export_and_snapshots_without_checkpoints_create_nothing(tmp_path, no_compute, mode):
  config = pretrain_moco_v3.get_config("runlocal")
  config.mode = mode
  refused(config, tmp_path / "missing", "no such folder")
  (tmp_path / "empty").mkdir()
  refused(config, tmp_path / "empty", "no checkpoints")


def test_resuming_with_another_objective_names_the_fields(tmp_path, no_compute):
  workdir = tmp_path / "run"
  workdir.mkdir()
  saved = pretrain_moco_v3.get_config("runlocal").to_dict()
  (workdir / preflight.CONFIG_RECORD).write_text(json.dumps(saved))
  message = refused(pretrain_simmim.get_config("runlocal"), workdir, "different config",
                     "objective: 'moco_v3' -> 'simmim'", "new --workdir")
  assert "model.block_style" in message
  same = pretrain_moco_v3.get_config("runlocal")
  same.total_steps = 99  # not an identity field: resuming with a longer schedule is fine
  same.data.render_workers = 8  # how batches are rendered, not what they hold
  preflight.check_resume(same, str(workdir))
  same.data.version = 2  # other images: another run
  refused(same, workdir, "data.version: 3 -> 2")
  # A record written before a field existed resumes under that field's old behaviour only.
  older = dict(saved, data={k: v for k, v in saved["data"].items() if k != "version"},
               augment={k: v for k, v in saved["augment"].items() if k != "second_view_ramp"})
  del older["init_encoder"]
  (workdir / preflight.CONFIG_RECORD).write_text(json.dumps(older))
  # Before data.version existed every run drew version 1 images; today's default is 3.
  refused(pretrain_moco_v3.get_config("runlocal"), workdir, "data.version: 1 -> 3")
  old_images = pretrain_moco_v3.get_config("runlocal")
  old_images.data.version = 1
  preflight.check_resume(old_images, str(workdir))
  ramped = pretrain_moco_v3.get_config("runlocal")
  ramped.data.version = 1
  ramped.augment.second_view_ramp = (0, 10)
  refused(ramped, workdir, "augment.second_view_ramp: [0, 0] -> [0, 10]")


def test_reused_analysis_workdir_is_refused_then_replaced(tmp_path, monkeypatch):
  workdir = tmp_path / "out"
  workdir.mkdir()
  (workdir / "results.json").write_text(json.dumps({"figures": ["old_figure.png"]}))
  (workdir / "old_figure.png").write_bytes(b"png")
  (workdir / "notes.txt").write_text("mine")
  config = _analysis(**{"data.num_images": 8}, batch_size=8,
                     models="random:mu/4?depth=1&image_size=32")
  refused(config, workdir, "already holds an analysis run", "--config.overwrite=True")
  config.overwrite = True
  config.progress = False
  results = clmim_main.run(config, str(workdir))
  assert not (workdir / "old_figure.png").exists()
  assert (workdir / "notes.txt").read_text() == "mine"  # not ours: left alone
  pngs = sorted(f for f in os.listdir(workdir) if f.endswith(".png"))
  assert sorted(results["figures"]) == pngs == ["attention_entropy.png", "nmi.png"]
  assert results["run"]["workdir"] == str(workdir)


def _cli(*args):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "clmim.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def test_command_line_prints_one_line_and_exits_1():
  """The format every refusal above has on the command line: `clmim.main` prints the ClmimError
  that `run` raises as one line, exit status 1, no traceback (one command shows it; each more
  would cost ~2 s of imports to show the same lines of clmim/main.py again)."""
  result = _cli("--config", "configs/analyze.py:runlocal", "--workdir", "/proc/clmim-x")
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "clmim: error: --workdir /proc/clmim-x: cannot write there"), result.stderr


def test_help_and_print_config_exit_0():
  result = _cli("--help")
  assert result.returncode == 0, result.stderr
  assert "README" in result.stdout and "--print_config" in result.stdout
  result = _cli("--config", "configs/pretrain_simmim.py:runlocal", "--config.model.variant=S/16",
                "--print_config")
  assert result.returncode == 0, result.stderr
  assert "variant: S/16" in result.stdout and "objective: simmim" in result.stdout
  assert "!!python" not in result.stdout and "crop_scale: [0.67, 1.0]" in result.stdout


@pytest.mark.parametrize("module", [nmi, pretrain_moco_v3])
def test_print_config_is_plain_yaml_of_the_resolved_values(module):
  """No `!!python/tuple` tags, no `&id001` anchors (nmi's analysis options share a dict);
  reading the text back gives the config, tuples as lists."""
  import yaml
  config = module.get_config("runlocal")
  text = clmim_main.config_text(config)
  assert "!!" not in text and "&id" not in text and "*id" not in text
  as_lists = lambda v: {k: as_lists(x) for k, x in v.items()} if isinstance(v, dict) else \
      [as_lists(x) for x in v] if isinstance(v, (list, tuple)) else v
  assert yaml.safe_load(text) == as_lists(config.to_dict())


@pytest.mark.slow
def test_random_variant_runs_offline(tmp_path, monkeypatch):
  monkeypatch.setenv("CLMIM_OFFLINE", "1")
  # Ti/16 at 32 px (a 2x2 grid) to keep it quick; the variant sets everything else.
  config = _analysis(models="random:Ti/16?image_size=32", batch_size=8, progress=False,
                     **{"data.num_images": 2})
  results = clmim_main.run(config, str(tmp_path / "out"))
  info = results["model_info"]["Ti/16 (untrained)"]
  assert (info["image_size"], info["patch_size"], info["depth"], info["num_heads"]) == \
      (32, 16, 12, 3)
  assert info["architecture_from"]["width"] == "variant Ti/16"
  assert info["architecture_from"]["image_size"] == "user (image_size=32)"
  assert np.shape(results["models"]["Ti/16 (untrained)"]["nmi"]) == (12, 3)
  assert results["num_images"] == 2
