"""SimMIM objective: block masks, a mask token, a linear pixel head, L1 on masked pixels
(Xie et al., 2022).

Trainable params: {"encoder", "head"}. No extra state. Exports keep the head beside the encoder
(`pretraining_decoder`; load it with `<export>?decoder=1`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from clmim.data.augment import crop_flip_view
from clmim.errors import ClmimError
from clmim.models.heads import PixelHead, patchify
from clmim.models.masking import block_masks  # noqa: F401 (re-exported)
from clmim.train.common import SingleEncoderObjective, build_encoder, normalise


def reconstruction_loss(encoder, head, encoder_params, head_params, images, rng, config):
  """(L1 on the masked pixels, share of tokens masked) of SimMIM on `images` [B, S, S, 3] in
  [0, 1]: crop + flip, block masks of config.simmim, the mask token in the encoder, the pixel
  head on its patch tokens. Shared by the SimMIM and hybrid objectives."""
  cfg = config.simmim
  k_view, k_mask, k_drop = jax.random.split(rng, 3)
  images = normalise(crop_flip_view(k_view, images, tuple(cfg.crop_scale)), config.data)
  mask = block_masks(k_mask, images.shape[0], encoder.grid, cfg.mask_patch // encoder.patch_size,
                     cfg.mask_ratio)
  tokens = encoder.apply({"params": encoder_params}, images, mask, deterministic=False,
                         rngs={"dropout": k_drop})
  prediction = head.apply({"params": head_params}, tokens[:, 1:])
  error = jnp.abs(prediction - patchify(images, encoder.patch_size))
  weights = mask[..., None].astype(error.dtype)
  loss = (error * weights).sum() / (weights.sum() * error.shape[-1] + 1e-5)
  return loss, mask.mean()


def check_mask_patch(encoder, mask_patch: int) -> None:
  """config.simmim.mask_patch must be a multiple of the patch size that tiles the token grid."""
  patch, grid = encoder.patch_size, encoder.grid
  if mask_patch < patch or mask_patch % patch or grid % (mask_patch // patch):
    raise ClmimError(f"config.simmim.mask_patch={mask_patch}: expected a multiple of the patch "
                     f"size {patch} that tiles the {grid}x{grid} token grid (e.g. "
                     f"{patch * max(1, min(2, grid))}).")


class Objective(SingleEncoderObjective):
  """SimMIM; see the module docstring. `config.simmim` holds the objective's fields."""

  SECTIONS = ("simmim",)

  def __init__(self, config):
    super().__init__(config)
    self.encoder = build_encoder(config)
    check_mask_patch(self.encoder, config.simmim.mask_patch)
    self.head = PixelHead(self.encoder.patch_size)

  def init(self, rng, images):
    k_enc, k_head = jax.random.split(rng)
    encoder = self.encoder.init(k_enc, images)["params"]
    tokens = self.encoder.apply({"params": encoder}, images)
    head = self.head.init(k_head, tokens[:, 1:])["params"]
    return {"encoder": encoder, "head": head}, {}

  def pretraining_decoder(self, params):
    """The pixel head, kept in the export (`?decoder=1` loads it for the decoder analysis)."""
    return {"kind": "simmim", "params": params["head"],
            "config": {"patch_size": self.head.patch_size}}

  def loss(self, params, state, images, rng, step):
    loss, mask_ratio = reconstruction_loss(self.encoder, self.head, params["encoder"],
                                           params["head"], images, rng, self.config)
    return loss, (state, {"loss": loss, "mask_ratio": mask_ratio})
