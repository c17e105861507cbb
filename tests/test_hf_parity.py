"""Parity of clmim's ViT with transformers' own models, on the Hugging Face layout.

Each case builds a small transformers vision model with random weights (every tensor perturbed,
so biases, layer scales and registers are not their init constants), saves it with
`save_pretrained` (the hub's layout: config.json + model.safetensors), loads the directory with
clmim and compares every residual state and every attention map with transformers' eager
forward (`output_hidden_states`, `output_attentions`), at the native grid and at a resampled
one. transformers is a test-only dependency.
"""
import functools
import json
import os

import jax

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from clmim.analysis import attention_distance, fourier, nmi, runner  # noqa: E402
from clmim.checkpoints import hf_layout, registry  # noqa: E402
from clmim.errors import ClmimError  # noqa: E402
from clmim.models.vit import forward_with_states  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             image_size=28, patch_size=7, attn_implementation="eager")


def _build(kind):
  """(model_type, transformers model) with random weights: one case per supported layout."""
  t = transformers
  cases = {
      "dinov2_registers": lambda: t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(
          **SMALL, num_register_tokens=3)),
      "dinov2_swiglu": lambda: t.Dinov2Model(t.Dinov2Config(**SMALL, use_swiglu_ffn=True)),
      "clip": lambda: t.CLIPVisionModel(t.CLIPVisionConfig(**SMALL)),
      "siglip": lambda: t.SiglipVisionModel(t.SiglipVisionConfig(**SMALL)),
      "mae": lambda: t.ViTMAEModel(t.ViTMAEConfig(**SMALL, mask_ratio=0.0)),
      "ijepa": lambda: t.IJepaModel(t.IJepaConfig(**SMALL)),
      "data2vec": lambda: t.Data2VecVisionModel(t.Data2VecVisionConfig(
          **SMALL, use_relative_position_bias=True)),
      "beit": lambda: t.BeitModel(t.BeitConfig(**SMALL, use_shared_relative_position_bias=True,
                                               use_absolute_position_embeddings=True)),
      "vit": lambda: t.ViTModel(t.ViTConfig(**SMALL), add_pooling_layer=True),
      "dinov3": lambda: t.DINOv3ViTModel(t.DINOv3ViTConfig(**SMALL, num_register_tokens=2)),
      "dinov3_gated": lambda: t.DINOv3ViTModel(t.DINOv3ViTConfig(
          **SMALL, use_gated_mlp=True, hidden_act="silu", rope_theta=50.0)),
  }
  torch.manual_seed(0)
  model = cases[kind]().eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.05 * torch.randn_like(param))
  return model


def _reference(model, kind, images):
  """transformers' hidden states and attentions (float64 numpy) of NHWC `images`."""
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  kwargs = dict(output_hidden_states=True, output_attentions=True)
  if kind not in ("dinov2_registers", "dinov2_swiglu", "dinov3", "dinov3_gated"):
    kwargs["interpolate_pos_encoding"] = True  # (DINOv3's rotary positions need no resampling)
  if kind == "mae":  # keep every patch in order: noise that sorts to the identity
    grid = images.shape[1] // SMALL["patch_size"]
    kwargs["noise"] = torch.arange(grid * grid, dtype=torch.float32)[None].repeat(len(images), 1)
  with torch.no_grad():
    out = model(pixels, **kwargs)
  return ([h.double().numpy() for h in out.hidden_states],
          [a.double().numpy() for a in out.attentions])


def _save(model, tmp_path, kind):
  path = str(tmp_path / kind)
  model.save_pretrained(path)
  return path


def _relative(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


CASES = ["dinov2_registers", "dinov2_swiglu", "clip", "siglip", "mae", "ijepa", "data2vec",
         "beit", "vit", "dinov3", "dinov3_gated"]


@pytest.mark.parametrize("kind", CASES)
# The resampled grid in the full tier: the quick tier keeps the native one of every case.
@pytest.mark.parametrize("image_size", [28, pytest.param(42, marks=pytest.mark.slow)])
def test_every_state_and_attention_matches_transformers(tmp_path, kind, image_size):
  model = _build(kind)
  path = _save(model, tmp_path, kind)
  rel_pos = kind in ("data2vec", "beit")
  if rel_pos and image_size != 28:
    with pytest.raises(ClmimError, match="relative position tables cannot be resampled"):
      hf_layout.convert_directory(path, image_size=image_size)
    return
  converted, _ = hf_layout.convert_directory(path, image_size=image_size)
  images = np.random.default_rng(1).normal(size=(2, image_size, image_size, 3)).astype(np.float32)
  hidden, attentions = _reference(model, kind, images)
  zs, attns = forward_with_states(converted.vit, converted.params, images)
  assert len(attns) == len(attentions) == SMALL["num_hidden_layers"]
  # transformers' hidden_states: the embedding, then each layer's output (= after its MLP).
  assert _relative(zs[0], hidden[0]) <= 1e-5
  for i in range(SMALL["num_hidden_layers"]):
    assert _relative(zs[2 * i + 2], hidden[i + 1]) <= 1e-5, f"layer {i}"
    assert _relative(attns[i], attentions[i]) <= 1e-5, f"attention {i}"


def test_registers_and_pooling_fields_are_read_from_the_file(tmp_path):
  converted, record = hf_layout.convert_directory(
      _save(_build("dinov2_registers"), tmp_path, "dinov2_registers"))
  assert converted.vit.num_registers == 3 and converted.vit.class_token
  assert converted.vit.num_prefix_tokens == 4 and record.method == "dinov2"
  siglip, _ = hf_layout.convert_directory(_save(_build("siglip"), tmp_path, "siglip"))
  assert not siglip.vit.class_token and siglip.vit.num_prefix_tokens == 0
  assert siglip.vit.mlp_activation == "gelu_tanh" and siglip.info["dropped"] == {"head": 11}
  clip, _ = hf_layout.convert_directory(_save(_build("clip"), tmp_path, "clip"))
  assert clip.vit.pre_norm and clip.vit.mlp_activation == "quick_gelu"
  assert clip.vit.norm_epsilon == 1e-5


def test_an_unsupported_model_type_is_named_with_the_supported_ones(tmp_path):
  path = _save(_build("vit"), tmp_path, "vit")
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config["model_type"] = "swin"
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ClmimError, match=r"model_type 'swin' is not a supported.*dinov2.*siglip"):
    registry.resolve(path)


def test_a_directory_without_safetensors_says_what_it_found(tmp_path):
  path = _save(_build("vit"), tmp_path, "vit")
  os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin"))
  with pytest.raises(ClmimError, match=r"no model.safetensors.*pytorch_model.bin"):
    hf_layout.convert_directory(path)


@pytest.mark.parametrize("kind", ["dinov2_registers", "clip", "siglip"])
def test_spatial_analyses_equal_float64_from_the_reference_model(tmp_path, kind):
  """Attention distance, NMI and Fourier of the converted model, streamed through clmim's
  runner, equal a float64 computation from transformers' own attentions and hidden states
  with the cls and register tokens dropped and each attention row renormalised over the patch
  keys (docs/definitions.md, "Token layouts")."""
  from test_metrics import _ref_distance, _ref_fourier, _ref_nmi_entropy
  model = _build(kind)
  converted, _ = hf_layout.convert_directory(_save(model, tmp_path, kind))
  vit, prefix = converted.vit, converted.vit.num_prefix_tokens
  images = np.random.default_rng(2).normal(size=(4, 28, 28, 3)).astype(np.float32)
  hidden, attentions = _reference(model, kind, images)

  def paper_layout(x, axes):  # a zero "cls" in front of the patches: the references drop it
    x = np.take(x, np.arange(prefix, x.shape[axes[0]]), axis=axes[0])
    for axis in axes:
      pad = [(0, 0)] * x.ndim
      pad[axis] = (1, 0)
      x = np.pad(x, pad)
    return x

  attns64 = [paper_layout(np.take(a, np.arange(prefix, a.shape[-1]), axis=-1), (2, 3))
             for a in attentions]
  zs64 = [paper_layout(h, (1,)) for h in hidden]
  forward = functools.partial(forward_with_states, vit)
  analyzer = runner.Analyzer(forward, [attention_distance, nmi, fourier], vit.patch_size,
                             mesh=runner.make_mesh(jax.devices()[:2]), device_batch_size=2,
                             model=vit)
  got = analyzer.run(converted.params, iter([images]), progress=False)
  np.testing.assert_allclose(got["attention_distance"],
                             [_ref_distance(a, vit.patch_size) for a in attns64], rtol=1e-5)
  ref = [_ref_nmi_entropy(a) for a in attns64]
  np.testing.assert_allclose(got["nmi"], [r[0] for r in ref], rtol=1e-5)
  np.testing.assert_allclose(got["attention_entropy"], [r[1] for r in ref], rtol=1e-5)
  # fourier's stages: the embedding, then each block's output = transformers' hidden states.
  np.testing.assert_allclose(got["fourier"], [_ref_fourier(z) for z in zs64], rtol=1e-4,
                             atol=1e-5)
