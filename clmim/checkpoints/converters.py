"""Official self-supervised ViT checkpoints -> clmim's linen ViT, exactly and strictly.

Families and the layouts they are read from (see docs/checkpoints.md):
  moco_v3  {'state_dict': {'module.base_encoder.*' (+ 'head.*' projector),
            'module.momentum_encoder.*', 'module.predictor.*'}, 'epoch', 'arch', 'optimizer', ...}
  simmim   {'model': {'encoder.*' (+ 'encoder.mask_token'), 'decoder.0.*'}, 'config', ...}
  mae      {'model': {timm ViT keys (+ 'mask_token', 'decoder_*' in the _full/visualize files)}}
  dino     a flat timm ViT state dict, or a full checkpoint {'teacher': {'backbone.*', 'head.*'},
            'student': {'module.backbone.*', ...}, 'args', ...} (the teacher is read by default)
  beit     {'model': {BEiT keys, 'mask_token', 'lm_head.*'}}
Flat tensor files (.safetensors, .npz) holding the inner dict are accepted for every family.

Each family's facts (layout, block style, head counts, preprocessing) are one record in
`families.py`. The architecture is inferred from tensor shapes (width, depth, MLP size, patch,
grid; heads from the relative-position table, else from the user's `num_heads`, the family's own
sizes or the requested variant, never guessed) and checked against a requested variant.
Accounting is strict: every ViT parameter is filled, every tensor of the file is used or belongs
to a documented drop group (momentum encoder, projector, predictor, mask token, decoders, heads);
otherwise one ClmimError lists missing, unexpected and mis-shaped
keys. Position embeddings come from the file; relative-position indices in the file are checked
to equal the ones the ViT computes, so attention cannot silently differ.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from clmim.checkpoints import convert_heads, families, native, torch_reader
from clmim.checkpoints.convert_common import Taker, block_params, check_index
from clmim.errors import ClmimError
from clmim.models.vit import ViT, parse_variant, sincos_position_embedding

FAMILIES = families.NAMES


@dataclasses.dataclass
class Converted:
  """A converted checkpoint: the ViT, its params (nested numpy), optional heads and facts."""
  family: str
  vit: ViT
  params: dict
  heads: dict
  info: dict


def _fail(source, family, ckpt, why):
  found = families.detect(ckpt)
  top = sorted(map(str, ckpt))[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
  hint = f"; it looks like a {found} checkpoint (use '{found}:<path>')" if found else ""
  raise ClmimError(f"{source}: not a {family} checkpoint ({why}). Expected "
                   f"{families.get(family).layout}; "
                   f"found top-level keys {top}{hint}.")


def _split(sd: dict, rules) -> dict:
  """Sorts keys into groups by prefix ((prefix, group, keep_prefix) in order); rest: encoder."""
  groups: dict = {}
  for key, value in sd.items():
    key = str(key)
    for prefix, group, keep in rules:
      if key.startswith(prefix):
        groups.setdefault(group, {})[key if keep else key[len(prefix):]] = value
        break
    else:
      groups.setdefault("encoder", {})[key] = value
  return groups


def split_checkpoint(family: str, ckpt: Any, source: str, dino_part: str = "teacher"):
  """(groups, meta): the family's tensors sorted into 'encoder' and extra groups."""
  record = families.get(family)
  if not isinstance(ckpt, dict):
    _fail(source, family, ckpt, "the file does not hold a dict")
  meta = {k: ckpt[k] for k in ("epoch", "arch") if isinstance(ckpt.get(k), (int, str))}
  try:
    sd, rules, extra = record.state_dict(ckpt, dino_part)
  except ClmimError as e:
    raise ClmimError(f"{source}: {e}") from None
  meta.update(extra)
  groups = _split(sd, rules)
  encoder = groups.get("encoder", {})
  if "cls_token" not in encoder or "blocks.0.attn.qkv.weight" not in encoder:
    _fail(source, family, ckpt, "no ViT encoder keys (cls_token, blocks.0.attn.qkv.weight)")
  beit_style = "blocks.0.attn.q_bias" in encoder
  if beit_style != (record.block_style == "beit"):
    _fail(source, family, ckpt, f"its blocks are {'BEiT' if beit_style else 'timm'}-style")
  for group in groups.values():
    for key, value in group.items():
      if not isinstance(value, np.ndarray):
        raise ClmimError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor.")
  return groups, meta


def detect_family(ckpt: Any) -> Optional[str]:
  """Guesses the family from the layout (None when unsure). Flat timm state dicts -> 'dino'."""
  return families.detect(ckpt)


def infer_architecture(enc: dict, family: str, source: str, variant: Optional[str] = None,
                       num_heads: Optional[int] = None) -> tuple[dict, dict]:
  """(ViT fields, where each field came from), from the encoder's tensor shapes.

  Shapes fix every field but the head count, which only BEiT-style files store (in their
  relative-position tables). Otherwise the head count comes from `num_heads` (the user), the
  family's own sizes (`families.Family.heads_by_width`) or the requested `variant`, in that
  order; when none applies, one error asks for `?num_heads=N` rather than guessing. A
  requested `variant` is checked against the shapes.
  """
  def shape(key, ndim):
    if key not in enc:
      raise ClmimError(f"{source}: the encoder lacks {key!r}, needed to infer the architecture.")
    if enc[key].ndim != ndim:
      raise ClmimError(f"{source}: {key} has shape {enc[key].shape}, expected {ndim} dimensions.")
    return enc[key].shape

  record = families.get(family)
  width = shape("cls_token", 3)[-1]
  out, chans, kh, kw = shape("patch_embed.proj.weight", 4)
  if (out, chans) != (width, 3) or kh != kw:
    raise ClmimError(f"{source}: patch_embed.proj.weight has shape {(out, chans, kh, kw)}, "
                     f"expected [{width}, 3, p, p].")
  depth = len({int(m.group(1)) for k in enc for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
  fields = dict(width=width, depth=depth, mlp_dim=shape("blocks.0.mlp.fc1.weight", 2)[0],
                patch_size=kh, block_style="timm", position_embedding="none",
                rel_pos_bias="none", layer_scale_init=None)
  origin = {"width": "file (cls_token)", "depth": "file (blocks.*)",
            "mlp_dim": "file (blocks.0.mlp.fc1)", "patch_size": "file (patch_embed.proj)",
            "block_style": "file (qkv biases)", "position_embedding": "file (no pos_embed)",
            "rel_pos_bias": "file (no relative position table)",
            "layer_scale_init": "file (no gamma_1)"}
  if "blocks.0.attn.q_bias" in enc:
    fields["block_style"] = "beit"
  if "blocks.0.gamma_1" in enc:
    fields["layer_scale_init"] = 0.1  # the value is overwritten by the file's gammas
    origin["layer_scale_init"] = "file (gamma_1; values from the file)"
  tables = [k for k in ("rel_pos_bias.relative_position_bias_table",
                        "blocks.0.attn.relative_position_bias_table") if k in enc]
  if tables:
    fields["rel_pos_bias"] = "shared" if tables[0].startswith("rel_pos_bias") else "per_block"
    origin["rel_pos_bias"] = f"file ({tables[0]})"
    rows, fields["num_heads"] = shape(tables[0], 2)
    origin["num_heads"] = origin["image_size"] = f"file ({tables[0]})"
    grid = int(round((np.sqrt(rows - 3) + 1) / 2))
    if (2 * grid - 1) ** 2 + 3 != rows:
      raise ClmimError(f"{source}: {tables[0]} has {rows} rows, not (2g-1)^2+3 for a grid g.")
  if "pos_embed" in enc:
    fields["position_embedding"] = record.position_embedding
    origin["position_embedding"] = f"file (pos_embed) + family {family} ({record.position_embedding})"
    tokens = shape("pos_embed", 3)[1]
    grid = int(round(np.sqrt(tokens - 1)))
    if grid * grid + 1 != tokens:
      raise ClmimError(f"{source}: pos_embed has {tokens} tokens, not a square grid + cls.")
    origin["image_size"] = "file (pos_embed)"
  if "pos_embed" not in enc and not tables:
    grid = 224 // kh  # nothing in the file fixes the resolution; use the pretraining one
    origin["image_size"] = "default (224 px; the file does not fix it)"
  fields["image_size"] = grid * kh
  want = parse_variant(variant) if variant else None
  if want:
    bad = [f"{k} {fields[k]} (variant {want[k]})"
           for k in ("width", "depth", "mlp_dim", "patch_size") if fields[k] != want[k]]
    if "num_heads" in fields and fields["num_heads"] != want["num_heads"] \
        and record.heads_for(width) is None:
      bad.append(f"num_heads {fields['num_heads']} (variant {want['num_heads']})")
    if bad:
      raise ClmimError(f"{source}: the checkpoint's shapes contradict the requested variant "
                       f"{variant!r}: " + ", ".join(bad) + ".")
  if num_heads:
    if "num_heads" in fields and int(num_heads) != fields["num_heads"]:
      raise ClmimError(f"{source}: num_heads={num_heads} contradicts the file, whose "
                       f"{tables[0]} has {fields['num_heads']} heads.")
    fields["num_heads"], origin["num_heads"] = int(num_heads), f"user (num_heads={num_heads})"
  elif "num_heads" not in fields:
    # timm-style files do not store the head count: never guess it from the width.
    if record.heads_for(width) is not None:
      fields["num_heads"] = record.heads_for(width)
      origin["num_heads"] = f"family table ({family}, width {width})"
    elif want:
      fields["num_heads"], origin["num_heads"] = want["num_heads"], f"variant {variant}"
    else:
      known = ", ".join(f"{w}: {h}" for w, h in sorted(record.heads_by_width.items()))
      raise ClmimError(f"{source}: the file does not store the number of attention heads and "
                       f"width {width} is not a {family} model size ({known}); say it in the "
                       f"model spec, e.g. '{family}:{source}?num_heads=N'.")
  if width % fields["num_heads"]:
    raise ClmimError(f"{source}: width {width} is not divisible by {fields['num_heads']} heads.")
  return fields, origin


def encoder_params(enc: dict, f: dict, source: str, mask_token=None) -> dict:
  """The ViT param tree from a prefix-stripped encoder state dict (strict accounting)."""
  take = Taker(enc, source)
  width, patch = f["width"], f["patch_size"]
  grid = f["image_size"] // patch
  params = {"patch_embed": {
      "kernel": take("patch_embed.proj.weight", (width, 3, patch, patch)).transpose(2, 3, 1, 0),
      "bias": take("patch_embed.proj.bias", (width,))}}
  has_cls = f.get("class_token", True)
  if has_cls:
    params["cls_token"] = take("cls_token", (1, 1, width))
  if f.get("num_registers"):
    params["reg_token"] = take("reg_token", (1, f["num_registers"], width))
  if f.get("pre_norm"):
    params["norm_pre"] = take.norm("norm_pre", width)
  if f["position_embedding"] != "none":
    params["pos_embed"] = take("pos_embed", (1, grid * grid + int(has_cls), width))
  if f["rel_pos_bias"] == "shared":
    rows = (2 * grid - 1) ** 2 + 3
    params["rel_pos_bias"] = {"table": take("rel_pos_bias.relative_position_bias_table",
                                            (rows, f["num_heads"]))}
    check_index(take, "rel_pos_bias.relative_position_index", grid, source)
  for i in range(f["depth"]):
    params[f"block_{i}"] = block_params(take, f"blocks.{i}.", f, grid, source)
  if f.get("final_norm", True):
    params["norm"] = take.norm("norm", width)
  if mask_token is not None:
    params["mask_token"] = np.asarray(mask_token, np.float32).reshape(1, 1, width)
  take.check("the encoder")
  return params


def describe_pos_embed(pos_embed: np.ndarray) -> str:
  """Names a position table: MoCo's row-first or MAE's column-first sin-cos, or learned."""
  grid = int(round(np.sqrt(pos_embed.shape[1] - 1)))
  for order, owner in (("row_first", "MoCo v3"), ("col_first", "MAE")):
    table = sincos_position_embedding(grid, pos_embed.shape[-1], order)
    err = float(np.abs(table - pos_embed).max())
    if err < 1e-4:
      return f"fixed sin-cos, {order} ({owner} convention; max diff to formula {err:.1e})"
  return "learned"


def convert(ckpt: Any, family: str, source: str = "checkpoint", variant: Optional[str] = None,
            num_heads: Optional[int] = None, with_heads: bool = False,
            dino_part: str = "teacher") -> Converted:
  """Converts a loaded checkpoint object (see `torch_reader.load`) of a known family."""
  groups, meta = split_checkpoint(family, ckpt, source, dino_part)
  enc = groups.pop("encoder")
  other = groups.pop("other", {})
  if other:
    raise ClmimError(f"{source}: unexpected keys outside the {family} layout: "
                     f"{sorted(other)[:10]}.")
  fields, origin = infer_architecture(enc, family, source, variant, num_heads)
  mask_token = groups.get("mask_token", {}).get("") if with_heads else None
  if mask_token is not None:
    fields["use_mask_token"] = True
  vit = ViT(**fields)
  params = encoder_params(enc, fields, source, mask_token)
  images = jax.ShapeDtypeStruct((1, vit.image_size, vit.image_size, 3), jnp.float32)
  expected = jax.eval_shape(lambda x: vit.init(jax.random.PRNGKey(0), x), images)["params"]
  native.check_params(expected, params, source)  # guards the mapping itself
  heads, dropped = {}, {}
  for name, group in groups.items():
    if with_heads and name in families.get(family).optional_heads:
      if name != "mask_token":
        heads[name] = convert_heads.convert(family, name, group, fields, source)
    else:
      dropped[name] = len(group)
  # NOTE: no "family" key: registry.Model.info is merged over Model.family ("cl"/"mim").
  info = {"architecture": dict(fields), "architecture_from": origin, "dropped": dropped,
          "checkpoint": meta, "num_params": int(sum(np.size(v) for v in
                                                    jax.tree.leaves(params)))}
  if "pos_embed" in params:
    info["pos_embed"] = describe_pos_embed(params["pos_embed"])
  return Converted(family=family, vit=vit, params=params, heads=heads, info=info)


def load(path: str, family: Optional[str] = None, ckpt: Any = None, **kwargs) -> Converted:
  """Reads a checkpoint file (.pth, .pth.tar, .safetensors, .npz) and converts it.

  `family` is one of FAMILIES, or None to detect it from the layout; `ckpt` the file already
  loaded (`torch_reader.load`), when the caller has it. Other arguments as in `convert`
  (variant, num_heads, with_heads, dino_part).
  """
  if ckpt is None:
    ckpt = torch_reader.load(path)
  if family is None:
    family = detect_family(ckpt)
    if family is None:
      raise ClmimError(f"{path}: cannot tell which family this checkpoint belongs to; name it "
                       f"as '<family>:{path}' with <family> one of {FAMILIES}.")
  return convert(ckpt, family, source=path, **kwargs)
