"""Objectives are a written interface found through one table, and a new one is one module:
tests/denoise_objective.py (the README's worked example) trains, resumes and exports through
the one training job without any other change."""
import json
import os

import jax
import ml_collections
import pytest

from clmim import preflight
from clmim.checkpoints import registry
from clmim.errors import ClmimError
from clmim.jobs import pretrain
from clmim.train import objectives
from configs import finetune, pretrain_hybrid, pretrain_mae, pretrain_moco_v3, pretrain_simmim

CONFIGS = {"moco_v3": pretrain_moco_v3, "simmim": pretrain_simmim, "mae": pretrain_mae,
           "hybrid": pretrain_hybrid, "finetune": finetune}


def test_every_objective_subclasses_the_interface_and_its_config_has_its_sections():
  assert set(objectives.NAMES) == set(CONFIGS)
  for name in objectives.NAMES:
    cls = objectives.get(name)
    assert issubclass(cls, objectives.Objective), name
    config = CONFIGS[name].get_config("runlocal")
    assert config.objective == name
    assert all(section in config for section in cls.SECTIONS), (name, cls.SECTIONS)
    assert all(field.split(".")[0] in cls.SECTIONS for field in cls.HOW_NOT_WHAT), name


def test_an_objective_without_a_loss_cannot_be_built():
  class NoLoss(objectives.Objective):
    def init(self, rng, images):
      return {}, {}

    def encoder_params(self, params, state):
      return params

    def with_encoder(self, params, state, encoder):
      return encoder, state

  with pytest.raises(TypeError, match="loss"):
    NoLoss(None)


def test_a_module_without_an_objective_class_is_one_error(monkeypatch):
  monkeypatch.setitem(objectives.OBJECTIVES, "errors", "clmim.errors")
  with pytest.raises(ClmimError, match="clmim.errors defines no Objective subclassing"):
    objectives.get("errors")


def _denoise_config(noise_std=0.1):
  config = pretrain_simmim.get_config("runlocal")
  config.unlock()
  config.objective = "denoise"
  del config["simmim"]  # SimMIM's section: nothing reads it now
  config.denoise = ml_collections.ConfigDict({"noise_std": noise_std})
  config.tensorboard = False
  return config


@pytest.fixture
def denoise(monkeypatch):
  monkeypatch.setitem(objectives.OBJECTIVES, "denoise", "denoise_objective")


def test_a_registered_objectives_fields_are_checked_before_anything_is_written(denoise, tmp_path):
  preflight.check_run(_denoise_config(), str(tmp_path / "ok"), jax.device_count())
  with pytest.raises(ClmimError, match=r"config.denoise.noise_std=-1: expected a number >= 0"):
    pretrain.run(_denoise_config(noise_std=-1), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
  assert "denoise" in pretrain.resume_fields(_denoise_config()).sections


@pytest.mark.slow
def test_a_registered_objective_trains_resumes_and_exports(denoise, tmp_path):
  workdir = str(tmp_path / "run")
  final = pretrain.run(_denoise_config(), workdir)
  assert final["loss"] > 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f][-1] == 6
  model = registry.resolve(os.path.join(workdir, "export"))
  assert model.vit.depth == 2
  # Its section is part of what the run is: another noise level is another run.
  config = _denoise_config(noise_std=0.5)
  config.total_steps = 8
  with pytest.raises(ClmimError, match=r"denoise.noise_std: 0.1 -> 0.5"):
    pretrain.run(config, workdir)
  config.denoise.noise_std = 0.1
  pretrain.run(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f][-1] == 8
