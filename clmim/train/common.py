"""Pieces every objective shares: building the encoder from a config and normalising inputs."""
from __future__ import annotations

import jax.numpy as jnp

from clmim.data.preprocess import resolve_stats
from clmim.models.vit import build_vit


def build_encoder(model_cfg):
  """Builds the ViT described by `config.model` (see `clmim.models.vit.build_vit`)."""
  fields = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
  return build_vit(fields.pop("variant", None) or None, **fields)


def mean_std(data_cfg):
  """Resolves data.mean/data.std ("imagenet", "half" or 3-tuples) to two tuples."""
  return (resolve_stats(data_cfg.mean, "mean", "config.data"),
          resolve_stats(data_cfg.std, "std", "config.data"))


def normalise(images, data_cfg):
  """[0, 1] images -> (x - mean) / std."""
  mean, std = mean_std(data_cfg)
  return (images - jnp.asarray(mean)) / jnp.asarray(std)
