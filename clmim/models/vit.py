"""A functional Flax (linen) Vision Transformer that exposes what the analyses read.

Two block styles cover every official self-supervised checkpoint:
- "timm": fused qkv projection with a bias, learned or fixed sin-cos absolute position
  embedding (MoCo v3, MAE, DINO).
- "beit": fused qkv weight with q and v biases but no k bias, layer scale, relative position
  bias (one table shared by all blocks, or one per block), no absolute position embedding
  (SimMIM, BEiT).
Both use pre-norm blocks. By default: exact erf GELU, LayerNorm eps 1e-6, a cls token at index 0
and no register tokens. Fields cover today's families too (DINOv2, CLIP, SigLIP, I-JEPA, data2vec,
BEiT v2): `class_token=False` (average-pooled models), `num_registers` (register / storage tokens,
inserted after the cls token once the position embedding is added), `norm_epsilon` (CLIP 1e-5,
Hugging Face ViTs 1e-12), `pre_norm` (CLIP's `ln_pre` after the embedding), `mlp_activation`
("gelu", "gelu_tanh" as SigLIP, "quick_gelu" as OpenAI CLIP, "swiglu" as DINOv2-g).

Token layout: [cls] [registers] [patches] -- `num_prefix_tokens` = cls + registers tokens come
first, the grid's N patch tokens last, row-major.

Mixed precision (`dtype="bfloat16"`): parameters stay float32; matmuls, convolutions and the
residual stream run in bfloat16; LayerNorm statistics and the softmax run in float32, and the
attention probabilities are sown in float32, so analyses read float32 maps. `dtype` is how the
model computes, not what it is: manifests (`vit_fields`) do not record it.

What is sown into the "intermediates" collection (read with `apply(..., mutable=["intermediates"])`
and `collect_states`):
- "embedding": the patch embedding + cls + position embedding (+ registers, after `ln_pre`),
  [B, T, D] with T = num_prefix_tokens + N;
- per block "block_{i}": "attn" post-softmax probabilities [B, heads, T, T],
  "after_attention" and "after_mlp" residual states [B, T, D] (before the final norm).
jit prunes whatever a caller does not read, so sowing everything costs nothing.

Parameter tree (stable names, mirrored by the checkpoint converters):
  patch_embed/{kernel [p,p,3,D], bias}   cls_token [1,1,D]   pos_embed [1,N+1,D] (timm only)
  mask_token [1,1,D] (when use_mask_token)   rel_pos_bias/table [R,heads] (shared RPB)
  reg_token [1,R,D] (num_registers)   norm_pre/{scale,bias} (pre_norm)
  block_{i}/norm1/{scale,bias}  block_{i}/attn/qkv/{kernel [D,3D], bias (timm)}
  block_{i}/attn/{q_bias,v_bias} (beit)   block_{i}/attn/rel_pos_bias/table (per-block RPB)
  block_{i}/attn/proj/{kernel,bias}   block_{i}/gamma_1, gamma_2 (layer scale)
  block_{i}/norm2   block_{i}/mlp/fc1, fc2 (swiglu: fc1 [D, 2*mlp_dim], gate first)   norm
"""
from __future__ import annotations

import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clmim.errors import ClmimError
from clmim.models import rope
from clmim.models.mlp import ACTIVATIONS, Mlp
from clmim.models.layer_norm import LayerNorm

# name -> (width, depth, mlp_dim, heads). "mu" is a tiny test/demo size.
VARIANTS = {
    "mu": (128, 6, 256, 4),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


def parse_variant(variant: str) -> dict:
  """Turns "B/16" into dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
  match = re.fullmatch(r"(\w+)/(\d+)", variant or "")
  if not match or match.group(1) not in VARIANTS:
    raise ClmimError(f"Unknown ViT variant {variant!r}: expected '<size>/<patch>' with size one "
                     f"of {sorted(VARIANTS)} (e.g. 'B/16').")
  width, depth, mlp_dim, heads = VARIANTS[match.group(1)]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
              patch_size=int(match.group(2)))


def sincos_position_embedding(grid: int, width: int, order: str = "row_first") -> np.ndarray:
  """Fixed 2-D sin-cos embedding [1, grid*grid + 1, width] with a zero cls row.

  Each half of the channels encodes one axis as [sin(pos*omega), cos(pos*omega)] with
  omega = 1 / 10000**(arange(width/4) / (width/4)). "row_first" puts the patch row in the first
  half (MoCo v3's table); "col_first" puts the column first (MAE's table).
  """
  if width % 4:
    raise ClmimError(f"sin-cos position embedding needs a width divisible by 4, got {width}.")
  quarter = width // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.divmod(np.arange(grid * grid), grid)

  def encode(pos):
    angles = pos[:, None].astype(np.float64) * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  first, second = (rows, cols) if order == "row_first" else (cols, rows)
  table = np.concatenate([encode(first), encode(second)], axis=1)
  table = np.concatenate([np.zeros((1, width)), table], axis=0)
  return table[None].astype(np.float32)


def relative_position_index(grid: int) -> np.ndarray:
  """BEiT's relative position index [N+1, N+1] into a table of (2g-1)^2 + 3 rows.

  Patch pairs index by their (row, col) offset; the last three rows are cls->token,
  token->cls and cls->cls.
  """
  coords = np.stack(np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")).reshape(2, -1)
  offsets = coords[:, :, None] - coords[:, None, :] + (grid - 1)  # [2, N, N], non-negative
  num_patch_offsets = (2 * grid - 1) ** 2
  index = np.zeros((grid * grid + 1,) * 2, dtype=np.int32)
  index[1:, 1:] = offsets[0] * (2 * grid - 1) + offsets[1]
  index[0, :] = num_patch_offsets
  index[:, 0] = num_patch_offsets + 1
  index[0, 0] = num_patch_offsets + 2
  return index


class RelativePositionBias(nn.Module):
  """Learned bias per (relative offset, head), returned as [heads, N+1, N+1]."""
  grid: int
  num_heads: int

  @nn.compact
  def __call__(self):
    index = relative_position_index(self.grid)
    table = self.param("table", nn.initializers.zeros, (int(index.max()) + 1, self.num_heads))
    return table[index.reshape(-1)].reshape(*index.shape, self.num_heads).transpose(2, 0, 1)


def compute_dtype(name: str):
  """The jnp dtype of a `dtype` field ("float32" or "bfloat16"); ClmimError otherwise."""
  if name not in DTYPES:
    raise ClmimError(f"dtype={name!r}: expected one of {DTYPES}.")
  return jnp.dtype(name)


DTYPES = ("float32", "bfloat16")


class FusedQkv(nn.Module):
  """The fused q, k, v projection: kernel [D, 3D] and (timm) bias [3D], named as nn.Dense names
  them, so checkpoints and initial values are nn.Dense's. `columns` (start, stop) computes only
  that slice of the 3D outputs (k and v without q, or q alone): a block that needs q for the cls
  token only does not compute it for every patch token."""
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, rows, columns=None):
    kernel = self.param("kernel", nn.initializers.xavier_uniform(),
                        (rows.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
    if columns is not None:
      kernel = kernel[:, columns[0]:columns[1]]
      bias = None if bias is None else bias[columns[0]:columns[1]]
    out = jax.lax.dot_general(rows.astype(self.dtype), kernel.astype(self.dtype),
                              (((rows.ndim - 1,), (0,)), ((), ())))
    return out if bias is None else out + bias.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head self-attention written out so the probabilities can be sown."""
  num_heads: int
  block_style: str = "timm"
  per_block_rel_pos: bool = False
  grid: int = 0
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, shared_bias=None, cls_only=False, rotation=None):
    """Attention over x [B, N, D]; with cls_only, of the cls token's query alone: [B, 1, D].
    rotation: (cos, sin, prefix) of a rotary position embedding of the patch tokens (rope.py)."""
    batch, tokens, width = x.shape
    head_dim = width // self.num_heads
    dtype = compute_dtype(self.dtype)
    qkv_dense = FusedQkv(3 * width, self.block_style == "timm", dtype, name="qkv")
    if self.block_style == "timm":
      biases = None
    else:  # BEiT: one qkv weight, learned q and v biases, no k bias.
      q_bias = self.param("q_bias", nn.initializers.zeros, (width,))
      v_bias = self.param("v_bias", nn.initializers.zeros, (width,))
      biases = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(dtype)

    def project(rows, start, stop):
      """Columns start:stop of the fused q | k | v projection of `rows` [B*T, D] (BEiT's biases
      added), as [parts, B, heads, T, hd]: heads before tokens in one transpose, so the two
      attention matmuls are plain batched matmuls (2-3x faster on CPU than einsums over the
      token-major layout)."""
      out = qkv_dense(rows, None if (start, stop) == (0, 3 * width) else (start, stop))
      if biases is not None:
        out = out + biases[start:stop]
      parts = (stop - start) // width
      return jnp.transpose(out.reshape(batch, -1, parts, self.num_heads, head_dim),
                           (2, 0, 3, 1, 4))

    # The projections see [B*N, D] rows: XLA:CPU differentiates a 2-D matmul much faster than
    # one over [B, N, D] (the MLP's gradient 1.75x, measured at the demo ViT's shapes).
    rows = x.reshape(batch * tokens, width)
    if cls_only:
      # Keys and values of every token, the query of the cls token only: the last block of an
      # encoder whose reader takes the cls token (MoCo's projector, a cls classifier).
      (q,), (k, v) = project(x[:, 0], 0, width), project(rows, width, 3 * width)
    else:
      q, k, v = project(rows, 0, 3 * width)
    if rotation is not None:
      cos, sin, prefix = rotation
      k = rope.rotate(k, cos, sin, prefix)
      if not cls_only:  # (the cls query is a prefix token: never rotated)
        q = rope.rotate(q, cos, sin, prefix)
    queries = q.shape[2]
    scale = head_dim ** -0.5
    if self.block_style == "timm":
      logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale
    else:  # BEiT scales q first; the order matters at float32 precision for parity.
      logits = jnp.einsum("bhqd,bhkd->bhqk", q * scale, k)
    if self.per_block_rel_pos:
      logits = logits + RelativePositionBias(self.grid, self.num_heads,
                                             name="rel_pos_bias")()[:, :queries]
    if shared_bias is not None:
      logits = logits + shared_bias[:, :queries]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    self.sow("intermediates", "attn", probs)
    # probs·v as a plain batched matmul with heads before tokens, then one transpose back to
    # token-major rows: XLA:CPU otherwise computes it into a [B, heads, hd, N] layout and
    # transposes twice in the gradient (demo ViT forward 96 -> 83 ms with the erf GELU below).
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(dtype), v)
    out = out.transpose(0, 2, 1, 3).reshape(batch * queries, width)
    proj = nn.Dense(width, name="proj", kernel_init=nn.initializers.xavier_uniform(), dtype=dtype)
    return proj(out).reshape(batch, queries, width)


class Block(nn.Module):
  """Pre-norm transformer block; sows the residual state after each branch."""
  num_heads: int
  mlp_dim: int
  block_style: str = "timm"
  layer_scale_init: Optional[float] = None
  per_block_rel_pos: bool = False
  grid: int = 0
  drop_path: float = 0.0
  dtype: str = "float32"
  norm_epsilon: float = 1e-6
  mlp_activation: str = "gelu"

  def _branch(self, x, y, gamma_name, deterministic):
    if self.layer_scale_init is not None:
      gamma = self.param(gamma_name, nn.initializers.constant(self.layer_scale_init),
                         (x.shape[-1],))
      y = y * gamma.astype(y.dtype)
    if self.drop_path and not deterministic:
      # Stochastic depth: drop the whole branch per sample, rescale the survivors.
      keep = 1.0 - self.drop_path
      noise = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1))
      y = y * noise / keep
    return x + y

  @nn.compact
  def __call__(self, x, shared_bias=None, deterministic=True, cls_only=False, rotation=None):
    """x [B, N, D] -> [B, N, D]; with cls_only, the cls token's output alone, [B, 1, D]."""
    norm = lambda name: LayerNorm(epsilon=self.norm_epsilon, name=name,
                                  dtype=compute_dtype(self.dtype))
    attn = Attention(self.num_heads, self.block_style, self.per_block_rel_pos, self.grid,
                     self.dtype, name="attn")
    attended = attn(norm("norm1")(x), shared_bias, cls_only, rotation)
    x = self._branch(x[:, :1] if cls_only else x, attended, "gamma_1", deterministic)
    self.sow("intermediates", "after_attention", x)
    mlp = Mlp(self.mlp_dim, compute_dtype(self.dtype), self.mlp_activation, name="mlp")
    x = self._branch(x, mlp(norm("norm2")(x)), "gamma_2", deterministic)
    self.sow("intermediates", "after_mlp", x)
    return x


class ViT(nn.Module):
  """Vision Transformer encoder. Input NHWC float images; returns the final-normed tokens.

  Attributes:
    width, depth, num_heads, mlp_dim, patch_size: the architecture (see `parse_variant`).
    image_size: training/eval resolution; fixes the grid for position tables.
    block_style: "timm" or "beit" (see module docstring).
    position_embedding: "learned", "sincos" (fixed values, stored as a param like the official
      files; freeze it in the optimizer), or "none".
    rel_pos_bias: "none", "shared" (one table for all blocks) or "per_block".
    layer_scale_init: initial layer-scale value, or None for no layer scale.
    use_mask_token: adds `mask_token`, used where `mask` [B, N] is True (SimMIM, BEiT).
    drop_path: stochastic depth rate (linearly increasing over blocks), training only.
    class_token: a learned cls token at index 0 (False: average-pooled models such as SigLIP,
      I-JEPA, AIMv2; their position table then has N rows).
    num_registers: register tokens (`reg_token` [1, R, D]) inserted after the cls token once
      the position embedding is added (DINOv2 with registers); they carry no position.
    norm_epsilon: every LayerNorm's epsilon (1e-6 timm/DINOv2, 1e-5 CLIP, 1e-12 HF ViT/BEiT).
    pre_norm: a LayerNorm (`norm_pre`) after the embedding, before the blocks (CLIP's ln_pre).
    mlp_activation: "gelu" (exact), "gelu_tanh", "quick_gelu" or "swiglu".
    final_norm: a LayerNorm (`norm`) over the output tokens (False: a file that stores none,
      e.g. a mean-pooling BEiT / data2vec encoder saved without its pooler).
    rope_theta: the base of a 2-D rotary position embedding of the patch tokens' queries and
      keys (DINOv3: 100; see rope.py), or None for none.
    dtype: "float32" or "bfloat16" (mixed precision; see the module docstring). Not part of
      the architecture: `vit_fields` leaves it out.
  """
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  patch_size: int = 16
  image_size: int = 224
  block_style: str = "timm"
  position_embedding: str = "learned"
  rel_pos_bias: str = "none"
  layer_scale_init: Optional[float] = None
  use_mask_token: bool = False
  drop_path: float = 0.0
  class_token: bool = True
  num_registers: int = 0
  norm_epsilon: float = 1e-6
  pre_norm: bool = False
  mlp_activation: str = "gelu"
  final_norm: bool = True
  rope_theta: Optional[float] = None
  dtype: str = "float32"

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patch tokens: the cls token (if any) and the registers."""
    return int(self.class_token) + self.num_registers

  def check_fields(self) -> None:
    """One ClmimError for a combination of fields the ViT cannot build."""
    if self.mlp_activation not in ACTIVATIONS:
      raise ClmimError(f"mlp_activation={self.mlp_activation!r}: expected one of "
                       f"{sorted(ACTIVATIONS)}.")
    if self.num_registers < 0:
      raise ClmimError(f"num_registers={self.num_registers}: expected 0 or more.")
    if self.rel_pos_bias != "none" and (not self.class_token or self.num_registers):
      raise ClmimError("relative position tables are laid out for [cls] + patches: "
                       "rel_pos_bias needs class_token=True and num_registers=0.")
    if self.rope_theta is not None and (self.rope_theta <= 0 or (self.width // self.num_heads) % 4):
      raise ClmimError(f"rope_theta={self.rope_theta} needs a positive base and a head dimension "
                       f"divisible by 4 (got {self.width // self.num_heads}).")

  @nn.compact
  def __call__(self, images, mask=None, deterministic=True, keep=None, cls_only=False):
    """Final-normed tokens [B, P + N, D] (P = num_prefix_tokens: cls, registers) of `images`.

    mask [B, N] (True = masked): those patches become the mask token (needs use_mask_token).
    keep [B, K] int: only these patch tokens (after position embedding, in this order) and cls
    go through the blocks, as MAE's encoder does: out [B, P + K, D]. Needs rel_pos_bias "none"
    (the bias tables are laid out for the full grid).
    cls_only: the final-normed cls token alone, [B, 1, D], the same values as out[:, :1]. The
    last block then computes the cls token's query, attention, projection and MLP only (its
    keys and values still come from every token), which nothing can prune from the full
    computation: jit keeps every token's row of a matmul whose other rows are read. Its sown
    "attn", "after_attention" and "after_mlp" hold the cls row only. For readers of the cls token
    (MoCo v3's projector, a cls classifier); analyses read every token and leave it False.
    """
    batch = images.shape[0]
    self.check_fields()
    if cls_only and not self.class_token:
      raise ClmimError("ViT(cls_only=True) needs a cls token (this model has class_token=False).")
    if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
      raise ClmimError(f"ViT built for {self.image_size}px images got shape {images.shape}.")
    dtype = compute_dtype(self.dtype)
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding="VALID", name="patch_embed", dtype=dtype)(images)
    x = x.reshape(batch, -1, self.width)
    if self.use_mask_token:
      mask_token = self.param("mask_token", nn.initializers.truncated_normal(0.02),
                              (1, 1, self.width))
      if mask is not None:
        x = jnp.where(mask[..., None], mask_token.astype(x.dtype), x)
    if self.class_token:
      cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.width))
      x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(x.dtype), x], 1)
    if self.position_embedding == "learned":
      x = x + self.param("pos_embed", nn.initializers.normal(0.02),
                         (1, x.shape[1], self.width)).astype(dtype)
    elif self.position_embedding == "sincos":
      table = sincos_position_embedding(self.grid, self.width)[:, 1 - int(self.class_token):]
      x = x + self.param("pos_embed", lambda *_: jnp.asarray(table), table.shape).astype(dtype)
    elif self.position_embedding != "none":
      raise ClmimError(f"position_embedding must be 'learned', 'sincos' or 'none', "
                       f"got {self.position_embedding!r}.")
    cls_tokens = int(self.class_token)
    if self.num_registers:
      registers = self.param("reg_token", nn.initializers.normal(1e-6),
                             (1, self.num_registers, self.width)).astype(x.dtype)
      x = jnp.concatenate([x[:, :cls_tokens],
                           jnp.broadcast_to(registers, (batch,) + registers.shape[1:]),
                           x[:, cls_tokens:]], axis=1)
    if self.pre_norm:
      x = LayerNorm(epsilon=self.norm_epsilon, name="norm_pre", dtype=dtype)(x)
    prefix = self.num_prefix_tokens
    if keep is not None:
      if self.rel_pos_bias != "none":
        raise ClmimError(f"ViT(keep=...): visible-token-only encoding needs rel_pos_bias='none' "
                         f"(got {self.rel_pos_bias!r}: its tables are laid out for the full grid).")
      if self.rope_theta is not None:
        raise ClmimError("ViT(keep=...): visible-token-only encoding is not supported with "
                         "rope_theta (the rotation is laid out for the full grid).")
      visible = jnp.take_along_axis(x[:, prefix:], keep[..., None].astype(jnp.int32), axis=1)
      x = jnp.concatenate([x[:, :prefix], visible], axis=1)
    self.sow("intermediates", "embedding", x)

    shared_bias = None
    if self.rel_pos_bias == "shared":
      shared_bias = RelativePositionBias(self.grid, self.num_heads, name="rel_pos_bias")()
    elif self.rel_pos_bias not in ("none", "per_block"):
      raise ClmimError(f"rel_pos_bias must be 'none', 'shared' or 'per_block', "
                       f"got {self.rel_pos_bias!r}.")
    rotation = None
    if self.rope_theta is not None:
      cos, sin = rope.patch_rotation(self.grid, self.width // self.num_heads,
                                     float(self.rope_theta))
      rotation = (jnp.asarray(cos), jnp.asarray(sin), prefix)
    for i in range(self.depth):
      rate = self.drop_path * i / max(self.depth - 1, 1)
      x = Block(self.num_heads, self.mlp_dim, self.block_style, self.layer_scale_init,
                self.rel_pos_bias == "per_block", self.grid, rate, self.dtype,
                self.norm_epsilon, self.mlp_activation, name=f"block_{i}")(
                    x, shared_bias, deterministic, cls_only and i == self.depth - 1, rotation)
    if cls_only:
      x = x[:, :1]  # (already so after the last block; a depth-0 ViT has none)
    # The final tokens in float32 whatever the compute dtype: heads and analyses read them.
    if self.final_norm:
      x = LayerNorm(epsilon=self.norm_epsilon, name="norm", dtype=dtype)(x)
    return x.astype(jnp.float32)


VIT_FIELDS = tuple(k for k in ViT.__dataclass_fields__ if k not in ("parent", "name", "dtype"))


def build_vit(variant: Optional[str] = None, dtype: str = "float32", **overrides: Any) -> ViT:
  """Builds a ViT from a variant name ("S/16") and/or explicit fields; overrides win.

  A field given as None is "not set": the variant's value (or the ViT default) is used.
  `dtype` ("float32" or "bfloat16") is how it computes (see the module docstring).
  """
  fields = parse_variant(variant) if variant else {}
  fields.update({k: v for k, v in overrides.items() if v is not None})
  unknown = set(fields) - set(VIT_FIELDS)
  if unknown:
    raise ClmimError(f"Unknown ViT field(s) {sorted(unknown)}; expected some of "
                     f"{sorted(VIT_FIELDS)}.")
  compute_dtype(dtype)
  return ViT(**fields, dtype=dtype)


def vit_fields(vit: ViT) -> dict:
  """The architecture of `vit` as plain fields (what a checkpoint manifest records)."""
  return {k: getattr(vit, k) for k in VIT_FIELDS}


def collect_states(intermediates: dict, depth: int) -> tuple[list, list]:
  """Unpacks sown intermediates into (zs, attns) as defined in docs/definitions.md.

  zs: 2*depth+1 residual states [B, N+1, D] (embedding, then after-attention and after-MLP of
  each block); attns: depth attention probabilities [B, heads, N+1, N+1].
  """
  tree = intermediates.get("intermediates", intermediates)
  zs, attns = [tree["embedding"][0]], []
  for i in range(depth):
    block = tree[f"block_{i}"]
    zs += [block["after_attention"][0], block["after_mlp"][0]]
    attns.append(block["attn"]["attn"][0])
  # Analyses sum in float32 (or wider) whatever the model computed in.
  return [z.astype(jnp.float32) for z in zs], [a.astype(jnp.float32) for a in attns]


def forward_with_states(model: ViT, params, images, mask=None) -> tuple[list, list]:
  """Runs the model and returns (zs, attns); see `collect_states`."""
  _, state = model.apply({"params": params}, images, mask, mutable=["intermediates"])
  return collect_states(state, model.depth)
