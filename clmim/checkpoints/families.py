"""Checkpoint families: one record per official layout, everything clmim knows about it.

A `Family` says where a family's file keeps its encoder (container and key prefixes), how to
sort the other tensors into named groups (momentum encoder, projector, decoder, ...), how to
recognise the layout, which block style and position table its ViT uses, how many heads it gives
a width (timm-style files never store the head count), whether it is contrastive or masked image
modeling, and the eval preprocessing its authors used. Adding a family is adding one record to
`FAMILIES` (plus, if its optional heads should be converted, a case in `convert_heads`).
The layouts themselves are described in docs/checkpoints.md.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from clmim.errors import ClmimError
from clmim.suggestions import did_you_mean

# A split rule: (key prefix, group name, keep the prefix in the group's keys). The first rule
# whose prefix matches a key wins; keys no rule matches belong to the encoder.
Rule = tuple


@dataclasses.dataclass(frozen=True)
class Family:
  """Everything about one official checkpoint layout.

  Attributes:
    name: the family's name in model specs (`<name>:<path>`).
    kind: "cl" (contrastive) or "mim" (masked image modeling): how figures colour it.
    layout: a one-line description of the file, for error messages.
    container: the top-level key holding the state dict ("state_dict", "model"), or None when
      the file is the state dict itself. A file without that key is read as the state dict.
    strip: a prefix removed from every key first (e.g. DDP's "module.").
    rules: split rules (see `Rule`) sorting keys into the encoder and extra groups.
    block_style: "timm" (fused qkv bias) or "beit" (q/v biases, layer scale).
    position_embedding: how to read a `pos_embed` in the file: "sincos" (fixed) or "learned".
    heads_by_width: the family's own head count per width (its published sizes).
    preprocessing: its authors' eval preprocessing (interpolation, crop_pct, mean, std).
    optional_heads: groups converted when asked (`with_heads=True`); other groups are dropped.
    detect: a predicate on the loaded file: does it have this family's layout?
    select: optional (ckpt, part) -> (state dict, rules, meta) for layouts with several
      containers (DINO's full checkpoints keep a teacher and a student).
  """
  name: str
  kind: str
  layout: str
  container: Optional[str]
  strip: str
  rules: tuple
  block_style: str
  position_embedding: str
  heads_by_width: dict
  preprocessing: dict
  optional_heads: tuple
  detect: Callable[[Any], bool]
  select: Optional[Callable] = None

  def state_dict(self, ckpt: dict, part: str = "teacher") -> tuple[dict, tuple, dict]:
    """(state dict with `strip` removed, the split rules, facts for the record)."""
    if self.select is not None:
      return self.select(ckpt, part)
    inner = ckpt.get(self.container) if self.container else None
    sd = inner if isinstance(inner, dict) else ckpt
    return _strip(sd, self.strip), self.rules, {}

  def heads_for(self, width: int) -> Optional[int]:
    """The family's head count for `width`, or None when the family has no model that wide."""
    return self.heads_by_width.get(int(width))


def _strip(sd: dict, prefix: str) -> dict:
  if not prefix:
    return dict(sd)
  return {k[len(prefix):] if str(k).startswith(prefix) else k: v for k, v in sd.items()}


def _keys(ckpt, container=None) -> set:
  sd = ckpt.get(container) if container else ckpt
  return set(map(str, sd)) if isinstance(sd, dict) else set()


def _any_key(ckpt, container, *prefixes) -> bool:
  keys = _keys(ckpt, container) | _keys(ckpt)
  return any(k.startswith(prefixes) for k in keys)


def _dino_select(ckpt: dict, part: str):
  if "teacher" in ckpt or "student" in ckpt:
    if not isinstance(ckpt.get(part), dict):
      raise ClmimError(f"this DINO training checkpoint has no {part!r} entry (it has "
                       f"{sorted(map(str, ckpt))[:8]}).")
    rules = (("backbone.", "encoder", False), ("head.", "head", False), ("", "other", True))
    return _strip(ckpt[part], "module."), rules, {"part": part}
  return dict(ckpt), (), {}


# timm's sizes: Ti 192/3, S 384/6, B 768/12, L 1024/16, H 1280/16 heads.
_TIMM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
_IMAGENET = {"mean": "imagenet", "std": "imagenet", "crop_pct": 0.875}

FAMILIES = {f.name: f for f in (
    Family(
        name="moco_v3", kind="cl",
        layout="{'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*', ...}}",
        container="state_dict", strip="module.",
        rules=(("base_encoder.head.", "projector", False),
               ("momentum_encoder.", "momentum_encoder", False),
               ("predictor.", "predictor", False), ("base_encoder.", "encoder", False),
               ("", "other", True)),
        block_style="timm", position_embedding="sincos",
        # MoCo v3's own ViT-S and ViT-B both have 12 heads (ViT-S: head dim 32).
        heads_by_width={384: 12, 768: 12},
        # NOTE: cl-vs-mim evaluated MoCo v3 *and* SimMIM with timm 0.5.4's default, bilinear.
        preprocessing={**_IMAGENET, "interpolation": "bilinear"},
        optional_heads=("projector", "predictor"),
        detect=lambda c: _any_key(c, "state_dict", "module.base_encoder.", "base_encoder.")),
    Family(
        name="simmim", kind="mim",
        layout="{'model': {'encoder.*', 'decoder.*'}} with BEiT-style blocks (q_bias/v_bias)",
        container="model", strip="",
        rules=(("encoder.mask_token", "mask_token", False), ("decoder.", "decoder", False),
               ("encoder.", "encoder", False), ("", "other", True)),
        block_style="beit", position_embedding="learned", heads_by_width=dict(_TIMM_HEADS),
        preprocessing={**_IMAGENET, "interpolation": "bicubic"},
        optional_heads=("decoder", "mask_token"),
        detect=lambda c: "encoder.blocks.0.attn.q_bias" in _keys(c, "model") | _keys(c)),
    Family(
        name="beit", kind="mim",
        layout="{'model': {BEiT keys: blocks.*.attn.q_bias, rel_pos_bias.*, lm_head.*, "
               "cls_pt_layers.* (BEiT v2), ...}}",
        container="model", strip="",
        # BEiT v2 adds cls_pt_layers: the extra blocks of its cls-token pretraining objective.
        rules=(("mask_token", "mask_token", False), ("lm_head.", "lm_head", False),
               ("cls_pt_layers.", "cls_pt_layers", False)),
        block_style="beit", position_embedding="learned", heads_by_width=dict(_TIMM_HEADS),
        preprocessing={"mean": "half", "std": "half", "crop_pct": 0.875,
                       "interpolation": "bicubic"},
        optional_heads=("mask_token",),
        detect=lambda c: "blocks.0.attn.q_bias" in _keys(c, "model") | _keys(c)),
    Family(
        name="mae", kind="mim",
        layout="{'model': {timm ViT keys: cls_token, pos_embed, blocks.*.attn.qkv.bias, ...}}",
        container="model", strip="",
        rules=(("mask_token", "decoder", True), ("decoder_", "decoder", True)),
        block_style="timm", position_embedding="sincos", heads_by_width=dict(_TIMM_HEADS),
        preprocessing={**_IMAGENET, "interpolation": "bicubic"},
        optional_heads=("decoder",),
        detect=lambda c: "blocks.0.attn.qkv.weight" in _keys(c, "model")
        or "decoder_embed.weight" in _keys(c)),
    Family(
        name="dino", kind="cl",
        layout="a flat timm ViT state dict, or {'teacher': {'backbone.*'}, 'student': ...}",
        container=None, strip="", rules=(),
        block_style="timm", position_embedding="learned", heads_by_width=dict(_TIMM_HEADS),
        preprocessing={**_IMAGENET, "interpolation": "bicubic"},
        optional_heads=(),
        detect=lambda c: "teacher" in c or "student" in c
        or "blocks.0.attn.qkv.weight" in _keys(c),
        select=_dino_select),
)}
NAMES = tuple(FAMILIES)


def get(name: str) -> Family:
  """The record of family `name`, or one error listing the known families."""
  if name not in FAMILIES:
    raise ClmimError(f"unknown family {name!r}{did_you_mean(name, NAMES)} (expected one of "
                     f"{', '.join(NAMES)}).")
  return FAMILIES[name]


def detect(ckpt: Any) -> Optional[str]:
  """The first family whose layout `ckpt` has (None when none does). The order of `FAMILIES`
  matters: specific layouts (MoCo's prefixes, SimMIM's `encoder.`) before generic timm ones."""
  if not isinstance(ckpt, dict):
    return None
  for family in FAMILIES.values():
    if family.detect(ckpt):
      return family.name
  return None
