"""Official files of today's models: DINOv2, iBOT, I-JEPA, OpenAI CLIP / OpenCLIP, SigLIP.

Each `FileLayout` turns the file its authors published into timm-named encoder tensors, which
the shape-based inference and strict accounting of the transformers / timm loaders
(`hf_layout.architecture`, `hf_layout.build`) then turn into clmim's ViT. A layout adds only the
facts its files leave out (the head count of each published width, the LayerNorm epsilon, the
activation), its authors' preprocessing, and the way its own code resamples the position table.
The layouts are described in docs/checkpoints.md §8. BEiT v2 files load through the `beit`
family (its `cls_pt_layers` are dropped there).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

import numpy as np

from clmim.checkpoints import converters, hf_layout, torch_reader
from clmim.errors import ClmimError


@dataclasses.dataclass(frozen=True)
class FileLayout:
  """One official file layout.

  Attributes:
    name: its name in model specs (`<name>:<path>`).
    method, kind: the training method and "cl" / "mim" / "other", recorded in results.
    layout: what the file holds, for error messages.
    detect: does a loaded file have this layout?
    encoder: (loaded file, source, options) -> (timm-named encoder tensors, {dropped group:
      count}, facts for the record).
    heads: width -> the head count of the family's published model of that width (None: not
      a published width; the user says `?num_heads=`).
    norm_epsilon, activation: the LayerNorm epsilon and MLP activation of its code (activation
      None: the encoder function decides, from the file or the options).
    preprocessing: its authors' eval preprocessing.
    resampling: encoder tensors -> (antialias, offset): how its code resamples the position
      table (see resample.resample_grid; DINOv2's depends on whether it has registers).
  """
  name: str
  method: str
  kind: str
  layout: str
  detect: Callable[[Any], bool]
  encoder: Callable
  heads: Callable[[int], Optional[int]]
  norm_epsilon: float
  activation: Optional[str]
  preprocessing: dict
  resampling: Callable[[dict], tuple]


_IMAGENET = {"mean": "imagenet", "std": "imagenet", "interpolation": "bicubic",
             "crop_pct": 0.875}
_CLIP_PRE = {"mean": [0.48145466, 0.4578275, 0.40821073],
             "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
             "crop_pct": 1.0}


def _strip(sd: dict, *prefixes) -> dict:
  out = {}
  for key, value in sd.items():
    key = str(key)
    for prefix in prefixes:
      if key.startswith(prefix):
        key = key[len(prefix):]
    out[key] = value
  return out


def _drop(sd: dict, groups: dict) -> tuple[dict, dict]:
  """(kept tensors, {group: count}) for `groups` = {key prefix: group name}."""
  kept, dropped = {}, {}
  for key, value in sd.items():
    group = next((g for p, g in groups.items() if key.startswith(p)), None)
    if group:
      dropped[group] = dropped.get(group, 0) + 1
    else:
      kept[key] = value
  return kept, dropped


def _tensors_only(sd: dict, source: str) -> dict:
  for key, value in sd.items():
    if not isinstance(value, np.ndarray):
      raise ClmimError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor.")
  return sd


# --- DINOv2 --------------------------------------------------------------------------------

def _is_dinov2(ckpt) -> bool:
  keys = set(map(str, ckpt)) if isinstance(ckpt, dict) else set()
  if isinstance(ckpt, dict) and isinstance(ckpt.get("teacher"), dict):
    keys = {k.split("backbone.", 1)[-1] for k in map(str, ckpt["teacher"])}
  return "register_tokens" in keys or any(
      re.fullmatch(r"blocks\.(\d+\.)+ls1\.gamma", k) for k in keys)


def _dinov2_encoder(ckpt, source, options):
  sd, facts = ckpt, {}
  if isinstance(ckpt.get("teacher"), dict):  # a training checkpoint: the teacher's backbone
    sd, facts = ckpt["teacher"], {"part": "teacher"}
  sd = _strip(sd, "module.", "backbone.")
  sd, dropped = _drop(sd, {"mask_token": "mask_token", "dino_head.": "dino_head",
                           "ibot_head.": "ibot_head", "head.": "head"})
  enc = {}
  for key, value in _tensors_only(sd, source).items():
    key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # BlockChunk: global indices
    key = re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", key)
    key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
    enc["reg_token" if key == "register_tokens" else key] = value
  return enc, dropped, facts


def _dinov2_resampling(enc):
  # The released backbones: with registers, antialias and no offset; without, offset 0.1.
  return (True, 0.0) if "reg_token" in enc else (False, 0.1)


# --- iBOT ----------------------------------------------------------------------------------

def _is_ibot(ckpt) -> bool:
  if not isinstance(ckpt, dict):
    return False
  inner = ckpt.get("teacher") if isinstance(ckpt.get("teacher"), dict) else ckpt.get(
      "state_dict")
  if not isinstance(inner, dict):
    return False
  keys = {k.split("backbone.", 1)[-1] for k in map(str, inner)}
  return "masked_embed" in keys or ("cls_token" in keys and "blocks.0.attn.qkv.weight" in keys
                                    and "state_dict" in ckpt)


def _ibot_encoder(ckpt, source, options):
  if isinstance(ckpt.get("teacher"), dict):
    sd, facts = ckpt["teacher"], {"part": "teacher"}
  elif isinstance(ckpt.get("state_dict"), dict):
    sd, facts = ckpt["state_dict"], {}
  else:
    sd, facts = ckpt, {}
  sd = _strip(sd, "module.", "backbone.")
  enc, dropped = _drop(sd, {"masked_embed": "masked_embed", "head.": "head"})
  return _tensors_only(enc, source), dropped, facts


# --- I-JEPA --------------------------------------------------------------------------------

_IJEPA_PARTS = ("target_encoder", "encoder")


def _is_ijepa(ckpt) -> bool:
  return isinstance(ckpt, dict) and isinstance(ckpt.get("target_encoder"), dict) and \
      isinstance(ckpt.get("predictor"), dict)


def _ijepa_encoder(ckpt, source, options):
  part = options.get("part", "target_encoder")
  if part not in _IJEPA_PARTS:
    raise ClmimError(f"{source}: part={part!r}; an I-JEPA checkpoint holds "
                     f"{' and '.join(_IJEPA_PARTS)} (the target encoder is the one evaluated).")
  if not isinstance(ckpt.get(part), dict):
    raise ClmimError(f"{source}: no {part!r} in this I-JEPA checkpoint (it has "
                     f"{sorted(map(str, ckpt))[:8]}).")
  enc = _tensors_only(_strip(ckpt[part], "module."), source)
  dropped = {k: len(v) for k, v in ckpt.items()
             if k in ("encoder", "target_encoder", "predictor") and k != part
             and isinstance(v, dict)}
  return enc, dropped, {"part": part}


# --- OpenAI CLIP / OpenCLIP ----------------------------------------------------------------

def _state(obj):
  """The attribute dict a pickled TorchScript module placeholder holds, or None."""
  if not isinstance(obj, torch_reader.Placeholder):
    return None
  state = obj.__dict__.get("state")
  if isinstance(state, tuple) and state and isinstance(state[0], dict):
    state = state[0]  # (dict state, slot state)
  return state if isinstance(state, dict) else None


def flatten_module(obj, prefix: str = "") -> dict:
  """{dotted attribute path: tensor} of a TorchScript module tree as torch_reader reads it
  (placeholders whose pickled state holds the submodules, parameters and buffers)."""
  out = {}
  state = _state(obj)
  if state is not None:
    for key, value in state.items():
      if isinstance(value, np.ndarray):
        out[prefix + str(key)] = value
      elif isinstance(value, torch_reader.Placeholder):
        out.update(flatten_module(value, f"{prefix}{key}."))
  return out


def _is_torchscript(ckpt) -> bool:
  return isinstance(ckpt, torch_reader.Placeholder) and \
      getattr(ckpt, "global_name", "").startswith("__torch__.")


def _clip_state_dict(ckpt):
  return flatten_module(ckpt) if _is_torchscript(ckpt) else ckpt


def _attribute(module, name: str):
  """A submodule / tensor of a TorchScript module as torch_reader reads it (or None)."""
  state = _state(module)
  return None if state is None else state.get(name)


def _is_clip(ckpt) -> bool:
  if _is_torchscript(ckpt):  # the tree is only walked when it is converted
    return isinstance(_attribute(_attribute(ckpt, "visual"), "conv1"), torch_reader.Placeholder)
  keys = set(map(str, ckpt)) if isinstance(ckpt, dict) else set()
  return "visual.conv1.weight" in keys or "conv1.weight" in keys and "class_embedding" in keys


_CLIP_BLOCK = {"ln_1.": "norm1.", "ln_2.": "norm2.", "attn.in_proj_weight": "attn.qkv.weight",
               "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj.": "attn.proj.",
               "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
_CLIP_TOP = {"conv1.weight": "patch_embed.proj.weight", "ln_pre.": "norm_pre.",
             "ln_post.": "norm."}


def _clip_encoder(ckpt, source, options):
  torchscript = _is_torchscript(ckpt)
  sd = _clip_state_dict(ckpt)
  sd = {str(k): v for k, v in sd.items()}
  if "visual.conv1.weight" in sd:
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    dropped = {"text_tower": sum(not k.startswith("visual.") for k in sd)}
  else:
    visual, dropped = dict(sd), {}
  enc = {}
  for key, value in _tensors_only(visual, source).items():
    if key == "proj":
      dropped["projection"] = 1
      continue
    if key == "class_embedding":
      enc["cls_token"] = value.reshape(1, 1, -1)
      continue
    if key == "positional_embedding":
      enc["pos_embed"] = value[None]
      continue
    match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
    table, rest = (_CLIP_BLOCK, match.group(2)) if match else (_CLIP_TOP, key)
    new = next((rest.replace(old, new, 1) for old, new in table.items()
                if rest.startswith(old)), None)
    if new is None:
      raise ClmimError(f"{source}: the CLIP image tower has a tensor clmim cannot place: "
                       f"'visual.{key}' (attention-pooling and CoCa towers are not supported).")
    enc[f"blocks.{match.group(1)}.{new}" if match else new] = value
  width = enc["patch_embed.proj.weight"].shape[0]
  enc.setdefault("patch_embed.proj.bias", np.zeros((width,), np.float32))
  activation = options.get("mlp_activation")
  facts = {"format": "TorchScript archive" if torchscript else "state dict"}
  if activation is None:
    if not torchscript:
      raise ClmimError(f"{source}: an OpenCLIP / CLIP state dict does not say its activation: "
                       f"OpenAI's models and the '-quickgelu' OpenCLIP models use QuickGELU, "
                       f"the other OpenCLIP models GELU. Say which in the spec, e.g. "
                       f"'clip:{source}?mlp_activation=quick_gelu' (or gelu).")
    activation = "quick_gelu"  # OpenAI's TorchScript releases: QuickGELU, by their model code
    facts["activation_from"] = "OpenAI's CLIP code (QuickGELU) for its TorchScript releases"
  if activation not in ("quick_gelu", "gelu"):
    raise ClmimError(f"{source}: mlp_activation={activation!r}; CLIP image towers use "
                     f"quick_gelu or gelu.")
  facts["mlp_activation"] = activation
  return enc, dropped, facts


# --- big_vision SigLIP (.npz) --------------------------------------------------------------

def _siglip_root(ckpt) -> Optional[str]:
  if not isinstance(ckpt, dict):
    return None
  return next((root for root in ("params/img/", "img/")
               if f"{root}embedding/kernel" in ckpt), None)


def _siglip_encoder(ckpt, source, options):
  root = _siglip_root(ckpt)
  img = {k[len(root):]: np.asarray(v) for k, v in ckpt.items() if str(k).startswith(root)}
  dropped = {"text_tower_and_scalars": sum(not str(k).startswith(root) for k in ckpt)}
  enc = {"patch_embed.proj.weight": img.pop("embedding/kernel").transpose(3, 2, 0, 1),
         "patch_embed.proj.bias": img.pop("embedding/bias")}
  if "pos_embedding" in img:
    enc["pos_embed"] = img.pop("pos_embedding").reshape(1, -1, enc["patch_embed.proj.bias"].size)
  blocks: dict = {}
  for key in list(img):
    scanned = re.fullmatch(r"Transformer/encoderblock/(.+)", key)
    single = re.fullmatch(r"Transformer/encoderblock_(\d+)/(.+)", key)
    if scanned:  # one array per parameter, the blocks stacked on axis 0
      stacked = img.pop(key)
      for i in range(stacked.shape[0]):
        blocks.setdefault(i, {})[scanned.group(1)] = stacked[i]
    elif single:
      blocks.setdefault(int(single.group(1)), {})[single.group(2)] = img.pop(key)
  heads = None
  for i, b in blocks.items():
    t = f"blocks.{i}."
    try:
      q, k, v = (b.pop(f"MultiHeadDotProductAttention_0/{n}/kernel") for n in ("query", "key",
                                                                              "value"))
      heads = q.shape[1]
      enc[t + "attn.qkv.weight"] = np.concatenate([x.reshape(x.shape[0], -1).T for x in (q, k, v)])
      enc[t + "attn.qkv.bias"] = np.concatenate([
          b.pop(f"MultiHeadDotProductAttention_0/{n}/bias").reshape(-1)
          for n in ("query", "key", "value")])
      out = b.pop("MultiHeadDotProductAttention_0/out/kernel")
      enc[t + "attn.proj.weight"] = out.reshape(-1, out.shape[-1]).T
      enc[t + "attn.proj.bias"] = b.pop("MultiHeadDotProductAttention_0/out/bias")
      for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
        enc[f"{t}{ours}.weight"] = b.pop(f"{theirs}/scale")
        enc[f"{t}{ours}.bias"] = b.pop(f"{theirs}/bias")
      for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
        enc[f"{t}mlp.{ours}.weight"] = b.pop(f"MlpBlock_0/{theirs}/kernel").T
        enc[f"{t}mlp.{ours}.bias"] = b.pop(f"MlpBlock_0/{theirs}/bias")
    except KeyError as e:
      raise ClmimError(f"{source}: encoder block {i} lacks {e.args[0]!r} (big_vision layout "
                       f"{root}Transformer/encoderblock_N/...).") from None
    if b:
      raise ClmimError(f"{source}: encoder block {i} has tensors clmim cannot place: "
                       f"{sorted(b)[:5]}.")
  enc["norm.weight"] = img.pop("Transformer/encoder_norm/scale", None)
  enc["norm.bias"] = img.pop("Transformer/encoder_norm/bias", None)
  if enc["norm.weight"] is None:
    raise ClmimError(f"{source}: no {root}Transformer/encoder_norm.")
  for key in list(img):
    if key.startswith(("MAPHead_0/", "head/")):
      group = key.split("/")[0]
      dropped[group] = dropped.get(group, 0) + 1
      img.pop(key)
  if img:
    raise ClmimError(f"{source}: the image tower has tensors clmim cannot place: "
                     f"{sorted(img)[:5]}.")
  return enc, dropped, {"num_heads": heads, "layout": "big_vision"}


LAYOUTS = {layout.name: layout for layout in (
    FileLayout("dinov2", "dinov2", "other",
               "a DINOv2 backbone state dict (blocks.N.ls1.gamma, register_tokens, mask_token) "
               "or a training checkpoint {'teacher': {'backbone.*', ...}}",
               _is_dinov2, _dinov2_encoder, {384: 6, 768: 12, 1024: 16, 1536: 24}.get,
               1e-6, None, dict(_IMAGENET), _dinov2_resampling),
    FileLayout("ijepa", "ijepa", "mim",
               "{'encoder', 'predictor', 'target_encoder': {'module.*'}, 'opt', 'epoch', ...}",
               _is_ijepa, _ijepa_encoder, {768: 12, 1024: 16, 1280: 16, 1408: 16}.get,
               1e-6, "gelu", dict(_IMAGENET), lambda enc: (False, 0.0)),
    FileLayout("ibot", "ibot", "other",
               "{'state_dict': {timm ViT keys, 'masked_embed'}} (checkpoint_teacher.pth) or "
               "{'teacher': {'backbone.*', 'head.*'}, 'student': ...}",
               _is_ibot, _ibot_encoder, {384: 6, 768: 12, 1024: 16}.get,
               1e-6, "gelu", dict(_IMAGENET), lambda enc: (False, 0.0)),
    FileLayout("clip", "clip", "cl",
               "OpenAI's TorchScript archive (ViT-B-16.pt) or an OpenAI / OpenCLIP state dict "
               "(visual.conv1.weight, visual.transformer.resblocks.N.*)",
               _is_clip, _clip_encoder, lambda width: width // 64,
               1e-5, None, dict(_CLIP_PRE), lambda enc: (False, 0.0)),
    FileLayout("siglip", "siglip", "cl",
               "a big_vision .npz (params/img/embedding/kernel, "
               "params/img/Transformer/encoderblock_N/... or scanned encoderblock/...)",
               lambda c: _siglip_root(c) is not None, _siglip_encoder, lambda width: None,
               1e-6, "gelu_tanh", {"mean": "half", "std": "half", "interpolation": "bicubic",
                                   "crop_pct": 1.0}, lambda enc: (False, 0.0)),
)}
NAMES = tuple(LAYOUTS)
OPTIONS = ("name", "num_heads", "image_size", "mlp_activation", "part")


def detect(ckpt) -> Optional[str]:
  """The layout a loaded file has, or None (then the 2021-2022 families are tried)."""
  for name in ("ijepa", "dinov2", "ibot", "clip", "siglip"):
    if LAYOUTS[name].detect(ckpt):
      return name
  return None


def convert(ckpt, name: str, source: str, options: dict) -> converters.Converted:
  """A loaded official file of layout `name` -> `converters.Converted` (encoder only)."""
  layout = LAYOUTS[name]
  if not layout.detect(ckpt):
    raise ClmimError(f"{source}: not a {name} checkpoint; expected {layout.layout}.")
  enc, dropped, facts = layout.encoder(ckpt, source, options)
  if "patch_embed.proj.weight" not in enc or enc["patch_embed.proj.weight"].ndim != 4:
    raise ClmimError(f"{source}: no patch projection [D, 3, p, p] in the {name} encoder.")
  width = enc["patch_embed.proj.weight"].shape[0]
  heads = options.get("num_heads") or facts.pop("num_heads", None) or layout.heads(width)
  if not heads:
    raise ClmimError(f"{source}: width {width} is not a published {name} size, and the file "
                     f"does not store the head count; say it, e.g. "
                     f"'{name}:{source}?num_heads=N'.")
  activation = facts.pop("mlp_activation", None) or layout.activation or "gelu"
  fields, origin = hf_layout.architecture(
      enc, {"num_attention_heads": int(heads), "layer_norm_eps": layout.norm_epsilon,
            "hidden_act": {"gelu_tanh": "gelu_pytorch_tanh"}.get(activation, activation)},
      source)
  origin.update(
      num_heads=(f"user (num_heads={options['num_heads']})" if options.get("num_heads")
                 else "file (attention kernels)" if name == "siglip"
                 else f"{name}'s published sizes (width {width})"),
      norm_epsilon=f"{name}'s code", mlp_activation=(
          "file (MLP shapes)" if fields["mlp_activation"] == "swiglu"
          else f"user (mlp_activation={activation})" if options.get("mlp_activation")
          else f"{name}'s code"))
  if options.get("image_size"):
    antialias, offset = layout.resampling(enc)
    hf_layout.resample_table(enc, fields, origin, int(options["image_size"]), antialias, source,
                             who=f"{name}'s own code", offset=offset)
  vit, params = hf_layout.build(enc, fields, source)
  info = {"architecture": dict(fields), "architecture_from": origin, "dropped": dropped,
          "checkpoint": {"layout": f"official {name}", **facts},
          "preprocessing": dict(layout.preprocessing),
          "num_params": hf_layout.num_params(params)}
  return converters.Converted(family=layout.method, vit=vit, params=params, heads={}, info=info)
