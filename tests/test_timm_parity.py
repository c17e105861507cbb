"""Parity of clmim's ViT with timm's own VisionTransformer, on timm's hub layout.

Each case builds a small timm model of a registered architecture with random weights (every
tensor perturbed), writes it with timm's own `save_for_hf` (config.json with `architecture`,
`pretrained_cfg` and the small `model_args`, plus model.safetensors, as timm's hub repos hold),
loads the directory with clmim and compares every residual state (after each attention and each
MLP residual) and every attention map with timm's forward, at the native grid and at a larger one
(timm resamples the position table when a model is created at another size: `checkpoint_filter_fn`,
bicubic, antialiased). timm is a test-only dependency (see reference_timm.py for its import).
"""
import json
import os

import numpy as np
import pytest

from reference_timm import describe, import_timm, table_from_timm

timm, torch = import_timm()

from clmim.checkpoints import registry, timm_layout  # noqa: E402
from clmim.errors import ClmimError  # noqa: E402
from clmim.models.vit import forward_with_states  # noqa: E402

SMALL = dict(embed_dim=32, depth=2, num_heads=4, patch_size=7, img_size=28)
# One architecture per feature clmim reads from timm's layout.
CASES = {
    "vit_small_patch14_reg4_dinov2": {},  # registers, no_embed_class, layer scale
    "vit_giant_patch14_dinov2": {},  # packed SwiGLU
    "vit_base_patch16_clip_quickgelu_224": {},  # ln_pre, eps 1e-5, QuickGELU, bias-free patch
    "vit_base_patch16_siglip_224": {},  # no cls, attention-pooling head (dropped)
    "vit_base_patch16_224": {"global_pool": "avg", "fc_norm": True},  # MAE-style: no final norm
    "vit_so150m_patch16_reg4_gap_256": {"embed_dim": 48},  # register rows in the position table
}


def _build(arch, image_size=28):
  args = {**SMALL, **CASES[arch], "img_size": image_size}
  torch.manual_seed(0)
  model = timm.create_model(arch, pretrained=False, num_classes=5, **args).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.05 * torch.randn_like(param))
  return model, args


def _save(model, args, tmp_path):
  path = str(tmp_path / "timm_checkpoint")
  timm.models.save_for_hf(model, path, model_args=args, safe_serialization=True)
  return path


def _reference(model, images):
  """timm's residual states (embedding, then after each attention and MLP residual) and
  attention maps, float64 numpy, of NHWC `images`."""
  states, attentions, hooks = [], [], []
  for block in model.blocks:
    block.attn.fused_attn = False  # the explicit softmax path, whose probabilities we capture
    hooks.append(block.register_forward_pre_hook(lambda m, a: states.append(a[0])))
    hooks.append(block.ls1.register_forward_hook(
        lambda m, a, out: states.append(states[-1] + out)))
    hooks.append(block.attn.attn_drop.register_forward_hook(
        lambda m, a, out: attentions.append(out)))
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    final = model.blocks(model.norm_pre(model.patch_drop(model._pos_embed(
        model.patch_embed(pixels)))))
  for hook in hooks:
    hook.remove()
  return [s.double().numpy() for s in states + [final]], [a.double().numpy() for a in attentions]


def _relative(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("arch", sorted(CASES))
# The resampled grid in the full tier: the quick tier keeps the native one of every case.
@pytest.mark.parametrize("image_size", [28, pytest.param(42, marks=pytest.mark.slow)])
def test_every_state_and_attention_matches_timm(tmp_path, arch, image_size):
  model, args = _build(arch)
  path = _save(model, args, tmp_path)
  if image_size != 28:  # timm's way to another resolution: create there, filter the weights
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model, _ = _build(arch, image_size)
    model.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(state, model))
  converted, _ = timm_layout.convert_directory(path, image_size=image_size)
  images = np.random.default_rng(1).normal(size=(2, image_size, image_size, 3)).astype(np.float32)
  states, attentions = _reference(model, images)
  zs, attns = forward_with_states(converted.vit, converted.params, images)
  assert len(zs) == len(states) == 2 * SMALL["depth"] + 1
  for i, (ours, theirs) in enumerate(zip(zs, states)):
    assert _relative(ours, theirs) <= 1e-5, f"state {i}"
  for i, (ours, theirs) in enumerate(zip(attns, attentions)):
    assert _relative(ours, theirs) <= 1e-5, f"attention {i}"


def test_fields_pooling_and_dropped_heads_are_recorded(tmp_path):
  converted, (method, kind) = timm_layout.convert_directory(
      _save(*_build("vit_base_patch16_siglip_224"), tmp_path))
  assert not converted.vit.class_token and (method, kind) == ("siglip", "cl")
  assert converted.info["pooling"] == "map" and converted.info["dropped"]["attn_pool"] > 0
  assert converted.info["dropped"]["head"] == 2
  assert "timm architecture table" in converted.info["architecture_from"]["norm_epsilon"]
  assert converted.info["checkpoint"]["architecture"] == "vit_base_patch16_siglip_224"
  dino, (method, _) = timm_layout.convert_directory(
      _save(*_build("vit_small_patch14_reg4_dinov2"), tmp_path / "d"))
  assert dino.vit.num_registers == 4 and method == "dinov2"
  assert dino.info["preprocessing"]["crop_pct"] == 1.0  # DINOv2's pretrained_cfg, not a default


def test_a_timm_directory_is_a_model_spec(tmp_path):
  path = _save(*_build("vit_base_patch16_clip_quickgelu_224"), tmp_path)
  model = registry.resolve(f"{path}?name=clip_small&image_size=42")
  assert model.name == "clip_small" and model.vit.image_size == 42
  assert model.info["checkpoint"]["layout"] == "timm" and model.family == "cl"
  assert model.preprocessing["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_an_unsupported_architecture_is_named(tmp_path):
  os.makedirs(tmp_path / "eva")
  with open(tmp_path / "eva" / "config.json", "w") as f:
    json.dump({"architecture": "eva02_base_patch14_224", "pretrained_cfg": {}}, f)
  with pytest.raises(ClmimError, match="eva02_base_patch14_224.*not one clmim's ViT expresses"):
    registry.resolve(str(tmp_path / "eva"))


def test_model_args_clmim_does_not_read_are_refused(tmp_path):
  path = _save(*_build("vit_base_patch16_224"), tmp_path)
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config["model_args"]["qk_norm"] = True
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ClmimError, match=r"model_args \['qk_norm'\]"):
    timm_layout.convert_directory(path)


def test_a_timm_spec_names_the_timm_repo():
  from clmim.checkpoints import hf_hub
  assert hf_hub.parse("timm:vit_base_patch16_224.mae") == ("timm/vit_base_patch16_224.mae", "main")
  assert hf_hub.parse("timm:org/model@v2") == ("org/model", "v2")
  with pytest.raises(ClmimError, match="timm:<architecture>.<tag>"):
    hf_hub.parse("timm:a/b/c")


@pytest.mark.slow
def test_the_architecture_table_is_timms():
  """Every row of the shipped table equals what the installed timm builds (and timm has no
  supported architecture the table lacks)."""
  shipped = timm_layout.architectures()
  assert shipped == table_from_timm(), "regenerate with `python tests/reference_timm.py`"


def test_the_table_rows_of_the_tested_cases_are_timms():
  for arch in CASES:
    with torch.device("meta"):
      row = describe(timm.create_model(arch, pretrained=False))
    assert timm_layout.architectures()["architectures"][arch] == row, arch
