"""Data sources are found by name, and a new one is one module: tests/npy_source.py (the README's
worked example) is registered here, then an analysis run and a pretraining run read it."""
import json
import os

import numpy as np
import pytest

import npy_source
from clmim.data import sources
from clmim.errors import ClmimError
from clmim.jobs import analyze, pretrain
from configs import analyze as all_config
from configs import pretrain_simmim


def _arrays(root, size, per_class=6, classes=("circle", "square")):
  rng = np.random.default_rng(0)
  for label, name in enumerate(classes):
    os.makedirs(root / name)
    for i in range(per_class):
      image = np.full((size, size, 3), 0.2 + 0.5 * label, np.float32)
      image += 0.1 * rng.random((size, size, 3)).astype(np.float32)
      np.save(root / name / f"{i}.npy", image)
  return str(root)


@pytest.fixture
def npy(monkeypatch):
  monkeypatch.setitem(sources.SOURCES, npy_source.NAME, npy_source)


def test_every_source_module_has_the_whole_interface():
  needed = ("NAME", "LABELS", "OBJECT_MASKS", "SECOND_VIEWS", "DRAWN", "DECISION_PROBE",
            "check_training", "open_evaluation", "evaluation_labels", "training_images",
            "training_labels", "training_batches", "class_count", "held_out",
            "probe_training", "probe_evaluation", "cue_conflict")
  for module in list(sources.SOURCES.values()) + [npy_source]:
    assert [n for n in needed if not hasattr(module, n)] == [], module.__name__
    assert module.OBJECT_MASKS == hasattr(module, "object_mask")


def test_an_unknown_source_is_one_line_with_a_suggestion():
  with pytest.raises(ClmimError, match=r"config.data.source='image_foldr' \(did you mean "
                                       r"'image_folder'\?\): expected one of synthetic"):
    sources.get("image_foldr")


@pytest.mark.slow
def test_an_analysis_and_probes_read_a_registered_source(tmp_path, npy):
  config = all_config.get_config("runlocal")
  config.analyses = "attention_distance,probing"
  config.models = "random:mu/4?depth=2&image_size=16"
  config.progress = False
  config.data.source = "npy"
  config.data.path = _arrays(tmp_path / "arrays", 16)
  config.data.num_images = 0
  config.analysis_options.probing.knn_k = 3  # 12 images in all
  results = analyze.run(config, str(tmp_path / "run"))
  values = next(iter(results["models"].values()))
  assert values["num_images"] == 12 and len(values["attention_distance"]) == 2
  assert "probe_label_cls" in values  # the source's label column


@pytest.mark.slow
def test_a_pretraining_run_reads_a_registered_source(tmp_path, npy):
  config = pretrain_simmim.get_config("runlocal")
  config.data.source = "npy"
  config.data.path = _arrays(tmp_path / "arrays", config.data.image_size, per_class=4)
  pretrain.run(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    assert len([json.loads(line) for line in f]) > 0
