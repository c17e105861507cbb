"""The timm hub layout: `config.json` (`architecture`, `pretrained_cfg`) + `model.safetensors`.

timm publishes converted weights of most of today's ViTs under `timm/<architecture>.<tag>`
(`timm/vit_base_patch14_reg4_dinov2.lvd142m`, `timm/vit_base_patch16_clip_224.openai`,
`timm/vit_base_patch16_siglip_224.webli`, `timm/vit_base_patch16_224.mae`, ...). The tensors
already carry timm's names, the ones clmim's converters read; what the files leave out (the
head count, the LayerNorm epsilon, the activation, whether the position table covers the cls
token) is a property of the architecture name, read from `timm_architectures.json` -- a table
generated from timm's own model registry (tests/reference_timm.py rewrites it, and a test checks
it against the installed timm) -- never guessed from the name's spelling. Preprocessing (mean,
std, interpolation, crop) comes from the file's `pretrained_cfg`.

Conversion details (each exact, so the converted model computes the same function):
- no_embed_class architectures (DINOv2 with registers, some SigLIP / "reg" models) add the
  position table to the patches only: the cls token gets a zero row in clmim's table;
- a position table that also covers register tokens has those rows folded into the register
  tokens (clmim adds registers after the position embedding);
- a Linear or patch projection saved without a bias gets an explicit zero bias;
- classifier heads, `fc_norm` (applied after pooling) and the attention-pooling head of "map"
  models are dropped and counted in `info["dropped"]`.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Optional

import numpy as np

from clmim.checkpoints import converters, hf_layout, torch_reader
from clmim.errors import ClmimError

CONFIG, WEIGHTS = hf_layout.CONFIG, hf_layout.WEIGHTS
TABLE = os.path.join(os.path.dirname(__file__), "timm_architectures.json")

# Outside the analysed encoder: classifier, post-pool norm, attention-pooling head.
_NOT_ENCODER = ("head.", "fc_norm.", "attn_pool.", "mask_token")
# The model_args a saved config may carry that clmim reads from the tensors or ignores safely.
_HARMLESS_ARGS = {"img_size", "num_classes", "global_pool", "dynamic_img_size", "embed_dim",
                  "depth", "patch_size", "mlp_ratio", "class_token", "reg_tokens",
                  "pre_norm", "fc_norm", "init_values", "qkv_bias", "num_heads",
                  "no_embed_class", "final_norm", "in_chans"}


@functools.lru_cache(maxsize=1)
def architectures() -> dict:
  """{"timm_version": ..., "architectures": {name: row}} (rows: num_heads, norm_epsilon,
  mlp_activation, no_embed_class, global_pool)."""
  with open(TABLE) as f:
    return json.load(f)


def is_timm_config(config) -> bool:
  """Is a parsed config.json timm's (an `architecture`, no transformers `model_type`)?"""
  return isinstance(config, dict) and "architecture" in config and "model_type" not in config


def read_config(path: str) -> tuple[dict, dict]:
  """(config.json, the architecture's table row with `model_args` applied); one error for an
  architecture clmim's ViT cannot express, naming it."""
  file = os.path.join(path, CONFIG)
  config = hf_layout.read_json(file)
  if not is_timm_config(config):
    raise ClmimError(f"{file}: not a timm config (no 'architecture' key).")
  name = config["architecture"]
  table = architectures()
  if name not in table["architectures"]:
    families = sorted({re.sub(r"_\d+$", "", a.split("_patch")[-1].split("_", 1)[-1])
                       for a in table["architectures"]} - {""})
    raise ClmimError(f"{file}: timm architecture {name!r} is not one clmim's ViT expresses "
                     f"(the {len(table['architectures'])} supported vit_* architectures of timm "
                     f"{table['timm_version']} are listed in clmim/checkpoints/"
                     f"timm_architectures.json; variants such as {', '.join(families[:8])}).")
  row = dict(table["architectures"][name])
  args = config.get("model_args") or {}
  unknown = sorted(set(args) - _HARMLESS_ARGS)
  if unknown:
    raise ClmimError(f"{file}: model_args {unknown} change {name}'s architecture in ways clmim "
                     f"does not read; supported model_args: {sorted(_HARMLESS_ARGS)}.")
  for key in ("num_heads", "no_embed_class"):
    if key in args:
      row[key] = args[key]
  return config, row


def _method(name: str, tag: str) -> tuple[str, str]:
  """(training method, kind) recorded in results, from the architecture and its tag."""
  for key, method, kind in (("dinov2", "dinov2", "other"), ("siglip", "siglip", "cl"),
                            ("clip", "clip", "cl")):
    if key in name:
      return method, kind
  for key, method, kind in (("mae", "mae", "mim"), ("dino", "dino", "cl"),
                            ("beit", "beit", "mim")):
    if tag.split("_")[0] == key:
      return method, kind
  return "vit", "other"


def to_encoder(tensors: dict, row: dict, source: str) -> tuple[dict, dict]:
  """(encoder tensors under the names converters.encoder_params reads, {dropped group: count})."""
  enc, dropped = {}, {}
  for key, value in tensors.items():
    if key.startswith(_NOT_ENCODER):
      group = key.split(".")[0]
      dropped[group] = dropped.get(group, 0) + 1
      continue
    key = re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", key)
    enc[key] = np.asarray(value)
  if "patch_embed.proj.weight" not in enc:
    raise ClmimError(f"{source}: no 'patch_embed.proj.weight': not a timm VisionTransformer.")
  zero_bias = [k[:-len("weight")] + "bias" for k in enc if re.fullmatch(
      r"patch_embed\.proj\.weight|blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight",
      k)]
  for key in zero_bias:
    if key not in enc:
      enc[key] = np.zeros((enc[key[:-len("bias")] + "weight"].shape[0],), np.float32)
  prefix_rows = []
  if "cls_token" in enc:
    prefix_rows.append("cls")
  registers = enc["reg_token"].shape[1] if "reg_token" in enc else 0
  if "pos_embed" in enc:
    table = enc["pos_embed"]
    if row["no_embed_class"]:
      if "cls_token" in enc:  # the cls token gets no position: a zero row is the same
        table = np.concatenate([np.zeros_like(table[:, :1]), table], axis=1)
    elif registers:  # rows [cls?, registers, patches]: fold the register rows in
      start = int("cls_token" in enc)
      enc["reg_token"] = enc["reg_token"] + table[:, start:start + registers]
      table = np.concatenate([table[:, :start], table[:, start + registers:]], axis=1)
    enc["pos_embed"] = table
  return enc, dropped


def preprocessing(config: dict) -> tuple[dict, list]:
  """(eval preprocessing, notes) from the config's pretrained_cfg, as timm's eval transform
  reads it (resize the shorter side to size / crop_pct, centre-crop)."""
  cfg = config.get("pretrained_cfg") or {}
  notes = []
  if not cfg:
    notes.append("no pretrained_cfg in config.json: timm's ImageNet eval defaults")
  mode = cfg.get("crop_mode", "center")
  if mode != "center":
    notes.append(f"timm's crop_mode is {mode!r}; clmim resizes the shorter side and "
                 f"centre-crops (the same for square images)")
  mean, std = cfg.get("mean"), cfg.get("std")
  return ({"mean": [float(m) for m in mean] if mean else "imagenet",
           "std": [float(s) for s in std] if std else "imagenet",
           "interpolation": cfg.get("interpolation", "bicubic"),
           "crop_pct": min(float(cfg.get("crop_pct", 0.875)), 1.0)}, notes)


def convert_directory(path: str, image_size: Optional[int] = None,
                      num_heads: Optional[int] = None):
  """A timm hub checkpoint directory -> (`converters.Converted`, (method, kind))."""
  config, row = read_config(path)
  name = config["architecture"]
  weights = os.path.join(path, WEIGHTS)
  if not os.path.isfile(weights):
    found = sorted(os.listdir(path))
    raise ClmimError(f"{path}: no {WEIGHTS} -- clmim reads timm checkpoints as safetensors "
                     f"only; found {found[:12]}.")
  enc, dropped = to_encoder(torch_reader.load_safetensors(weights), row, path)
  table_note = f"timm architecture table ({name}, timm {architectures()['timm_version']})"
  heads = int(num_heads or row["num_heads"])
  fields, origin = hf_layout.architecture(
      enc, {"num_attention_heads": heads, "layer_norm_eps": row["norm_epsilon"],
            "hidden_act": {"gelu_tanh": "gelu_pytorch_tanh"}.get(row["mlp_activation"],
                                                                 row["mlp_activation"])},
      path)
  if fields["mlp_activation"] == "swiglu" and row["mlp_activation"] != "swiglu":
    raise ClmimError(f"{path}: the MLP shapes are SwiGLU's, but {name} uses "
                     f"{row['mlp_activation']}.")
  origin.update(num_heads=f"user (num_heads={num_heads})" if num_heads else table_note,
                norm_epsilon=table_note, mlp_activation=table_note)
  if image_size:
    hf_layout.resample_table(enc, fields, origin, int(image_size), True, path, who="timm")
  vit, params = hf_layout.build(enc, fields, path)
  pre, notes = preprocessing(config)
  tag = (config.get("pretrained_cfg") or {}).get("tag", "")
  info = {"architecture": dict(fields), "architecture_from": origin, "dropped": dropped,
          "checkpoint": {"layout": "timm", "architecture": name, "tag": tag,
                         "license": (config.get("pretrained_cfg") or {}).get("license")},
          "pooling": row["global_pool"], "preprocessing": pre,
          "num_params": hf_layout.num_params(params)}
  if notes:
    info["preprocessing_notes"] = notes
  method = _method(name, tag)
  return converters.Converted(family=method[0], vit=vit, params=params, heads={},
                              info=info), method
