"""Training-view augmentations, in JAX so they run on the accelerator inside the train step.

Images are NHWC float32 in [0, 1]; every function takes a PRNG key and acts per image.
The MoCo v3 recipe (random resized crop, flip, colour jitter, grayscale, blur, solarise) is
composed by `contrastive_view`; SimMIM uses only crop + flip (`crop_flip_view`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# A numpy constant, not a jnp array: creating a jnp array at import would start JAX's backends,
# after which jax.distributed.initialize and host_memory.keep_freed_memory can no longer run.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def random_resized_crop(key, images, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """Crops a random area fraction / aspect ratio of each image and resizes it back (bilinear)."""
  batch, height, width, _ = images.shape
  k_area, k_ratio, k_x, k_y = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, (batch,), minval=scale[0], maxval=scale[1])
  log_ratio = jax.random.uniform(k_ratio, (batch,), minval=jnp.log(ratio[0]),
                                 maxval=jnp.log(ratio[1]))
  aspect = jnp.exp(log_ratio)
  crop_w = jnp.clip(jnp.sqrt(area * aspect) * width, 1.0, width)
  crop_h = jnp.clip(jnp.sqrt(area / aspect) * height, 1.0, height)
  left = jax.random.uniform(k_x, (batch,)) * (width - crop_w)
  top = jax.random.uniform(k_y, (batch,)) * (height - crop_h)

  def crop_one(image, top, left, crop_h, crop_w):
    scale_hw = jnp.stack([height / crop_h, width / crop_w])
    translation = -jnp.stack([top, left]) * scale_hw
    return jax.image.scale_and_translate(image, (height, width, 3), (0, 1), scale_hw,
                                         translation, method="linear", antialias=True)

  return jax.vmap(crop_one)(images, top, left, crop_h, crop_w)


def random_flip(key, images):
  """Horizontal flip with probability 1/2."""
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1], images)


def _grayscale(images):
  return jnp.repeat((images @ _LUMA)[..., None], 3, axis=-1)


def _rotate_hue(images, turns):
  """Rotates hue by `turns` of a full circle (per image) in YIQ space."""
  to_yiq = jnp.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
  yiq = images @ to_yiq.T
  angle = 2 * jnp.pi * turns[:, None, None]
  i = yiq[..., 1] * jnp.cos(angle) - yiq[..., 2] * jnp.sin(angle)
  q = yiq[..., 1] * jnp.sin(angle) + yiq[..., 2] * jnp.cos(angle)
  rotated = jnp.stack([yiq[..., 0], i, q], axis=-1)
  return rotated @ jnp.linalg.inv(to_yiq).T


def colour_jitter(key, images, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, prob=0.8):
  """Random brightness, contrast, saturation and hue changes, applied with probability `prob`."""
  batch = images.shape[0]
  keys = jax.random.split(key, 5)
  factor = lambda k, s: jax.random.uniform(k, (batch, 1, 1, 1), minval=1 - s, maxval=1 + s)
  out = images * factor(keys[0], brightness)
  mean = jnp.mean(out @ _LUMA, axis=(1, 2))[:, None, None, None]
  out = (out - mean) * factor(keys[1], contrast) + mean
  gray = _grayscale(out)
  out = (out - gray) * factor(keys[2], saturation) + gray
  out = _rotate_hue(out, jax.random.uniform(keys[3], (batch,), minval=-hue, maxval=hue))
  out = jnp.clip(out, 0.0, 1.0)
  apply = jax.random.bernoulli(keys[4], prob, (batch, 1, 1, 1))
  return jnp.where(apply, out, images)


def random_grayscale(key, images, prob=0.2):
  apply = jax.random.bernoulli(key, prob, (images.shape[0], 1, 1, 1))
  return jnp.where(apply, _grayscale(images), images)


def random_blur(key, images, prob, sigma=(0.1, 2.0), radius=3):
  """Gaussian blur with a per-image sigma (pixels), separable, reflect padding."""
  batch = images.shape[0]
  k_sigma, k_apply = jax.random.split(key)
  sigmas = jax.random.uniform(k_sigma, (batch,), minval=sigma[0], maxval=sigma[1])
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-0.5 * (taps[None] / sigmas[:, None]) ** 2)
  weights = weights / weights.sum(axis=1, keepdims=True)  # [B, 2r+1]
  padded = jnp.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="reflect")
  size = images.shape[1]
  rows = sum(weights[:, t, None, None, None] * padded[:, t:t + size] for t in range(2 * radius + 1))
  cols = sum(weights[:, t, None, None, None] * rows[:, :, t:t + images.shape[2]]
             for t in range(2 * radius + 1))
  apply = jax.random.bernoulli(k_apply, prob, (batch, 1, 1, 1))
  return jnp.where(apply, cols, images)


def random_solarize(key, images, prob, threshold=0.5):
  apply = jax.random.bernoulli(key, prob, (images.shape[0], 1, 1, 1))
  return jnp.where(apply & (images >= threshold), 1.0 - images, images)


def contrastive_view(key, images, cfg, view: int):
  """One MoCo v3 view. `view` 0 or 1 selects the asymmetric blur/solarise probabilities.

  cfg fields: crop_scale (min, max), brightness, contrast, saturation, hue, jitter_prob,
  grayscale_prob, blur_prob (per view), blur_sigma (min, max) in pixels, solarize_prob (per view).
  """
  keys = jax.random.split(key, 6)
  out = random_resized_crop(keys[0], images, tuple(cfg.crop_scale))
  out = random_flip(keys[1], out)
  out = colour_jitter(keys[2], out, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue,
                      cfg.jitter_prob)
  out = random_grayscale(keys[3], out, cfg.grayscale_prob)
  out = random_blur(keys[4], out, cfg.blur_prob[view], tuple(cfg.blur_sigma))
  return random_solarize(keys[5], out, cfg.solarize_prob[view])


def crop_flip_view(key, images, crop_scale=(0.67, 1.0)):
  """SimMIM's and MAE's view: random resized crop and flip."""
  k_crop, k_flip = jax.random.split(key)
  return random_flip(k_flip, random_resized_crop(k_crop, images, crop_scale))
