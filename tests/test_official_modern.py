"""Official files of today's models (DINOv2, iBOT, I-JEPA, OpenAI CLIP / OpenCLIP, SigLIP, BEiT v2)
against reference implementations, offline.

- DINOv2, iBOT, I-JEPA: the file is written in the official layout from a timm model with random
  weights. For DINOv2 the written file is first checked by timm's own converter of official
  DINOv2 files (`checkpoint_filter_fn` must give back the timm model's weights exactly), so the
  test's spelling of the official layout is the one timm reads. iBOT and I-JEPA ViTs are timm
  ViTs under their own container keys.
- CLIP: open_clip's CLIP with random weights, saved as its state dict and as a TorchScript
  archive (the format of OpenAI's releases); the reference is open_clip's image tower.
- SigLIP: transformers' SiglipVisionModel with random weights, written as a big_vision .npz
  (per-block and scanned), following big_vision's parameter names.
Every residual state and attention map is compared to <= 1e-5 relative in float32.
"""
import numpy as np
import pytest

from reference_timm import import_timm

timm, torch = import_timm()

from clmim.checkpoints import modern_files, registry, torch_reader  # noqa: E402
from clmim.errors import ClmimError  # noqa: E402
from clmim.models.vit import forward_with_states  # noqa: E402

SMALL = dict(embed_dim=32, depth=2, num_heads=4, patch_size=7, img_size=28, num_classes=0)


def _perturbed(model):
  torch.manual_seed(0)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.05 * torch.randn_like(param))
  return model.eval()


def _timm(arch, **overrides):
  torch.manual_seed(1)
  return _perturbed(timm.create_model(arch, pretrained=False, **{**SMALL, **overrides}))


def _timm_states(model, images):
  """timm's residual states and attention maps (see test_timm_parity)."""
  from test_timm_parity import _reference
  return _reference(model, images)


def _relative(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _compare(model, states, attentions, images):
  zs, attns = forward_with_states(model.vit, model.params, images)
  assert len(zs) == len(states) and len(attns) == len(attentions)
  for i, (ours, theirs) in enumerate(zip(zs, states)):
    assert _relative(ours, theirs) <= 1e-5, f"state {i}"
  for i, (ours, theirs) in enumerate(zip(attns, attentions)):
    assert _relative(ours, theirs) <= 1e-5, f"attention {i}"


def _images(size, n=2):
  return np.random.default_rng(3).normal(size=(n, size, size, 3)).astype(np.float32)


def _numpy(sd):
  return {k: v.detach().numpy().copy() for k, v in sd.items()}


# --- DINOv2 ------------------------------------------------------------------------------------

def _dinov2_official(model, chunks=0):
  """The official DINOv2 backbone state dict of a timm DINOv2 model (the inverse of timm's
  conversion): pos_embed with the cls row, register_tokens, w12/w3 for SwiGLU, mask_token."""
  sd = {k: v.clone() for k, v in model.state_dict().items()}
  out = {}
  if "reg_token" in sd:  # timm folded the cls position row into cls_token: split one out again
    row = torch.randn_like(sd["cls_token"])
    out["cls_token"] = sd.pop("cls_token") - row
    out["pos_embed"] = torch.cat([row, sd.pop("pos_embed")], dim=1)
    out["register_tokens"] = sd.pop("reg_token")
  out["mask_token"] = torch.zeros(1, sd["cls_token" if "cls_token" in sd else "patch_embed.proj.bias"].shape[-1])
  for key, value in sd.items():
    key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.") \
        if model.blocks[0].mlp.__class__.__name__ == "GluMlp" else key
    if chunks and key.startswith("blocks."):
      index = int(key.split(".")[1])
      key = f"blocks.{index // chunks}.{key[len('blocks.'):]}"
    out[key] = value
  return out


@pytest.mark.parametrize("arch,chunks", [
    ("vit_small_patch14_reg4_dinov2", 0),
    pytest.param("vit_small_patch14_dinov2", 1, marks=pytest.mark.slow),
    pytest.param("vit_giant_patch14_dinov2", 0, marks=pytest.mark.slow)])
def test_dinov2_official_file(tmp_path, arch, chunks):
  model = _timm(arch)
  official = _dinov2_official(model, chunks)
  if not chunks:  # timm's converter of official files reads this file as exactly the model
    back = timm.models.vision_transformer.checkpoint_filter_fn(dict(official), model)
    assert set(back) == set(model.state_dict())
    for key, value in model.state_dict().items():
      torch.testing.assert_close(back[key], value, rtol=0, atol=1e-7)
  path = str(tmp_path / "dinov2.pth")
  torch.save(official, path)
  loaded = registry.resolve(f"{path}?num_heads=4")  # the layout is detected
  assert loaded.info["method"] == "dinov2" and loaded.info["dropped"] == {"mask_token": 1}
  states, attentions = _timm_states(model, _images(28))
  _compare(loaded, states, attentions, _images(28))


@pytest.mark.parametrize("arch", ["vit_small_patch14_reg4_dinov2", "vit_small_patch14_dinov2"])
def test_dinov2_resamples_as_its_own_code(tmp_path, arch):
  """DINOv2's interpolate_pos_encoding: released models without registers call bicubic with
  scale_factor (g' + 0.1) / g; with registers, size=g' and antialias."""
  model = _timm(arch)
  official = _dinov2_official(model)
  path = str(tmp_path / "dinov2.pth")
  torch.save(official, path)
  loaded = registry.resolve(f"dinov2:{path}?image_size=42&num_heads=4")
  pos = official["pos_embed"]
  patches = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
  if "register_tokens" in official:
    new = torch.nn.functional.interpolate(patches, size=(6, 6), mode="bicubic",
                                          align_corners=False, antialias=True)
  else:
    new = torch.nn.functional.interpolate(patches, scale_factor=(6.1 / 4, 6.1 / 4),
                                          mode="bicubic", align_corners=False)
  want = torch.cat([pos[:, :1], new.permute(0, 2, 3, 1).reshape(1, 36, -1)], dim=1)
  assert _relative(loaded.params["pos_embed"], want.numpy().astype(np.float64)) <= 1e-6


# --- iBOT and I-JEPA ---------------------------------------------------------------------------

@pytest.mark.parametrize("container", ["state_dict",
                                       pytest.param("teacher", marks=pytest.mark.slow)])
def test_ibot_official_file(tmp_path, container):
  model = _timm("vit_small_patch16_224")
  sd = model.state_dict()
  width = SMALL["embed_dim"]
  if container == "state_dict":  # checkpoint_teacher.pth
    ckpt = {"state_dict": {**sd, "masked_embed": torch.zeros(1, width)}}
  else:  # a full training checkpoint
    backbone = {f"backbone.{k}": v for k, v in sd.items()}
    ckpt = {"teacher": {**backbone, "backbone.masked_embed": torch.zeros(1, width),
                        "head.last_layer.weight": torch.zeros(8, width)},
            "student": {f"module.{k}": v for k, v in backbone.items()}, "epoch": 3}
  path = str(tmp_path / "ibot.pth")
  torch.save(ckpt, path)
  loaded = registry.resolve(f"{path}?num_heads=4")
  assert loaded.info["method"] == "ibot" and "masked_embed" in loaded.info["dropped"]
  _compare(loaded, *_timm_states(model, _images(28)), _images(28))


def test_ijepa_official_file(tmp_path):
  model = _timm("vit_base_patch16_224", class_token=False, global_pool="avg", fc_norm=False)
  sd = {f"module.{k}": v for k, v in model.state_dict().items()}
  ckpt = {"encoder": dict(sd), "target_encoder": sd,
          "predictor": {"module.predictor_embed.weight": torch.zeros(4, 32)}, "epoch": 300,
          "loss": 0.1, "batch_size": 16}
  path = str(tmp_path / "ijepa.pth.tar")
  torch.save(ckpt, path)
  loaded = registry.resolve(f"{path}?num_heads=4")
  assert loaded.info["method"] == "ijepa" and not loaded.vit.class_token
  assert loaded.info["checkpoint"]["part"] == "target_encoder"
  assert loaded.info["dropped"] == {"encoder": len(sd), "predictor": 1}
  _compare(loaded, *_timm_states(model, _images(28)), _images(28))
  with pytest.raises(ClmimError, match="part='student'"):
    registry.resolve(f"{path}?num_heads=4&part=student")


def test_a_width_that_is_not_a_published_size_asks_for_num_heads(tmp_path):
  model = _timm("vit_base_patch16_224", class_token=False, global_pool="avg", fc_norm=False)
  sd = {f"module.{k}": v for k, v in model.state_dict().items()}
  path = str(tmp_path / "ijepa.pth.tar")
  torch.save({"encoder": sd, "target_encoder": sd, "predictor": {}}, path)
  with pytest.raises(ClmimError, match=r"width 32 is not a published ijepa size.*\?num_heads=N"):
    registry.resolve(path)


# --- CLIP --------------------------------------------------------------------------------------

def _open_clip(quick_gelu=True):
  open_clip = pytest.importorskip("open_clip")
  torch.manual_seed(2)
  model = open_clip.model.CLIP(
      embed_dim=16, vision_cfg=dict(layers=2, width=128, patch_size=7, image_size=28),
      text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1),
      quick_gelu=quick_gelu)
  return _perturbed(model)


def _open_clip_states(visual, images):
  """open_clip's residual states and attention maps (the weights recomputed by each block's
  own nn.MultiheadAttention with need_weights=True, from its ln_1 output)."""
  states, attentions, final, hooks = [], [], [], []
  for block in visual.transformer.resblocks:
    hooks.append(block.register_forward_pre_hook(lambda m, a: states.append(a[0])))
    hooks.append(block.ls_1.register_forward_hook(
        lambda m, a, out: states.append(states[-1] + out)))

    def weights(module, args, out, block=block):
      attentions.append(block.attn(out, out, out, need_weights=True,
                                   average_attn_weights=False)[1])
    hooks.append(block.ln_1.register_forward_hook(weights))
  hooks.append(visual.transformer.resblocks[-1].register_forward_hook(
      lambda m, a, out: final.append(out)))
  with torch.no_grad():
    visual(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  for hook in hooks:
    hook.remove()
  return ([s.double().numpy() for s in states + final],
          [a.double().numpy() for a in attentions])


@pytest.mark.parametrize("quick_gelu", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_clip_state_dict(tmp_path, quick_gelu):
  model = _open_clip(quick_gelu)
  path = str(tmp_path / "open_clip_pytorch_model.bin")
  torch.save(model.state_dict(), path)
  with pytest.raises(ClmimError, match="does not say its activation"):
    registry.resolve(f"clip:{path}")
  act = "quick_gelu" if quick_gelu else "gelu"
  loaded = registry.resolve(f"clip:{path}?mlp_activation={act}")
  assert loaded.vit.num_heads == 2 and loaded.vit.pre_norm and loaded.vit.norm_epsilon == 1e-5
  assert loaded.info["dropped"]["projection"] == 1 and loaded.info["dropped"]["text_tower"] > 0
  _compare(loaded, *_open_clip_states(model.visual, _images(28)), _images(28))


def test_clip_torchscript_archive(tmp_path):
  """OpenAI published TorchScript archives; they are read as data, with QuickGELU."""
  model = _open_clip(True)
  path = str(tmp_path / "ViT-tiny.pt")
  torch.jit.save(torch.jit.script(model), path)
  loaded = registry.resolve(path)  # detected: a TorchScript CLIP
  assert loaded.info["checkpoint"]["format"] == "TorchScript archive"
  assert loaded.vit.mlp_activation == "quick_gelu" and loaded.info["method"] == "clip"
  _compare(loaded, *_open_clip_states(model.visual, _images(28)), _images(28))


# --- SigLIP (big_vision .npz) -------------------------------------------------------------------

def _siglip_npz(tmp_path, scanned):
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(4)
  model = _perturbed(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
      image_size=28, patch_size=7, attn_implementation="eager")))
  sd = _numpy(model.state_dict())
  heads, width = 4, 32
  root, out = "params/img/", {}
  out[root + "embedding/kernel"] = sd["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0)
  out[root + "embedding/bias"] = sd["embeddings.patch_embedding.bias"]
  out[root + "pos_embedding"] = sd["embeddings.position_embedding.weight"][None]
  blocks = []
  for i in range(2):
    p = f"encoder.layers.{i}."
    b = {}
    for name, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      b[f"MultiHeadDotProductAttention_0/{name}/kernel"] = \
          sd[p + f"self_attn.{ours}.weight"].T.reshape(width, heads, width // heads)
      b[f"MultiHeadDotProductAttention_0/{name}/bias"] = \
          sd[p + f"self_attn.{ours}.bias"].reshape(heads, width // heads)
    b["MultiHeadDotProductAttention_0/out/kernel"] = \
        sd[p + "self_attn.out_proj.weight"].T.reshape(heads, width // heads, width)
    b["MultiHeadDotProductAttention_0/out/bias"] = sd[p + "self_attn.out_proj.bias"]
    for theirs, ours in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
      b[f"{theirs}/scale"], b[f"{theirs}/bias"] = sd[p + ours + ".weight"], sd[p + ours + ".bias"]
    for theirs, ours in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
      b[f"MlpBlock_0/{theirs}/kernel"] = sd[p + f"mlp.{ours}.weight"].T
      b[f"MlpBlock_0/{theirs}/bias"] = sd[p + f"mlp.{ours}.bias"]
    blocks.append(b)
  if scanned:
    for key in blocks[0]:
      out[root + "Transformer/encoderblock/" + key] = np.stack([b[key] for b in blocks])
  else:
    for i, b in enumerate(blocks):
      out.update({root + f"Transformer/encoderblock_{i}/" + k: v for k, v in b.items()})
  out[root + "Transformer/encoder_norm/scale"] = sd["post_layernorm.weight"]
  out[root + "Transformer/encoder_norm/bias"] = sd["post_layernorm.bias"]
  out[root + "MAPHead_0/probe"] = np.zeros((1, 1, width), np.float32)
  out["params/txt/Embed_0/embedding"] = np.zeros((10, width), np.float32)
  out["params/t"] = np.zeros((1,), np.float32)
  path = str(tmp_path / f"siglip_{'scanned' if scanned else 'blocks'}.npz")
  np.savez(path, **out)
  return model, path


@pytest.mark.parametrize("scanned", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_siglip_big_vision_npz(tmp_path, scanned):
  model, path = _siglip_npz(tmp_path, scanned)
  loaded = registry.resolve(path)
  assert loaded.info["method"] == "siglip" and loaded.vit.num_heads == 4
  assert loaded.info["architecture_from"]["num_heads"] == "file (attention kernels)"
  images = _images(28)
  with torch.no_grad():
    out = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), output_hidden_states=True,
                output_attentions=True)
  zs, attns = forward_with_states(loaded.vit, loaded.params, images)
  assert _relative(zs[0], out.hidden_states[0].double().numpy()) <= 1e-5
  for i in range(2):
    assert _relative(zs[2 * i + 2], out.hidden_states[i + 1].double().numpy()) <= 1e-5
    assert _relative(attns[i], out.attentions[i].double().numpy()) <= 1e-5


def test_detection_and_a_wrong_layout_prefix(tmp_path):
  sd = _timm("vit_small_patch16_224").state_dict()
  path = str(tmp_path / "plain.pth")
  torch.save(dict(sd), path)
  assert modern_files.detect(torch_reader.load(path)) is None  # a plain timm file stays DINO v1
  with pytest.raises(ClmimError, match="not a siglip checkpoint"):
    registry.resolve(f"siglip:{path}")
