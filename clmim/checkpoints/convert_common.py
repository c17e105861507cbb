"""Shared pieces of the checkpoint converters: keyed tensor taking with strict accounting, and
one transformer block's torch -> linen parameter mapping (names as in clmim.models.vit).

Mapping rules (docs/checkpoints.md, "Conversion rules"): Linear weight [out, in] -> kernel = W.T;
fused qkv stays fused ([D, 3D] kernel, output split (3, heads, head_dim) like torch); LayerNorm
weight -> scale; BEiT q_bias/v_bias and gammas as they are.
"""
from __future__ import annotations

import numpy as np

from clmim.errors import ClmimError
from clmim.models.vit import relative_position_index


class Taker:
  """Hands out tensors by key with a shape check, remembering what was used and what failed."""

  def __init__(self, tensors: dict, source: str):
    self.tensors, self.source = tensors, source
    self.used, self.missing, self.wrong = set(), [], []

  def __call__(self, key, shape, optional=False):
    if key not in self.tensors:
      if not optional:
        self.missing.append(key)
      return None if optional else np.zeros(shape, np.float32)
    self.used.add(key)
    value = self.tensors[key]
    if tuple(value.shape) != tuple(shape):
      self.wrong.append(f"{key}: {tuple(value.shape)} (expected {tuple(shape)})")
      return np.zeros(shape, np.float32)
    return value if value.dtype.kind in "iub" else np.asarray(value, np.float32)

  def dense(self, prefix, out_dim, in_dim, bias=True):
    params = {"kernel": self(f"{prefix}.weight", (out_dim, in_dim)).T}
    if bias:
      params["bias"] = self(f"{prefix}.bias", (out_dim,))
    return params

  def norm(self, prefix, dim):
    return {"scale": self(f"{prefix}.weight", (dim,)), "bias": self(f"{prefix}.bias", (dim,))}

  def check(self, what: str):
    """Raises one ClmimError listing every missing, unexpected and mis-shaped key."""
    unexpected = sorted(set(self.tensors) - self.used)
    if self.missing or unexpected or self.wrong:
      parts = [f"{name} {items[:10]}{' ...' if len(items) > 10 else ''}"
               for name, items in (("missing", self.missing), ("unexpected", unexpected),
                                   ("wrong shapes", self.wrong)) if items]
      raise ClmimError(f"{self.source}: {what} does not match the inferred architecture: "
                       + "; ".join(parts) + ".")


def check_index(take: Taker, key: str, grid: int, source: str) -> None:
  """Consumes an optional relative_position_index and checks it equals the ViT's own."""
  index = take(key, (grid * grid + 1,) * 2, optional=True)
  if index is None or any(w.startswith(key + ":") for w in take.wrong):
    return  # absent (fine: it is derived) or mis-shaped (reported by take.check)
  if not np.array_equal(index, relative_position_index(grid)):
    raise ClmimError(f"{source}: {key} differs from the standard BEiT index for a {grid}x{grid} "
                     f"grid at {int((index != relative_position_index(grid)).sum())} entries; "
                     f"clmim's ViT would attend differently.")


def block_params(take: Taker, prefix: str, f: dict, grid: int, source: str) -> dict:
  """One transformer block's params (names as in clmim.models.vit) from `prefix`.* tensors."""
  width, mlp_dim = f["width"], f["mlp_dim"]
  attn = {"qkv": {"kernel": take(f"{prefix}attn.qkv.weight", (3 * width, width)).T},
          "proj": take.dense(f"{prefix}attn.proj", width, width)}
  if f["block_style"] == "timm":
    attn["qkv"]["bias"] = take(f"{prefix}attn.qkv.bias", (3 * width,))
  else:
    attn["q_bias"] = take(f"{prefix}attn.q_bias", (width,))
    attn["v_bias"] = take(f"{prefix}attn.v_bias", (width,))
  if f["rel_pos_bias"] == "per_block":
    rows = (2 * grid - 1) ** 2 + 3
    attn["rel_pos_bias"] = {"table": take(f"{prefix}attn.relative_position_bias_table",
                                          (rows, f["num_heads"]))}
    check_index(take, f"{prefix}attn.relative_position_index", grid, source)
  params = {"norm1": take.norm(f"{prefix}norm1", width), "attn": attn,
            "norm2": take.norm(f"{prefix}norm2", width),
            "mlp": {"fc1": take.dense(f"{prefix}mlp.fc1", mlp_dim * (
                2 if f.get("mlp_activation") == "swiglu" else 1), width),
                    "fc2": take.dense(f"{prefix}mlp.fc2", width, mlp_dim)}}
  if f.get("layer_scale_init") is not None:
    params["gamma_1"] = take(f"{prefix}gamma_1", (width,))
    params["gamma_2"] = take(f"{prefix}gamma_2", (width,))
  return params
