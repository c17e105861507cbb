"""Mixup, CutMix and label smoothing for fine-tuning, in JAX inside the train step.

As the MAE/BEiT fine-tuning recipes use them (timm's `Mixup` in its default "batch" mode): one
mixing weight λ per step for the whole global batch, image i mixed with image B-1-i (the batch
reversed), and per step either Mixup (λ ~ Beta(mixup_alpha, mixup_alpha); images blended) or
CutMix (λ ~ Beta(cutmix_alpha, cutmix_alpha); a box of area ≈ (1 - λ) of the image pasted from
the partner, λ then corrected to the share of pixels actually kept) — CutMix with probability
`switch_prob` when both alphas are positive. Targets are label-smoothed one-hots mixed with the
same λ. Because the pairing is over the global batch, the result does not depend on how the
batch is split over devices or processes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def smoothed_one_hot(labels, num_classes: int, smoothing: float):
  """[B, C] targets: 1 - smoothing + smoothing/C on the label, smoothing/C elsewhere."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(key, height: int, width: int, lam):
  """(top, left, bottom, right) of a box of area ≈ (1 - lam) * H * W, centred uniformly at
  random and clipped to the image (so its area can be smaller)."""
  k_y, k_x = jax.random.split(key)
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (cut * height).astype(jnp.int32), (cut * width).astype(jnp.int32)
  centre_y = jax.random.randint(k_y, (), 0, height)
  centre_x = jax.random.randint(k_x, (), 0, width)
  top, bottom = jnp.clip(centre_y - cut_h // 2, 0, height), jnp.clip(centre_y + cut_h // 2, 0,
                                                                      height)
  left, right = jnp.clip(centre_x - cut_w // 2, 0, width), jnp.clip(centre_x + cut_w // 2, 0,
                                                                     width)
  return top, left, bottom, right


def mix_batch(key, images, targets, mixup_alpha: float, cutmix_alpha: float,
              switch_prob: float = 0.5):
  """(mixed images [B, H, W, C], mixed targets [B, K], λ) for one step; see the module doc.

  With both alphas 0 the batch comes back unchanged (λ = 1)."""
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets, jnp.ones((), jnp.float32)
  k_switch, k_mix, k_cut, k_box = jax.random.split(key, 4)
  use_cutmix = (jax.random.uniform(k_switch) < switch_prob) if mixup_alpha > 0 and \
      cutmix_alpha > 0 else jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cutmix = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
  partner_images, partner_targets = images[::-1], targets[::-1]
  _, height, width, _ = images.shape
  top, left, bottom, right = cutmix_box(k_box, height, width, lam_cutmix)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  kept_share = 1.0 - (bottom - top) * (right - left) / (height * width)
  cut = jnp.where(inside[None, :, :, None], partner_images, images)
  blended = lam_mixup * images + (1.0 - lam_mixup) * partner_images
  lam = jnp.where(use_cutmix, kept_share, lam_mixup).astype(jnp.float32)
  mixed = jnp.where(use_cutmix, cut, blended)
  return mixed, lam * targets + (1.0 - lam) * partner_targets, lam


def soft_cross_entropy(logits, targets):
  """Mean over the batch of -sum_k targets_k log softmax(logits)_k."""
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1))
