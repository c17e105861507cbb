"""The analysis job in-process: model naming, summary, and the uniform-attention reference."""
import shutil

import numpy as np
import pytest

from clmim.analysis import attention_distance
from clmim.jobs import analyze as experiment
from clmim.errors import ClmimError
from tiny_checkpoints import save_random_checkpoint
from configs import all as all_config
from configs import pretrain_simmim


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt") / "step_10"
  save_random_checkpoint(path, pretrain_simmim, steps=10)
  return path


def test_uniform_attention_distance_brute_force():
  grid, patch = 3, 2
  coords = [(r, c) for r in range(grid) for c in range(grid)]
  brute = np.mean([patch * np.hypot(a[0] - b[0], a[1] - b[1]) for a in coords for b in coords])
  assert attention_distance.uniform_attention_distance(grid, patch) == pytest.approx(brute, rel=1e-6)


def test_snapshots_of_one_run_get_distinct_names(checkpoint, tmp_path, capsys):
  other = tmp_path / "step_20"
  shutil.copytree(checkpoint, other)
  config = all_config.get_config("runlocal")
  config.models = f"{checkpoint},{other}"
  config.progress = False
  results = experiment.run(config, str(tmp_path / "out"))
  assert set(results["models"]) == {"simmim_demo [step_10]", "simmim_demo [step_20]"}
  # Same weights, same images: identical numbers.
  a, b = results["models"].values()
  np.testing.assert_array_equal(a["nmi"], b["nmi"])
  out = capsys.readouterr().out
  assert "NMI (mean over heads, by block" in out and "simmim_demo [step_20]" in out
  # The summary is a table: a header row with the block numbers, then one row per model.
  header = next(line for line in out.splitlines() if line.strip().startswith("model"))
  assert header.split()[:4] == ["model", "family", "1", "2"]
  config.models = f"{checkpoint},{checkpoint}"
  with pytest.raises(ClmimError, match="same model twice"):
    experiment.run(config, str(tmp_path / "out2"))
