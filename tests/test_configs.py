"""Every config file builds the model it describes, and its fields do what their comments say."""
import importlib
import os

import jax
import pytest

from clmim import preflight
from clmim.checkpoints import registry
from clmim.errors import ClmimError
from clmim.models.vit import vit_fields
from clmim.train.common import build_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                 if f.endswith(".py") and not f.startswith("_"))
# Configs of the trainer: pretraining, and fine-tuning (mode "finetune", the same fields).
PRETRAINING = [c for c in CONFIGS if c.startswith("pretrain_") or c == "finetune"]
ANALYSIS = [c for c in CONFIGS if c not in PRETRAINING]
# The demo ViT (variant mu/4 at 32 px): width, depth, heads, MLP, patch, image size.
DEMO = dict(width=128, depth=6, num_heads=4, mlp_dim=256, patch_size=4, image_size=32)


def _config(name, arg="demo"):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def test_every_config_file_is_covered():
  assert PRETRAINING and ANALYSIS
  for name in CONFIGS:
    kind = preflight.config_kind(_config(name))
    assert kind == ("pretraining" if name in PRETRAINING else "analysis"), name


@pytest.mark.parametrize("name", PRETRAINING)
def test_pretraining_config_builds_its_model(name):
  config = _config(name)
  vit = build_encoder(config)
  assert {k: getattr(vit, k) for k in DEMO} == DEMO
  assert vit.grid == 8
  params = jax.eval_shape(lambda: vit.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 32, 32, 3))))
  num_params = sum(p.size for p in jax.tree.leaves(params))
  assert 0.75e6 < num_params < 0.85e6, num_params  # the README's "0.8 M parameters"
  objective = importlib.import_module(f"clmim.train.{config.objective}").Objective(config)
  if config.objective == "finetune":  # the encoder it starts from sets the architecture
    pretrained = registry.resolve(config.init_encoder).vit
    assert vit_fields(objective.encoder) == {**vit_fields(pretrained), "drop_path": 0.1}
  else:
    assert vit_fields(objective.encoder) == vit_fields(vit)
  # runlocal shrinks depth only
  small = build_encoder(_config(name, "runlocal"))
  assert (small.depth, small.width) == (2, 128)


@pytest.mark.parametrize("name", PRETRAINING)
def test_variant_sets_the_size_and_explicit_fields_override_it(name):
  config = _config(name)
  config.model.variant = "S/16"
  config.data.image_size = 224  # one image size for data and model
  vit = build_encoder(config)
  assert (vit.width, vit.depth, vit.num_heads, vit.mlp_dim, vit.patch_size, vit.image_size) == \
      (384, 12, 6, 1536, 16, 224)
  config.model.depth = 3  # set explicitly: overrides the variant, and nothing else changes
  vit = build_encoder(config)
  assert (vit.width, vit.depth, vit.num_heads, vit.mlp_dim) == (384, 3, 6, 1536)


def test_bad_model_fields_are_named():
  config = _config("pretrain_moco_v3")
  config.data.image_size = 30  # not a multiple of patch 4
  with pytest.raises(ClmimError, match="config.data.image_size=30"):
    build_encoder(config)
  config = _config("pretrain_moco_v3")
  config.model.variant = "Q/16"
  with pytest.raises(ClmimError, match="config.model: Unknown ViT variant 'Q/16'"):
    build_encoder(config)
  config = _config("pretrain_simmim")
  config.simmim.mask_patch = 6  # not a multiple of patch 4
  with pytest.raises(ClmimError, match="config.simmim.mask_patch=6"):
    importlib.import_module("clmim.train.simmim").Objective(config)


@pytest.mark.parametrize("name", ANALYSIS)
def test_analysis_config_resolves_its_models(name):
  config = _config(name)
  for spec in registry.split_specs(config.models):
    model = registry.resolve(spec)
    assert {k: getattr(model.vit, k) for k in DEMO} == DEMO, spec
    assert model.source == f"{spec} (shipped with clmim)"  # no machine's path in results
  assert config.analyses
  assert config.overwrite is False


# Fields that change how often a run logs, saves or renders, not what it trains.
_CADENCE = {"checkpoint_every", "log_every", "data.render_workers", "compilation_cache",
            "tensorboard", "keep_checkpoints", "init_encoder"}


def _flat(d, prefix=""):
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = tuple(value) if isinstance(value, (list, tuple)) else value
  return out


@pytest.mark.parametrize("name", ["moco_v3_demo", "simmim_demo"])
def test_demo_variants_reproduce_the_shipped_models_configs(name):
  """Each stage a shipped demo model's manifest records was trained with the config its
  `reproduce` commands name, field for field (cadence fields and the init path aside)."""
  import json
  with open(os.path.join(registry.DEMO_DIR, name, "manifest.json")) as f:
    manifest = json.load(f)
  stages = manifest.get("stages") or [{"config": manifest["config"]}]
  stages[-1] = {**stages[-1], "config": manifest["config"]}
  assert len(stages) == len(manifest["reproduce"])
  for stage, command in zip(stages, manifest["reproduce"]):
    file, variant = command.split("--config ")[1].split()[0].split(":")
    config = _config(os.path.basename(file)[:-3], variant).to_dict()
    ours, theirs = _flat(config), _flat(stage["config"])
    # Fields added after the models were trained, whose defaults keep the old behaviour.
    from clmim import config_lib
    from clmim.jobs import pretrain
    added = {**pretrain.resume_fields(config).added_later,
             "no_weight_decay": config_lib.NO_WEIGHT_DECAY, "freeze": ""}
    for key, default in added.items():
      default = tuple(default) if isinstance(default, list) else default
      if key not in theirs and ours.get(key) == default:
        theirs[key] = default
    differ = {k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}
    assert differ <= _CADENCE, {k: (ours.get(k), theirs.get(k)) for k in differ - _CADENCE}
  assert manifest["version"] == 2 and manifest["data_version"] == 3
  assert manifest["config"]["data"]["version"] == 3


def test_moco_demo_names_its_first_stage_and_refuses_without_it(tmp_path):
  config = _config("pretrain_moco_v3", "demo")
  assert config.init_encoder == importlib.import_module("configs.pretrain_moco_v3").STAGE1_EXPORT
  assert _config("pretrain_moco_v3", "demo_stage1").init_encoder == ""
  config.unlock()
  config.init_encoder = str(tmp_path / "no_stage1" / "export")
  from clmim.train import trainer
  objective = importlib.import_module("clmim.train.moco_v3").Objective(config)
  with pytest.raises(ClmimError, match="config.init_encoder=.*does not exist"):
    trainer.initial_encoder(config, objective)
  with pytest.raises(ValueError, match="demo_stage1"):
    _config("pretrain_moco_v3", "stage3")


# The official ViT-B/16 ImageNet-1k recipes (each file's docstring lists its departures).
VITB16 = {
    "pretrain_moco_v3": {"batch_size": 4096, "lr": 2.4e-3, "total_steps": 93836,
                         "warmup_steps": 12512, "weight_decay": 0.1, "beta2": 0.999,
                         "grad_clip": 0.0, "final_lr_fraction": 0.0, "moco.hidden_dim": 4096,
                         "moco.out_dim": 256, "moco.momentum": 0.99, "moco.temperature": 0.2,
                         "augment.crop_scale": (0.08, 1.0), "augment.blur_sigma": (0.1, 2.0)},
    "pretrain_simmim": {"batch_size": 2048, "lr": 4e-4, "total_steps": 500456,
                        "warmup_steps": 6256, "weight_decay": 0.05, "beta2": 0.999,
                        "grad_clip": 5.0, "simmim.mask_patch": 32, "simmim.mask_ratio": 0.6,
                        "model.drop_path": 0.1, "model.layer_scale_init": 0.1},
    "pretrain_mae": {"batch_size": 4096, "lr": 2.4e-3, "total_steps": 250228,
                     "warmup_steps": 12512, "weight_decay": 0.05, "beta2": 0.95,
                     "grad_clip": 0.0, "mae.decoder_width": 512, "mae.decoder_depth": 8,
                     "mae.decoder_heads": 16, "mae.mask_ratio": 0.75},
    "pretrain_hybrid": {"batch_size": 4096, "lr": 2.4e-3, "total_steps": 31279,
                        "warmup_steps": 3128, "hybrid.weight": 0.4, "simmim.mask_patch": 32,
                        "moco.hidden_dim": 4096},
}


@pytest.mark.parametrize("name", sorted(VITB16))
def test_vitb16_variants_are_the_official_recipes(name):
  config = _config(name, "vitb16")
  got = _flat(config.to_dict())
  for key, value in VITB16[name].items():
    assert got[key] == pytest.approx(value), key
  assert (config.data.source, config.data.tfds_name, config.data.image_size,
          config.data.mean) == ("tfds", "imagenet2012", 224, "imagenet")
  vit = build_encoder(config)
  assert (vit.width, vit.depth, vit.num_heads, vit.mlp_dim, vit.patch_size) == \
      (768, 12, 12, 3072, 16)
  importlib.import_module(f"clmim.train.{config.objective}").Objective(config)
  preflight.check_fields(config, "pretrain", 8)
  assert "Departures" in importlib.import_module(f"configs.{name}").__doc__


def test_analyze_takes_its_analyses_and_variant_from_the_argument():
  from configs import analyze
  config = analyze.get_config("")
  assert config.analyses == "attention_distance,nmi,fourier" and config.name == "analyze"
  one = analyze.get_config("fourier:runlocal")
  assert one.analyses == "fourier" and one.name == "fourier"
  assert one.data.num_images == analyze.get_config("runlocal").data.num_images < \
      config.data.num_images
  assert analyze.get_config("runlocal:nmi,svd").analyses == "nmi,svd"
  with pytest.raises(ValueError, match="two lists of analyses"):
    analyze.get_config("nmi:svd")
