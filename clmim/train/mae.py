"""MAE objective: random masking of 75 % of the patches, the encoder on the visible ones only, a
small ViT decoder with mask tokens, mean squared error on the masked patches' (per-patch
normalised) pixels (He et al., 2022).

Trainable params: {"encoder", "decoder"}. No extra state. Exports keep the decoder beside the
encoder (`pretraining_decoder`; load it with `<export>?decoder=1`). The decoder is
`clmim.models.heads.MaeDecoder` (the layout the MAE checkpoint converter reads), fed the
encoder's tokens scattered back to their grid positions: it embeds them, puts its mask token
wherever a patch was masked (the embedding of the zeros left there is discarded) and adds its
fixed sin-cos positions — MAE's `forward_decoder` after its un-shuffle.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from clmim.data.augment import crop_flip_view
from clmim.errors import ClmimError
from clmim.models.heads import MaeDecoder, patchify
from clmim.models.masking import random_keep, scatter_visible  # noqa: F401 (re-exported)
from clmim.train.common import SingleEncoderObjective, build_encoder, normalise


def pixel_targets(images, patch_size: int, norm_pix: bool):
  """[B, N, p*p*3] patch pixels; with norm_pix each patch minus its mean over its own pixels,
  divided by sqrt(var + 1e-6) (MAE's norm_pix_loss)."""
  target = patchify(images, patch_size)
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def masked_mse(prediction, target, mask):
  """Mean over masked patches of the per-patch mean squared error (unmasked patches count 0)."""
  per_patch = jnp.mean((prediction - target) ** 2, axis=-1)
  weights = mask.astype(per_patch.dtype)
  return (per_patch * weights).sum() / jnp.maximum(weights.sum(), 1.0)


class Objective(SingleEncoderObjective):
  """MAE; see the module docstring. `config.mae` holds the objective's fields."""

  SECTIONS = ("mae",)

  def __init__(self, config):
    super().__init__(config)
    self.encoder = build_encoder(config)
    cfg = config.mae
    if self.encoder.rel_pos_bias != "none":
      raise ClmimError(f"config.model.rel_pos_bias={self.encoder.rel_pos_bias!r}: MAE encodes "
                       f"the visible patches only, which needs 'none'.")
    tokens = self.encoder.grid ** 2
    if not 0 < cfg.mask_ratio < 1 or int(tokens * (1 - cfg.mask_ratio)) < 1:
      raise ClmimError(f"config.mae.mask_ratio={cfg.mask_ratio}: expected a value in (0, 1) "
                       f"that keeps at least one of the {tokens} patches.")
    if cfg.decoder_width % cfg.decoder_heads:
      raise ClmimError(f"config.mae.decoder_width={cfg.decoder_width} is not a multiple of "
                       f"config.mae.decoder_heads={cfg.decoder_heads}.")
    self.decoder = MaeDecoder(cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads,
                              cfg.decoder_mlp_dim, self.encoder.patch_size)

  def frozen(self, path: str) -> bool:
    """The encoder's and the decoder's sin-cos tables stay fixed, as in MAE."""
    return super().frozen(path) or path == "decoder/pos_embed"

  def init(self, rng, images):
    k_enc, k_dec = jax.random.split(rng)
    encoder = self.encoder.init(k_enc, images)["params"]
    tokens = self.encoder.apply({"params": encoder}, images)
    decoder = self.decoder.init(k_dec, tokens)["params"]
    return {"encoder": encoder, "decoder": decoder}, {}

  def pretraining_decoder(self, params):
    """The decoder, kept in the export (`?decoder=1` loads it for the decoder analysis)."""
    d = self.decoder
    return {"kind": "mae", "params": params["decoder"],
            "config": {"width": d.width, "depth": d.depth, "num_heads": d.num_heads,
                       "mlp_dim": d.mlp_dim, "patch_size": d.patch_size}}

  def loss(self, params, state, images, rng, step):
    cfg = self.config.mae
    k_view, k_mask, k_drop = jax.random.split(rng, 3)
    images = normalise(crop_flip_view(k_view, images, tuple(cfg.crop_scale)), self.config.data)
    tokens = self.encoder.grid ** 2
    keep, mask = random_keep(k_mask, images.shape[0], tokens, cfg.mask_ratio)
    latent = self.encoder.apply({"params": params["encoder"]}, images, keep=keep,
                                deterministic=False, rngs={"dropout": k_drop})
    full = scatter_visible(latent, keep, tokens)
    prediction = self.decoder.apply({"params": params["decoder"]}, full, mask)[:, 1:]
    target = pixel_targets(images, self.encoder.patch_size, cfg.norm_pix_loss)
    loss = masked_mse(prediction, target, mask)
    return loss, (state, {"loss": loss, "mask_ratio": mask.mean()})
