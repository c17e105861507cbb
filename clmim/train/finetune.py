"""Supervised fine-tuning of a (pretrained) ViT: the MAE/BEiT recipe on the one trainer.

The encoder starts from `config.init_encoder` (any model spec clmim can load: a shipped demo
model, an official checkpoint name such as "mae_vitb16", an export folder), whose architecture
it keeps (config.model sets only the stochastic depth then; data.image_size, data.mean and
data.std must be the checkpoint's), or "" = a random init of config.model, the from-scratch
baseline. A new classifier head is trained with it on labelled images:

- the view: random resized crop (config.finetune.crop_scale) and flip, on the devices;
- Mixup / CutMix over the global batch and label smoothing (clmim/data/mixup.py);
- stochastic depth (config.model.drop_path, linear over blocks) in the encoder;
- layer-wise lr decay: parameter group l of a depth-D encoder gets lr × decay^(D + 1 − l), with
  l = 0 for the patch embedding, cls and register tokens and positions, l = i + 1 for block i, D
  for a shared relative-position bias, D + 1 for the final norm and the head (BEiT's `layer_id`
  rule; register tokens as DINOv2's lr decay places them);
- the head: the cls token ("cls"; refused for an encoder without one) or the mean of the patch
  tokens (register tokens left out) followed by a LayerNorm ("mean", MAE's global pool), then a
  linear layer initialised with std config.finetune.head_init_std.
- a validation pass every config.finetune.eval_every steps and at the end: top-1 and cross-
  entropy on the held-out images, in metrics.jsonl as eval_top1 / eval_loss.

Trainable params: {"encoder", "head"} (+ "fc_norm" with mean pooling). No extra state. Labels:
the synthetic images' "shape" or "texture" (config.finetune.label), or an image folder's / TFDS
split's class label ("label").
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from clmim.checkpoints import registry
from clmim.data import mixup, train_data
from clmim.data.preprocess import resolve_stats
from clmim.data.augment import crop_flip_view
from clmim.config_checks import check_int
from clmim.errors import ClmimError
from clmim.models.layer_norm import LayerNorm
from clmim.train.common import SingleEncoderObjective, build_encoder, normalise

POOLS = ("mean", "cls")
# Encoder parameters that sit before the first block (layer 0 of the lr decay).
_EMBEDDING = ("patch_embed", "cls_token", "reg_token", "pos_embed", "mask_token")


def layer_id(path: str, depth: int) -> int:
  """The lr-decay layer of parameter `path` ("encoder/block_3/mlp/fc1/kernel", "head/kernel")."""
  parts = path.split("/")
  if parts[0] != "encoder" or len(parts) < 2:
    return depth + 1
  if parts[1].startswith("block_"):
    return int(parts[1][len("block_"):]) + 1
  if parts[1] in _EMBEDDING:
    return 0
  if parts[1] == "rel_pos_bias":
    return depth
  return depth + 1


def layer_scale(path: str, depth: int, decay: float) -> float:
  """The lr multiplier of parameter `path` under layer-wise decay `decay` (1 = none)."""
  return float(decay) ** (depth + 1 - layer_id(path, depth))


class ClassifierHead(nn.Module):
  """Pooling, an optional LayerNorm and a linear layer on the encoder's tokens [B, P + N, D]
  (`prefix` = P: the cls token, if any, then the register tokens; the encoder's
  num_prefix_tokens). "cls" pooling reads token 0 (the encoder must have a cls token)."""
  num_classes: int
  pool: str
  init_std: float
  prefix: int = 1

  @nn.compact
  def __call__(self, tokens):
    if self.pool == "cls":
      features = tokens[:, 0]
    else:  # the patch tokens only: registers are no part of the image's global pool
      features = LayerNorm(epsilon=1e-6, name="fc_norm")(tokens[:, self.prefix:].mean(axis=1))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(
        self.init_std), name="linear")(features)


def check_fields(cfg, source: str) -> None:
  """One line for a config.finetune field that cannot work."""
  if cfg.pool not in POOLS:
    raise ClmimError(f"config.finetune.pool={cfg.pool!r}: expected one of {POOLS}.")
  from clmim.data import sources
  labels = sources.get(source).LABELS
  if cfg.label not in labels:
    raise ClmimError(f"config.finetune.label={cfg.label!r}: with config.data.source="
                     f"{source!r} expected one of {labels}.")
  for field, low, high in (("label_smoothing", 0.0, 1.0), ("switch_prob", 0.0, 1.0),
                           ("layer_decay", 0.0, 1.0)):
    value = cfg[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
        or (field == "layer_decay" and value == 0) or (field == "label_smoothing" and value == 1):
      interval = {"label_smoothing": "[0, 1)", "switch_prob": "[0, 1]",
                  "layer_decay": "(0, 1] (1 = no decay)"}[field]
      raise ClmimError(f"config.finetune.{field}={value!r}: expected a number in {interval}.")
  for field in ("mixup_alpha", "cutmix_alpha"):
    value = cfg[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise ClmimError(f"config.finetune.{field}={value!r}: expected a number >= 0 (0 = off).")


def check_pool(cfg, encoder, spec: str) -> None:
  """pool="cls" needs an encoder with a cls token (an average-pooled one, e.g. SigLIP, has none)."""
  if cfg.pool == "cls" and not encoder.class_token:
    source = f"config.init_encoder={spec!r}" if spec else "config.model"
    raise ClmimError(f"config.finetune.pool='cls': the encoder of {source} has no cls token "
                     "(class_token=False); use pool='mean' (the mean of its patch tokens).")


def check_preprocessing(data_cfg, model, spec: str) -> None:
  """The images must be what the pretrained encoder saw: its resolution and normalisation."""
  size = model.vit.image_size
  if data_cfg.image_size != size:
    raise ClmimError(f"config.data.image_size={data_cfg.image_size}: config.init_encoder="
                     f"{spec!r} is a {size} px model; set --config.data.image_size={size}.")
  for field in ("mean", "std"):
    want = resolve_stats(model.preprocessing.get(field, "imagenet"), field, "the checkpoint")
    if not np.allclose(resolve_stats(data_cfg[field], field, "config.data"), want):
      raise ClmimError(f"config.data.{field}={data_cfg[field]!r}: config.init_encoder={spec!r} "
                       f"was trained on images normalised with {field} {want}; set "
                       f"config.data.{field} to that.")


class Objective(SingleEncoderObjective):
  """Fine-tuning; see the module docstring. `config.finetune` holds the objective's fields."""

  SECTIONS = ("finetune",)
  # Validation settings: how a run is watched, not what it trains.
  HOW_NOT_WHAT = ("finetune.eval_every", "finetune.eval_images", "finetune.eval_split",
                  "finetune.eval_path", "finetune.eval_crop_pct")
  LAYERWISE_LR = True
  MODE = "finetune"

  @classmethod
  def check_config(cls, config) -> None:
    """config.finetune's fields (see check_fields) and its validation schedule and size."""
    check_fields(config.finetune, config.data.get("source", "synthetic"))
    from clmim.data import sources  # the source says whether its sets are drawn (need a count)
    check_int(config, "finetune.eval_every", 0, why="0 = only at the end")
    if config.finetune.eval_every % config.log_every:
      raise ClmimError(f"config.finetune.eval_every={config.finetune.eval_every}: expected a "
                       f"multiple of config.log_every={config.log_every} (validation results go "
                       f"into the log records), or 0 (only at the end).")
    drawn = sources.of(config.data).DRAWN
    check_int(config, "finetune.eval_images", 1 if drawn else 0,
              why="" if drawn else "0 = the whole held-out set")

  def __init__(self, config):
    super().__init__(config)
    cfg = config.finetune
    self.check_config(config)
    spec = str(config.get("init_encoder", "") or "")
    if spec:
      self.pretrained = registry.resolve(spec)
      self.encoder = dataclasses.replace(self.pretrained.vit,
                                         drop_path=float(config.model.drop_path))
      check_pool(cfg, self.encoder, spec)
      check_preprocessing(config.data, self.pretrained, spec)
    else:
      self.encoder = build_encoder(config)
      check_pool(cfg, self.encoder, spec)
    # The batch key the trainer passes as "label": a synthetic factor or the class label.
    self.label_key = cfg.label
    self.num_classes = train_data.class_count(config.data, cfg.label)
    self.head = ClassifierHead(self.num_classes, cfg.pool, cfg.head_init_std,
                               prefix=self.encoder.num_prefix_tokens)

  def init(self, rng, images):
    k_enc, k_head = jax.random.split(rng)
    encoder = self.encoder.init(k_enc, images)["params"]
    tokens = self.encoder.apply({"params": encoder}, images)
    return {"encoder": encoder, "head": self.head.init(k_head, tokens)["params"]}, {}

  def frozen(self, path: str) -> bool:
    """Nothing: a sin-cos position table, fixed in pretraining, is fine-tuned like the rest (as
    MAE's and DeiT's fine-tuning code do)."""
    return False

  def lr_scale(self, path: str) -> float:
    """Layer-wise lr decay (see the module docstring); the trainer scales each update by it."""
    return layer_scale(path, self.encoder.depth, self.config.finetune.layer_decay)

  def logits(self, params, images, deterministic=True, rng=None):
    """Class scores [B, C] of normalised `images`."""
    # A cls-pooling head reads the cls token alone: the last block then skips the patch tokens.
    tokens = self.encoder.apply({"params": params["encoder"]}, images,
                                deterministic=deterministic, cls_only=self.head.pool == "cls",
                                rngs=None if rng is None else {"dropout": rng})
    return self.head.apply({"params": params["head"]}, tokens)

  def loss(self, params, state, inputs, rng, step):
    cfg = self.config.finetune
    k_view, k_mix, k_drop = jax.random.split(rng, 3)
    images = normalise(crop_flip_view(k_view, inputs["image"], tuple(cfg.crop_scale)),
                       self.config.data)
    targets = mixup.smoothed_one_hot(inputs["label"], self.num_classes, cfg.label_smoothing)
    images, targets, lam = mixup.mix_batch(k_mix, images, targets, cfg.mixup_alpha,
                                           cfg.cutmix_alpha, cfg.switch_prob)
    logits = self.logits(params, images, deterministic=False, rng=k_drop)
    loss = mixup.soft_cross_entropy(logits, targets)
    # Agreement with each image's own label (on mixed images: the label weighted λ >= 1/2).
    own = jnp.where(lam >= 0.5, inputs["label"], inputs["label"][::-1])
    top1 = jnp.mean(jnp.argmax(logits, -1) == own)
    return loss, (state, {"loss": loss, "train_top1": top1, "mix_lambda": lam})

  def evaluator(self, batch_sharding, replicated, rows):
    """A callable (params, state) -> {"eval_top1", "eval_loss"} over the held-out images, each
    process loading its rows of every batch; the images are opened now (errors before training)."""
    return Evaluator(self, batch_sharding, replicated, rows)


class Evaluator:
  """Top-1 and cross-entropy (no smoothing) on config.finetune's held-out images, every
  `every` steps (config.finetune.eval_every; 0: only at the end) and at the end."""

  def __init__(self, objective: Objective, batch_sharding, replicated, rows):
    config = objective.config
    self.every = int(config.finetune.eval_every)
    self.batch_size, self.rows = config.batch_size, rows
    self.images, self.labels = train_data.held_out(config.data, config.finetune)
    self.sharding = batch_sharding
    data_cfg = config.data

    def sums(params, images, labels, valid):
      logits = objective.logits(params, normalise(images, data_cfg))
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
      correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
      return jnp.sum(correct * valid), jnp.sum(nll * valid)

    self._sums = jax.jit(sums, in_shardings=(replicated, batch_sharding, batch_sharding,
                                             batch_sharding), out_shardings=replicated)

  def __call__(self, params, state) -> dict:
    del state
    count = len(self.labels)
    lo, hi = self.rows
    correct = nll = 0.0
    for start in range(0, count, self.batch_size):
      positions = np.arange(start + lo, start + hi)
      valid = positions < count
      kept = np.minimum(positions, count - 1)  # padding rows repeat the last image, weight 0
      local = (self.images(kept), self.labels[kept].astype(np.int32), valid.astype(np.float32))
      arrays = [jax.make_array_from_process_local_data(self.sharding, a) for a in local]
      batch_correct, batch_nll = self._sums(params, *arrays)
      correct += float(batch_correct)
      nll += float(batch_nll)
    return {"eval_top1": correct / count, "eval_loss": nll / count}
