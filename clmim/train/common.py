"""Pieces every objective shares: building the encoder from a config and normalising inputs."""
from __future__ import annotations

import jax.numpy as jnp

from clmim.models.vit import build_vit

# Mean/std presets accepted by `data.mean` / `data.std`.
NORMALISATION = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                 "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def model_fields(model_cfg) -> dict:
  """The ViT fields of a `config.model` ConfigDict (variant plus explicit overrides)."""
  fields = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
  return fields


def build_encoder(model_cfg):
  """Builds the ViT described by `config.model` (see `clmim.models.vit.build_vit`)."""
  fields = model_fields(model_cfg)
  return build_vit(fields.pop("variant", None), **fields)


def mean_std(data_cfg):
  """Resolves data.mean/data.std ("imagenet", "half" or 3-tuples) to two tuples."""
  mean, std = data_cfg.mean, data_cfg.std
  mean = NORMALISATION[mean][0] if isinstance(mean, str) else tuple(mean)
  std = NORMALISATION[std][1] if isinstance(std, str) else tuple(std)
  return mean, std


def normalise(images, data_cfg):
  """[0, 1] images -> (x - mean) / std."""
  mean, std = mean_std(data_cfg)
  return (images - jnp.asarray(mean)) / jnp.asarray(std)
