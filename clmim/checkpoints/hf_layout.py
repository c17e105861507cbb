"""The Hugging Face transformers layout: `config.json` + `model.safetensors` (+ preprocessing).

Today's self-supervised ViTs are published mostly this way: `facebook/dinov2-base`,
`facebook/dinov2-with-registers-base`, `openai/clip-vit-base-patch16`,
`google/siglip-base-patch16-224`, `facebook/vit-mae-base`, `facebook/ijepa_vith14_1k`,
`facebook/data2vec-vision-base`, `microsoft/beit-base-patch16-224-pt22k`, and DINO v1 as `vit`.
`config.json`'s `model_type` names the family (`MODEL_TYPES`); the tensors are renamed to the
timm names the other converters read (q, k and v fused into one qkv projection, the BEiT-style
key without a bias kept as q_bias / v_bias), and the architecture comes from the tensor shapes
plus the few facts only the config holds (heads, LayerNorm epsilon, activation) -- with the
transformers class defaults where a saved config leaves them out, as `save_pretrained` does.

Not converted (reported in `info["dropped"]`): text towers and projections of CLIP / SigLIP,
SigLIP's attention-pooling head, MAE's decoder, BEiT's lm_head, ViT's pooler dense layer.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from clmim.checkpoints import converters, native, torch_reader
from clmim.errors import ClmimError
from clmim.models import resample
from clmim.models.vit import ViT

CONFIG, WEIGHTS, WEIGHTS_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
PREPROCESSOR = "preprocessor_config.json"


@dataclasses.dataclass(frozen=True)
class HfType:
  """One transformers `model_type`.

  Attributes:
    method: the training method recorded in results ("dinov2", "clip", ...).
    kind: "cl", "mim" or "other" (how figures colour it; "other" for hybrids / supervised).
    style: "vit" (embeddings.patch_embeddings.projection, encoder.layer.N.attention.attention.*),
      "clip" (embeddings.patch_embedding, encoder.layers.N.self_attn.*) or "dinov3"
      (embeddings.patch_embeddings, layer.N.attention.{q,k,v,o}_proj, rotary positions).
    defaults: the transformers config class defaults of the fields clmim reads.
    tower: the vision sub-config of a two-tower config ("vision_config"), else None.
    antialias: whether its position-table resampling antialiases (transformers' DINOv2 with
      registers does; the other transformers ViTs do not).
  """
  method: str
  kind: str
  style: str
  defaults: dict
  tower: Optional[str] = None
  antialias: bool = False


_VIT = {"num_attention_heads": 12, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
_DINOV2 = {"num_attention_heads": 12, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
_CLIP = {"num_attention_heads": 12, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"}
_SIGLIP = {"num_attention_heads": 12, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}
_DINOV3 = {"num_attention_heads": 6, "layer_norm_eps": 1e-5, "hidden_act": "gelu",
           "rope_theta": 100.0, "image_size": 224}

MODEL_TYPES = {
    "dinov2": HfType("dinov2", "other", "vit", _DINOV2),
    "dinov2_with_registers": HfType("dinov2", "other", "vit", _DINOV2, antialias=True),
    "vit_mae": HfType("mae", "mim", "vit", _VIT),
    "ijepa": HfType("ijepa", "mim", "vit", _VIT),
    "data2vec-vision": HfType("data2vec", "mim", "vit", _VIT),
    "beit": HfType("beit", "mim", "vit", _VIT),
    "vit": HfType("vit", "other", "vit", _VIT),
    "clip_vision_model": HfType("clip", "cl", "clip", _CLIP),
    "clip": HfType("clip", "cl", "clip", _CLIP, tower="vision_config"),
    "siglip_vision_model": HfType("siglip", "cl", "clip", _SIGLIP),
    "siglip": HfType("siglip", "cl", "clip", _SIGLIP, tower="vision_config"),
    "dinov3_vit": HfType("dinov3", "other", "dinov3", _DINOV3),
}

# transformers' hidden_act -> clmim's mlp_activation.
_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "quick_gelu": "quick_gelu"}
# Where the patch projection sits, per style: what fixes the encoder's key prefix.
_ANCHORS = {"vit": "embeddings.patch_embeddings.projection.weight",
            "clip": "embeddings.patch_embedding.weight",
            "dinov3": "embeddings.patch_embeddings.weight"}
_QKV = {"vit": ("attention.attention.query", "attention.attention.key",
                "attention.attention.value"),
        "clip": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "dinov3": ("attention.q_proj", "attention.k_proj", "attention.v_proj")}


def is_directory(path: str) -> bool:
  """Does `path` hold a transformers checkpoint (config.json beside safetensors weights)?"""
  return os.path.isfile(os.path.join(path, CONFIG)) and any(
      os.path.isfile(os.path.join(path, f)) for f in (WEIGHTS, WEIGHTS_INDEX))


def read_json(file: str):
  """A JSON file's content; one error naming the file when it is not readable JSON."""
  try:
    with open(file) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ClmimError(f"{file}: not a readable JSON config ({e}).") from None


def read_config(path: str) -> tuple[dict, HfType, str]:
  """(the vision config, its record, config.json's model_type) from a directory's
  config.json; one error for an unsupported model_type, naming it and listing the supported
  ones."""
  file = os.path.join(path, CONFIG)
  config = read_json(file)
  model_type = config.get("model_type") if isinstance(config, dict) else None
  if model_type not in MODEL_TYPES:
    raise ClmimError(f"{file}: model_type {model_type!r} is not a supported transformers "
                     f"layout (supported: {', '.join(sorted(MODEL_TYPES))}; a timm checkpoint's "
                     f"config.json names its 'architecture' instead).")
  record = MODEL_TYPES[model_type]
  if record.tower:
    config = dict(config.get(record.tower) or {})
  return {**record.defaults, **config}, record, model_type


def weight_files(path: str) -> list[str]:
  """The safetensors files of a directory (one, or the shards its index names)."""
  single = os.path.join(path, WEIGHTS)
  if os.path.isfile(single):
    return [single]
  index = os.path.join(path, WEIGHTS_INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f).get("weight_map", {}).values()))
    return [os.path.join(path, shard) for shard in shards]
  found = sorted(os.listdir(path)) if os.path.isdir(path) else []
  raise ClmimError(f"{path}: no {WEIGHTS} (or {WEIGHTS_INDEX}) -- clmim reads transformers "
                   f"checkpoints as safetensors only; found {found[:12]}.")


def _fuse(tensors: dict, names: tuple, source: str) -> dict:
  """q, k and v of one attention layer (their tensors popped from `tensors`) as timm's fused
  qkv (+ BEiT's q_bias / v_bias)."""
  q, k, v = names
  out = {"attn.qkv.weight": np.concatenate([tensors.pop(f"{n}.weight") for n in (q, k, v)])}
  biases = [f"{n}.bias" in tensors for n in (q, k, v)]
  if all(biases):
    out["attn.qkv.bias"] = np.concatenate([tensors.pop(f"{n}.bias") for n in (q, k, v)])
  elif biases == [True, False, True]:  # BEiT / data2vec: the key has no bias
    out["attn.q_bias"], out["attn.v_bias"] = tensors.pop(f"{q}.bias"), tensors.pop(f"{v}.bias")
  else:
    raise ClmimError(f"{source}: q/k/v biases {biases} are neither all present nor "
                     f"BEiT's (q and v only).")
  return out


# Per-block renames (transformers suffix -> timm suffix), both styles and every naming of
# layer scale (DINOv2's layer_scale{1,2}.lambda1, BEiT / data2vec's lambda_{1,2}).
_BLOCK_RENAMES = {
    "attention.output.dense.": "attn.proj.", "self_attn.out_proj.": "attn.proj.",
    "layernorm_before.": "norm1.", "layernorm_after.": "norm2.", "layer_norm1.": "norm1.",
    "layer_norm2.": "norm2.", "norm1.": "norm1.", "norm2.": "norm2.",
    "intermediate.dense.": "mlp.fc1.", "output.dense.": "mlp.fc2.", "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.", "mlp.weights_in.": "mlp.fc1.", "mlp.weights_out.": "mlp.fc2.",
    "layer_scale1.lambda1": "gamma_1", "layer_scale2.lambda1": "gamma_2",
    "lambda_1": "gamma_1", "lambda_2": "gamma_2",
    "attention.o_proj.": "attn.proj.", "mlp.up_proj.": "mlp.fc1.", "mlp.down_proj.": "mlp.fc2.",
    "attention.attention.relative_position_bias.": "attn.",
}
_TOP_RENAMES = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.projection.": "patch_embed.proj.",
    "embeddings.patch_embedding.": "patch_embed.proj.",
    "embeddings.patch_embeddings.": "patch_embed.proj.",  # DINOv3 (after the more specific)
    "norm.": "norm.",
    "pre_layrnorm.": "norm_pre.", "post_layernorm.": "norm.", "layernorm.": "norm.",
    "pooler.layernorm.": "norm.",
    "encoder.relative_position_bias.": "rel_pos_bias.",
}


# Inside the vision model but not the analysed encoder: SigLIP's attention-pooling head, ViT's
# pooler, the mask token of masked-image pretraining (kept out of the analysed states).
_NOT_ENCODER = ("head.", "pooler.dense.", "embeddings.mask_token")


def to_timm_names(tensors: dict, style: str, source: str) -> tuple[dict, dict]:
  """(encoder tensors under timm names, {dropped group: tensor count}).

  Tensors outside the vision encoder (text tower, projections, decoders, heads) are dropped
  by group; inside it, a tensor no rule maps is an error naming it."""
  anchors = [k for k in tensors if k.endswith(_ANCHORS[style])]
  if len(anchors) != 1:
    raise ClmimError(f"{source}: expected one {_ANCHORS[style]!r} (the patch embedding of a "
                     f"{style}-style transformers ViT), found {len(anchors)}.")
  prefix = anchors[0][:-len(_ANCHORS[style])]
  rest, dropped = {}, {}
  for key, value in tensors.items():
    if key.startswith(prefix) and not key[len(prefix):].startswith(_NOT_ENCODER):
      rest[key[len(prefix):]] = value
    else:
      tail = key[len(prefix):] if key.startswith(prefix) else key
      group = "mask_token" if tail.endswith("mask_token") else tail.split(".")[0]
      dropped[group] = dropped.get(group, 0) + 1
  out = {}
  if "embeddings.class_embedding" in rest:  # CLIP: a [D] vector
    out["cls_token"] = rest.pop("embeddings.class_embedding").reshape(1, 1, -1)
  if "embeddings.position_embedding.weight" in rest:  # CLIP / SigLIP: an nn.Embedding
    out["pos_embed"] = rest.pop("embeddings.position_embedding.weight")[None]
  if style == "clip" and "embeddings.patch_embedding.bias" not in rest:
    # OpenAI CLIP's patch projection has no bias: an explicit zero bias is the same function.
    width = rest["embeddings.patch_embedding.weight"].shape[0]
    out["patch_embed.proj.bias"] = np.zeros((width,), np.float32)
  blocks = re.compile(r"(?:encoder\.)?layers?\.(\d+)\.(.+)")
  by_block: dict = {}
  for key in list(rest):
    match = blocks.fullmatch(key)
    if match:
      by_block.setdefault(int(match.group(1)), {})[match.group(2)] = rest.pop(key)
  for i, block in by_block.items():
    out.update({f"blocks.{i}.{k}": v for k, v in _fuse(block, _QKV[style],
                                                       f"{source}: layer {i}").items()})
    if "mlp.gate_proj.weight" in block:  # DINOv3's gated MLP: gate first, as clmim's swiglu fc1
      for part in ("weight", "bias"):
        if f"mlp.gate_proj.{part}" in block:
          out[f"blocks.{i}.mlp.fc1.{part}"] = np.concatenate(
              [block.pop(f"mlp.gate_proj.{part}"), block.pop(f"mlp.up_proj.{part}")])
    for key, value in block.items():
      new = next((key.replace(old, new, 1) for old, new in _BLOCK_RENAMES.items()
                  if key.startswith(old)), None)
      if new is None:
        raise ClmimError(f"{source}: layer {i} has a tensor clmim cannot place: {key!r}.")
      out[f"blocks.{i}.{new}"] = value
  for key, value in rest.items():
    new = next((key.replace(old, new, 1) for old, new in _TOP_RENAMES.items()
                if key.startswith(old)), None)
    if new is None:
      raise ClmimError(f"{source}: the encoder has a tensor clmim cannot place: {key!r}.")
    out[new] = value
  if "reg_token" in out and out["reg_token"].shape[1] == 0:
    del out["reg_token"]  # DINOv3 saves an empty [1, 0, D] table when it has no registers
  return out, dropped


def architecture(enc: dict, config: dict, source: str) -> tuple[dict, dict]:
  """(ViT fields, where each came from) from timm-named tensors and the vision config."""
  def need(key):
    if key not in enc:
      raise ClmimError(f"{source}: the encoder lacks {key!r}, needed to infer the architecture.")
    return enc[key].shape

  width, chans, patch, patch_w = need("patch_embed.proj.weight")
  if chans != 3 or patch != patch_w:
    raise ClmimError(f"{source}: the patch projection has shape {(width, chans, patch, patch_w)}, "
                     f"expected [D, 3, p, p].")
  depth = len({int(m.group(1)) for k in enc for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
  swiglu = enc.get("blocks.0.mlp.fc2.weight") is not None and \
      need("blocks.0.mlp.fc1.weight")[0] == 2 * need("blocks.0.mlp.fc2.weight")[1]
  act = config.get("hidden_act")
  if not swiglu and act not in _ACTIVATIONS:
    raise ClmimError(f"{source}: hidden_act {act!r} is not supported (supported: "
                     f"{', '.join(sorted(_ACTIVATIONS))}).")
  fields = dict(
      width=width, depth=depth, patch_size=patch,
      mlp_dim=need("blocks.0.mlp.fc2.weight")[1],
      num_heads=int(config["num_attention_heads"]),
      block_style="beit" if "blocks.0.attn.q_bias" in enc else "timm",
      layer_scale_init=1.0 if "blocks.0.gamma_1" in enc else None,
      class_token="cls_token" in enc,
      num_registers=enc["reg_token"].shape[1] if "reg_token" in enc else 0,
      norm_epsilon=float(config["layer_norm_eps"]), pre_norm="norm_pre.weight" in enc,
      mlp_activation="swiglu" if swiglu else _ACTIVATIONS[act],
      position_embedding="learned" if "pos_embed" in enc else "none", rel_pos_bias="none",
      final_norm="norm.weight" in enc,
      rope_theta=float(config["rope_theta"]) if config.get("rope_theta") else None)
  if swiglu and config.get("use_gated_mlp") and act != "silu":
    raise ClmimError(f"{source}: a gated MLP with hidden_act {act!r}: clmim's gated MLP is "
                     f"SwiGLU (silu).")
  origin = {k: "file (tensor shapes)" for k in fields}
  origin.update(num_heads="config.json (num_attention_heads)",
                norm_epsilon="config.json (layer_norm_eps)",
                mlp_activation="file (mlp shapes)" if swiglu else "config.json (hidden_act)")
  if fields["rope_theta"]:
    origin["rope_theta"] = "config.json (rope_theta)"
  if "pos_embed" in enc:
    tokens = enc["pos_embed"].shape[1] - int(fields["class_token"])
    grid = int(round(np.sqrt(tokens)))
    if grid * grid != tokens:
      raise ClmimError(f"{source}: the position table has {tokens} patch rows, not a square grid.")
    origin["image_size"] = "file (position table)"
  tables = [k for k in ("rel_pos_bias.relative_position_bias_table",
                        "blocks.0.attn.relative_position_bias_table") if k in enc]
  if tables:
    fields["rel_pos_bias"] = "shared" if tables[0].startswith("rel_pos_bias") else "per_block"
    rows = enc[tables[0]].shape[0]
    grid = int(round((np.sqrt(rows - 3) + 1) / 2))
    origin["image_size"] = f"file ({tables[0]})"
  if "image_size" not in origin:
    grid = int(config.get("image_size", 224)) // patch
    origin["image_size"] = "config.json (image_size)"
  fields["image_size"] = grid * patch
  if width % fields["num_heads"]:
    raise ClmimError(f"{source}: width {width} is not divisible by {fields['num_heads']} heads "
                     f"(config.json num_attention_heads).")
  return fields, origin


_PIL_FILTERS = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos"}


def preprocessing(path: str, image_size: int) -> tuple[dict, list]:
  """(eval preprocessing, notes) from preprocessor_config.json: resize + centre crop as the
  model's authors published them; timm's ImageNet defaults when the file is absent."""
  file = os.path.join(path, PREPROCESSOR)
  if not os.path.isfile(file):
    return ({"mean": "imagenet", "std": "imagenet", "interpolation": "bicubic",
             "crop_pct": 0.875}, [f"no {PREPROCESSOR}: timm's ImageNet eval defaults"])
  with open(file) as f:
    pp = json.load(f)
  notes = []
  size, crop = pp.get("size") or {}, pp.get("crop_size") or {}
  shorter = size.get("shortest_edge") if isinstance(size, dict) else size
  if pp.get("do_center_crop", True) and shorter and crop:
    crop_side = crop.get("height", image_size) if isinstance(crop, dict) else crop
    crop_pct = float(crop_side) / float(shorter)
  else:
    crop_pct = 1.0
    notes.append("the model resizes to a square without cropping; clmim resizes the shorter "
                 "side and centre-crops (the same for square images)")
  mean, std = pp.get("image_mean"), pp.get("image_std")
  return ({"mean": [float(m) for m in mean] if mean else "imagenet",
           "std": [float(s) for s in std] if std else "imagenet",
           "interpolation": _PIL_FILTERS.get(pp.get("resample", 3), "bicubic"),
           "crop_pct": min(crop_pct, 1.0)}, notes)


def resample_table(enc: dict, fields: dict, origin: dict, image_size: int, antialias: bool,
                   source: str, who: str = "transformers", offset: float = 0.0) -> None:
  """Resamples the position table to `image_size` as `who`'s loading code does (bicubic,
  align_corners=False, antialiased or not, by size or by a scale factor stretched by `offset`
  as that code does: see resample.resample_grid), in place."""
  patch = fields["patch_size"]
  if image_size % patch:
    raise ClmimError(f"{source}: image_size {image_size} is not a multiple of the patch size "
                     f"{patch}.")
  if image_size == fields["image_size"]:
    return
  if fields["rel_pos_bias"] != "none":
    raise ClmimError(f"{source}: image_size={image_size} differs from the model's "
                     f"{fields['image_size']} px, and its relative position tables cannot be "
                     f"resampled by clmim; leave image_size out.")
  if "pos_embed" in enc:
    table, cls = enc["pos_embed"][0], int(fields["class_token"])
    patches = resample.resample_grid(np.asarray(table[cls:], np.float32), image_size // patch,
                                     antialias=antialias, offset=offset)
    enc["pos_embed"] = np.concatenate([table[:cls], patches])[None].astype(np.float32)
    origin["image_size"] = (f"user (image_size={image_size}; position table resampled bicubic"
                            f"{', antialiased,' if antialias else ''}"
                            f"{f' with scale factor (g + {offset}) / g' if offset else ''} from "
                            f"{fields['image_size']} px, as {who} does)")
  else:
    origin["image_size"] = f"user (image_size={image_size})"
  fields["image_size"] = image_size


def build(enc: dict, fields: dict, source: str) -> tuple[ViT, dict]:
  """(the ViT, its param tree) from timm-named encoder tensors and the inferred fields, every
  tensor accounted for and every parameter's shape checked."""
  vit = ViT(**fields)
  vit.check_fields()
  params = converters.encoder_params(enc, fields, source)
  images = jax.ShapeDtypeStruct((1, vit.image_size, vit.image_size, 3), jnp.float32)
  expected = jax.eval_shape(lambda x: vit.init(jax.random.PRNGKey(0), x), images)["params"]
  native.check_params(expected, params, source)
  return vit, params


def num_params(params: dict) -> int:
  return int(sum(np.size(v) for v in jax.tree.leaves(params)))


def convert_directory(path: str, image_size: Optional[int] = None,
                      num_heads: Optional[int] = None):
  """A transformers checkpoint directory -> `converters.Converted` (encoder only)."""
  config, record, model_type = read_config(path)
  if num_heads:
    config["num_attention_heads"] = int(num_heads)
  tensors = {}
  for file in weight_files(path):
    tensors.update(torch_reader.load_safetensors(file))
  enc, dropped = to_timm_names(tensors, record.style, path)
  fields, origin = architecture(enc, config, path)
  if num_heads:
    origin["num_heads"] = f"user (num_heads={num_heads})"
  if image_size:
    resample_table(enc, fields, origin, int(image_size), record.antialias, path)
  vit, params = build(enc, fields, path)
  pre, notes = preprocessing(path, vit.image_size)
  info = {"architecture": dict(fields), "architecture_from": origin, "dropped": dropped,
          "checkpoint": {"layout": "transformers", "model_type": model_type},
          "preprocessing": pre, "num_params": num_params(params)}
  if notes:
    info["preprocessing_notes"] = notes
  return converters.Converted(family=record.method, vit=vit, params=params, heads={},
                              info=info), record

