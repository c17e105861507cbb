"""The CL + MIM hybrid: L = (1 - λ) L_MIM + λ L_CL on one shared ViT (Park et al., 2023, Sec. 5).

The MIM branch is SimMIM (`clmim.train.simmim.reconstruction_loss`: block masks, the mask token,
a linear pixel head, L1 on masked pixels) on a crop of each image; the CL branch is MoCo v3
(`clmim.train.moco_v3.Objective`: two augmented views, projector, predictor, momentum encoder,
InfoNCE × 2τ) on two views. Both branches read the online encoder's params, so the gradient of L
reaches the backbone from both; λ = `config.hybrid.weight` (0: SimMIM alone, 1: MoCo v3 alone;
a branch with weight 0 is not computed). Both losses are logged (`loss_mim`, `loss_cl`).

Trainable params: {"online": {"encoder", "projector"}, "predictor", "head"}.
State: MoCo v3's (momentum encoder and BatchNorm statistics). Exports keep the pixel head beside
the encoder when λ < 1 (`<export>?decoder=1` loads it as a SimMIM decoder).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from clmim.errors import ClmimError
from clmim.models.heads import PixelHead
from clmim.train import moco_v3, objectives, simmim


class Objective(objectives.Objective):
  """The hybrid; see the module docstring. Fields: config.hybrid.weight (λ), config.moco,
  config.simmim, config.augment (the MoCo views)."""

  SECTIONS = ("moco", "simmim", "hybrid")

  def __init__(self, config):
    weight = config.hybrid.weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
      raise ClmimError(f"config.hybrid.weight={weight!r}: expected λ in [0, 1] (0 = SimMIM "
                       f"alone, 1 = MoCo v3 alone).")
    super().__init__(config)
    self.weight = float(weight)
    self.moco = moco_v3.Objective(config)
    self.encoder = self.moco.encoder
    if not self.encoder.use_mask_token:
      raise ClmimError("config.model.use_mask_token=False: the hybrid's SimMIM branch needs the "
                       "encoder's mask token (set it to True).")
    simmim.check_mask_patch(self.encoder, config.simmim.mask_patch)
    self.head = PixelHead(self.encoder.patch_size)

  def init(self, rng, images):
    k_moco, k_head = jax.random.split(rng)
    params, state = self.moco.init(k_moco, images)
    tokens = self.encoder.apply({"params": params["online"]["encoder"]}, images)
    params["head"] = self.head.init(k_head, tokens[:, 1:])["params"]
    return params, state

  def frozen(self, path: str) -> bool:
    return self.moco.frozen(path)

  def loss(self, params, state, images, rng, step):
    k_cl, k_mim = jax.random.split(rng)
    total, metrics = 0.0, {}
    if self.weight > 0:
      cl, (state, cl_metrics) = self.moco.loss(
          {"online": params["online"], "predictor": params["predictor"]}, state, images, k_cl,
          step)
      total += self.weight * cl
      metrics.update(loss_cl=cl, momentum=cl_metrics["momentum"])
    if self.weight < 1:
      # A pair (augment.second_view) gives the MIM branch its first image.
      mim, mask_ratio = simmim.reconstruction_loss(
          self.encoder, self.head, params["online"]["encoder"], params["head"],
          images[:, 0] if images.ndim == 5 else images, k_mim, self.config)
      total += (1 - self.weight) * mim
      metrics.update(loss_mim=mim, mask_ratio=mask_ratio)
    total = jnp.asarray(total, jnp.float32)
    return total, (state, {"loss": total, **metrics})

  def after_update(self, params, state, step):
    return self.moco.after_update(params, state, step)

  def encoder_params(self, params, state):
    return self.moco.encoder_params(params, state)

  def pretraining_decoder(self, params):
    """The MIM branch's pixel head (SimMIM's), kept in the export; None at λ = 1, where the
    MIM branch never ran and the head is its random init."""
    if self.weight >= 1:
      return None
    return {"kind": "simmim", "params": params["head"],
            "config": {"patch_size": self.head.patch_size}}

  def with_encoder(self, params, state, encoder):
    """(params, state) with `encoder` as the online and momentum encoder; heads stay new."""
    return self.moco.with_encoder(params, state, encoder)
