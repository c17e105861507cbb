"""MoCo v3 objective: two augmented views, projector + predictor with BatchNorm, a momentum
encoder, and the symmetric InfoNCE loss scaled by 2*tau (Chen, Xie & He, 2021).

Trainable params: {"online": {"encoder", "projector"}, "predictor"}.
State: {"momentum": EMA copy of params["online"], "batch_stats": {...}}.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from clmim.data.augment import contrastive_view
from clmim.models.heads import BatchNormMLP
from clmim.models.vit import ViT
from clmim.train import objectives
from clmim.train.common import build_encoder, normalise


class EncoderWithProjector(nn.Module):
  """ViT -> final-normed cls token -> 3-layer BN projector. cls_only (default): the projector
  reads the cls token alone, so the ViT's last block skips the patch tokens' queries and MLP
  (same values, less work); False runs every token through it, as the official code does (kept
  for benchmarks/moco_step_vs_pytorch.py --all_tokens, which measures what that costs)."""
  encoder: ViT
  hidden_dim: int
  out_dim: int
  cls_only: bool = True

  @nn.compact
  def __call__(self, images, train: bool, stochastic_depth: bool = False):
    # Stochastic depth (config.model.drop_path) acts on the online encoder only, never on the
    # momentum encoder, whose outputs are targets.
    cls = self.encoder(images, deterministic=not stochastic_depth,
                       cls_only=self.cls_only)[:, 0]
    return BatchNormMLP(3, self.hidden_dim, self.out_dim, name="projector")(cls, train)


def contrastive_loss(queries, keys, temperature):
  """InfoNCE with the positives on the diagonal, times 2*tau as in MoCo v3."""
  queries = queries / jnp.linalg.norm(queries, axis=1, keepdims=True)
  keys = keys / jnp.linalg.norm(keys, axis=1, keepdims=True)
  logits = queries @ keys.T / temperature
  labels = jnp.arange(queries.shape[0])
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() * 2 * temperature


def momentum_at(step, total_steps, base):
  """Cosine schedule of the EMA momentum from `base` at step 0 to 1 at the end."""
  progress = jnp.minimum(step / max(total_steps, 1), 1.0)
  return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


class Objective(objectives.Objective):
  """MoCo v3; see the module docstring. `config.moco` holds the objective's fields."""

  SECTIONS = ("moco",)

  def __init__(self, config):
    super().__init__(config)
    cfg = config.moco
    self.encoder = build_encoder(config)
    self.online = EncoderWithProjector(self.encoder, cfg.hidden_dim, cfg.out_dim)
    self.predictor = BatchNormMLP(2, cfg.hidden_dim, cfg.out_dim)

  def init(self, rng, images):
    k_online, k_pred = jax.random.split(rng)
    online = self.online.init(k_online, images, train=False)
    embedding = self.online.apply(online, images, train=False)
    predictor = self.predictor.init(k_pred, embedding, train=False)
    params = {"online": online["params"], "predictor": predictor["params"]}
    state = {"momentum": jax.tree.map(jnp.copy, online["params"]),
             "batch_stats": {"online": online["batch_stats"],
                             "momentum": jax.tree.map(jnp.copy, online["batch_stats"]),
                             "predictor": predictor["batch_stats"]}}
    return params, state

  def frozen(self, path: str) -> bool:
    """MoCo v3 keeps the random patch projection frozen (stability) and the sin-cos table fixed."""
    frozen = ["online/encoder/pos_embed"]
    if self.config.moco.freeze_patch_embed:
      frozen.append("online/encoder/patch_embed/")
    return any(path.startswith(p) for p in frozen)

  def loss(self, params, state, images, rng, step):
    k1, k2, k_drop = jax.random.split(rng, 3)
    # A pair [b, 2, S, S, 3] (augment.second_view) gives each view its own source image.
    sources = [images[:, 0], images[:, 1]] if images.ndim == 5 else [images, images]
    views = [normalise(contrastive_view(k, source, self.config.augment, i), self.config.data)
             for i, (k, source) in enumerate(zip((k1, k2), sources))]
    return self.loss_on_views(params, state, views, k_drop, step)

  def loss_on_views(self, params, state, views, k_drop, step):
    """The loss of two normalised views [B, S, S, 3] (no augmentation): online encoder,
    projector and predictor on each, momentum encoder on each, symmetric InfoNCE."""
    cfg = self.config.moco
    stats = dict(state["batch_stats"])
    queries, keys = [], []
    for i, view in enumerate(views):
      z, upd = self.online.apply({"params": params["online"], "batch_stats": stats["online"]},
                                 view, train=True, stochastic_depth=True,
                                 mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.fold_in(k_drop, i)})
      stats["online"] = upd["batch_stats"]
      q, upd = self.predictor.apply({"params": params["predictor"],
                                     "batch_stats": stats["predictor"]},
                                    z, train=True, mutable=["batch_stats"])
      stats["predictor"] = upd["batch_stats"]
      k, upd = self.online.apply({"params": state["momentum"], "batch_stats": stats["momentum"]},
                                 view, train=True, mutable=["batch_stats"])
      stats["momentum"] = upd["batch_stats"]
      queries.append(q)
      keys.append(jax.lax.stop_gradient(k))
    loss = (contrastive_loss(queries[0], keys[1], cfg.temperature)
            + contrastive_loss(queries[1], keys[0], cfg.temperature))
    momentum = momentum_at(step, self.config.total_steps, cfg.momentum)
    return loss, ({**state, "batch_stats": stats}, {"loss": loss, "momentum": momentum})

  def after_update(self, params, state, step):
    m = momentum_at(step, self.config.total_steps, self.config.moco.momentum)
    ema = jax.tree.map(lambda k, q: m * k + (1 - m) * q, state["momentum"], params["online"])
    return {**state, "momentum": ema}

  def encoder_params(self, params, state):
    """The analysed encoder: the online (base) encoder, as in the official checkpoints."""
    return params["online"]["encoder"]

  def with_encoder(self, params, state, encoder):
    """(params, state) with `encoder` as the online and the momentum encoder (config.init_encoder)."""
    params = {**params, "online": {**params["online"], "encoder": encoder}}
    momentum = {**state["momentum"], "encoder": jax.tree.map(jnp.copy, encoder)}
    return params, {**state, "momentum": momentum}
