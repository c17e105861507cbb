"""Heads that sit on a ViT during pretraining: MoCo v3 projector/predictor, SimMIM's pixel head
and MAE's transformer decoder.

Parameter names follow the official files where one exists (see docs/checkpoints.md), so the
converters can fill them: the MoCo MLP layers are `linear_{i}` (no bias) and `bn_{i}`; the MAE
decoder is {mask_token, embed, pos_embed, block_{i}, norm, pred} with `clmim.models.vit.Block`'s
names inside the blocks.

A decoder as the registry attaches it to a model is {"kind": "mae" | "simmim", "params",
"config"}; `decoder_states` runs one on the encoder's output and returns what the analyses read.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from clmim.errors import ClmimError
from clmim.models import masking
from clmim.models.layer_norm import LayerNorm
from clmim.models.vit import Block, collect_states, sincos_position_embedding

DECODER_KINDS = ("mae", "simmim")


class BatchNormMLP(nn.Module):
  """MoCo v3's `_build_mlp`: Linear(no bias) -> BN -> ReLU, repeated; the last layer gets a BN
  without affine parameters (when `last_bn`). BatchNorm eps 1e-5, as in PyTorch."""
  num_layers: int
  hidden_dim: int
  out_dim: int
  last_bn: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = nn.Dense(self.out_dim if last else self.hidden_dim, use_bias=False,
                   name=f"linear_{i}")(x)
      if not last:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         name=f"bn_{i}")(x)
        x = nn.relu(x)
      elif self.last_bn:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         use_scale=False, use_bias=False, name=f"bn_{i}")(x)
    return x


class PixelHead(nn.Module):
  """SimMIM's decoder: a linear map from each patch token to its p*p*3 pixels (the 1x1 conv +
  pixel shuffle of the original, written per token). Output order inside a patch: (row, col, c)."""
  patch_size: int

  @nn.compact
  def __call__(self, tokens):
    return nn.Dense(self.patch_size * self.patch_size * 3, name="linear")(tokens)


def patchify(images, patch_size: int):
  """[B, H, W, 3] -> [B, N, p*p*3] in row-major patch order, pixels as (row, col, channel)."""
  batch, height, width, channels = images.shape
  g_h, g_w = height // patch_size, width // patch_size
  x = images.reshape(batch, g_h, patch_size, g_w, patch_size, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, g_h * g_w, -1)


class MaeDecoder(nn.Module):
  """MAE's decoder (models_mae.py `forward_decoder`): embed -> (+ mask tokens) -> + pos_embed ->
  timm-style blocks -> norm -> pred, on the encoder's final-normed tokens [B, N+1, D_enc].

  Sows like the encoder ("embedding": the blocks' input, then per block "attn",
  "after_attention", "after_mlp"), so `clmim.models.vit.collect_states` reads its states.
  `mask` [B, N] (True = masked) replaces those tokens' embeddings by the mask token, as MAE's
  un-shuffle does (the decoder analysis passes one by default, see `masked_decoder_states`).
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int

  @nn.compact
  def __call__(self, latent, mask=None):
    tokens = latent.shape[1]
    grid = int(round((tokens - 1) ** 0.5))
    if grid * grid + 1 != tokens:
      raise ClmimError(f"MaeDecoder: {tokens} tokens are not a square grid + cls.")
    init = nn.initializers.xavier_uniform()  # MAE's _init_weights for every Linear
    x = nn.Dense(self.width, name="embed", kernel_init=init)(latent)
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.width))
    if mask is not None:
      masked = jnp.concatenate([jnp.zeros_like(mask[:, :1]), mask], axis=1)  # cls is never masked
      x = jnp.where(masked[..., None], mask_token.astype(x.dtype), x)
    # MAE's decoder table is a fixed column-first sin-cos one; a file's own values replace it.
    table = sincos_position_embedding(grid, self.width, "col_first")
    x = x + self.param("pos_embed", lambda *_: jnp.asarray(table), table.shape)
    self.sow("intermediates", "embedding", x)
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_dim, name=f"block_{i}")(x)
    x = LayerNorm(epsilon=1e-6, name="norm")(x)
    return nn.Dense(self.patch_size * self.patch_size * 3, name="pred", kernel_init=init)(x)


def decoder_module(kind: str, config: dict) -> nn.Module:
  """The linen module of a decoder of `kind` with the converter's `config`."""
  if kind == "mae":
    return MaeDecoder(**config)
  if kind == "simmim":
    return PixelHead(**config)
  raise ClmimError(f"unknown decoder kind {kind!r}; expected one of {', '.join(DECODER_KINDS)}.")


def _decoder_input(kind: str, latent):
  # SimMIM's decoder reads the patch tokens only (its encoder drops cls before the 1x1 conv).
  return latent[:, 1:] if kind == "simmim" else latent


def init_decoder(kind: str, config: dict, latent, rng):
  """Fresh params of a decoder for encoder outputs shaped like `latent` [B, N+1, D_enc]."""
  return decoder_module(kind, config).init(rng, _decoder_input(kind, latent))["params"]


def decoder_states(kind: str, config: dict, params, latent, mask=None) -> tuple[list, list]:
  """(zs, attns) of a decoder run on the encoder's final-normed tokens `latent` [B, N+1, D].

  `mask` [B, N] (True = masked; MAE only): those tokens become the decoder's mask token, as in
  training (`latent` then holds the visible tokens at their grid positions, see
  `masking.scatter_visible`). Without it the decoder reads every token of `latent`.

  - "mae": zs = the blocks' input (embed(latent) + pos_embed), then per block the state after
    the attention branch and after the MLP branch ([B, N+1, width], like the encoder's zs);
    attns = per block [B, heads, N+1, N+1].
  - "simmim": the decoder is one linear map per token (no blocks): zs = [its output,
    [B, N+1, p*p*3] with a zero row standing in for cls (the head has none; analyses drop it)],
    attns = []. (SimMIM masks in the encoder: pass the masked encoder's `latent`.)
  """
  x = _decoder_input(kind, latent)
  module = decoder_module(kind, config)
  if kind == "simmim":
    pixels = module.apply({"params": params}, x)
    return [jnp.concatenate([jnp.zeros_like(pixels[:, :1]), pixels], axis=1)], []
  _, state = module.apply({"params": params}, x, mask, mutable=["intermediates"])
  return collect_states(state, module.depth)


def masked_decoder_states(vit, kind: str, config: dict, params, images, index, feed: dict):
  """(zs, attns) of the decoder fed as in pretraining: each image masked by its own draw
  (`masking.per_image` with feed["seed"] and the image's stream position `index`).

  - MAE: int(N * (1 - ratio)) patches kept uniformly at random; the encoder runs on those only
    (`ViT(keep=...)`), the decoder gets them at their grid positions and its mask token
    elsewhere (MAE's forward_encoder + forward_decoder).
  - SimMIM: ceil(ratio * blocks) blocks of feed["patch"] x feed["patch"] tokens masked; the
    encoder runs on every token with the masked ones replaced by its mask token
    (`params["mask_token"]`), the pixel head on its output.
  `params` is {"encoder", "decoder", "mask_token" (SimMIM)}; feed = {"ratio", "patch", "seed"}.
  """
  tokens = vit.grid ** 2
  if kind == "mae":
    keep, mask = masking.per_image(
        lambda key: masking.random_keep(key, 1, tokens, feed["ratio"]), feed["seed"], index)
    visible = vit.apply({"params": params["encoder"]}, images, keep=keep)
    return decoder_states(kind, config, params["decoder"], masking.scatter_visible(
        visible, keep, tokens), mask)
  mask = masking.per_image(
      lambda key: masking.block_masks(key, 1, vit.grid, feed["patch"], feed["ratio"]),
      feed["seed"], index)
  encoder = vit.clone(use_mask_token=True)
  latent = encoder.apply({"params": {**params["encoder"], "mask_token": params["mask_token"]}},
                         images, mask)
  return decoder_states(kind, config, params["decoder"], latent)


def forward_with_decoder(vit, kind: str, config: dict, params, images, index=None, feed=None):
  """(zs, attns, decoder_zs, decoder_attns) of the encoder `vit` and its decoder on `images`.

  The encoder's states are always those of the unmasked image (what every other analysis
  reads). The decoder is fed as in pretraining when `feed` is given (`masked_decoder_states`,
  needs each image's stream position `index`), else the unmasked image's encoding
  (`decoder_states`). `params` is {"encoder": the ViT's params, "decoder": the decoder's, and,
  for a masked SimMIM feed, "mask_token"}.
  """
  latent, state = vit.apply({"params": params["encoder"]}, images, mutable=["intermediates"])
  zs, attns = collect_states(state, vit.depth)
  if feed is None:
    decoder_zs, decoder_attns = decoder_states(kind, config, params["decoder"], latent)
  else:
    decoder_zs, decoder_attns = masked_decoder_states(vit, kind, config, params, images, index,
                                                      feed)
  return zs, attns, decoder_zs, decoder_attns
