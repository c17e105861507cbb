"""Pieces the objectives share: building the encoder from a config, normalising inputs, and the
plumbing of objectives with one encoder and no extra state."""
from __future__ import annotations

import jax.numpy as jnp

from clmim.data.preprocess import resolve_stats
from clmim.errors import ClmimError
from clmim.models.vit import build_vit
from clmim.train import objectives


def build_encoder(config):
  """The ViT of a pretraining config: `config.model.variant` sets the size and patch, the
  `config.model` fields the user set (not None) override it, and `config.data.image_size` is
  the resolution (one field for model and data). See `clmim.models.vit.build_vit`."""
  fields = dict(config.model.to_dict())
  variant = fields.pop("variant", None) or None
  try:
    vit = build_vit(variant, image_size=config.data.image_size, **fields)
  except ClmimError as e:
    raise ClmimError(f"config.model: {e}") from None
  if vit.image_size % vit.patch_size:
    raise ClmimError(f"config.data.image_size={vit.image_size} is not a multiple of the patch "
                     f"size {vit.patch_size} (config.model.variant={variant!r}, "
                     f"config.model.patch_size={config.model.patch_size}).")
  if vit.width % vit.num_heads:
    raise ClmimError(f"config.model: width {vit.width} is not divisible by {vit.num_heads} heads.")
  return vit


def mean_std(data_cfg):
  """Resolves data.mean/data.std ("imagenet", "half" or 3-tuples) to two tuples."""
  return (resolve_stats(data_cfg.mean, "mean", "config.data"),
          resolve_stats(data_cfg.std, "std", "config.data"))


def normalise(images, data_cfg):
  """[0, 1] images -> (x - mean) / std."""
  mean, std = mean_std(data_cfg)
  return (images - jnp.asarray(mean)) / jnp.asarray(std)


class SingleEncoderObjective(objectives.Objective):
  """What an objective whose params are {"encoder", its heads} and that keeps no extra state
  shares (SimMIM, MAE, fine-tuning): only a sin-cos position table frozen, no state update, the
  encoder under "encoder", no pretraining decoder to export unless the objective says so."""

  def frozen(self, path: str) -> bool:
    """A fixed sin-cos position table stays fixed (stored as a param, like the official files)."""
    return path == "encoder/pos_embed" and self.encoder.position_embedding == "sincos"

  def encoder_params(self, params, state):
    return params["encoder"]

  def with_encoder(self, params, state, encoder):
    """(params, state) with `encoder` as the encoder (config.init_encoder); heads stay new."""
    return {**params, "encoder": encoder}, state
