"""The trainer's library: the optimizer, the update step, the training state at step 0 (or from
another run's encoder), orbax checkpoints and the metrics log. The training loop that uses them
is the job `clmim.jobs.pretrain`; `clmim.jobs.snapshots` and `clmim.jobs.export` restore its
checkpoints with the same pieces.

The objective (`clmim.train.objectives`) owns the model, the augmentations and the loss; these
pieces own everything else.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from clmim.config_checks import path_pattern
from clmim.errors import ClmimError
from clmim.checkpoints import native as export  # clmim's own checkpoint format


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _matches(pattern, path: str) -> bool:
  return pattern is not None and pattern.search("/" + path) is not None


def make_optimizer(config, params, objective):
  """AdamW with linear warm-up and cosine decay. No weight decay on vectors or on parameters whose
  path matches config.no_weight_decay; parameters the objective freezes or config.freeze matches
  get no update at all; an objective with `lr_scale(path)` (fine-tuning's layer-wise decay) has
  each parameter's update — lr and decoupled weight decay alike, as a per-group lr in PyTorch —
  multiplied by it. Paths are "/"-joined and searched with a leading "/" (e.g.
  "/online/encoder/block_0/mlp/fc1/kernel")."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.lr, config.warmup_steps, max(config.total_steps, config.warmup_steps + 1),
      end_value=config.lr * config.final_lr_fraction)
  no_decay = path_pattern(config, "no_weight_decay")
  freeze = path_pattern(config, "freeze")
  decay_mask = jax.tree_util.tree_map_with_path(
      lambda p, x: x.ndim > 1 and not _matches(no_decay, _path_str(p)), params)
  labels = jax.tree_util.tree_map_with_path(
      lambda p, _: "frozen" if objective.frozen(_path_str(p)) or _matches(freeze, _path_str(p))
      else "train", params)
  scales = None
  if objective.LAYERWISE_LR:
    scales = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(objective.lr_scale(_path_str(p)), x.dtype), params)
  adamw = optax.chain(
      optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity(),
      optax.adamw(schedule, b1=0.9, b2=config.beta2, weight_decay=config.weight_decay,
                  mask=decay_mask))
  tx = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)
  if scales is not None:
    tx = optax.chain(tx, optax.stateless(
        lambda updates, _: jax.tree.map(jnp.multiply, updates, scales)))
  return tx, schedule


def make_update(objective, tx, schedule):
  """The training step (to be jitted): (train_state, first_bad, inputs, rng) -> (train_state,
  first_bad, metrics) — the objective's loss and gradient, the optimizer update, the objective's
  state update (MoCo's EMA), and `first_bad`, the first step whose loss was not finite (-1:
  none), carried on the device so that no step waits to check it."""

  def update(train_state, first_bad, inputs, step_rng):
    step = train_state["step"]
    grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
    (_, (state, metrics)), grads = grad_fn(train_state["params"], train_state["state"],
                                           inputs, step_rng, step)
    updates, opt_state = tx.update(grads, train_state["opt_state"], train_state["params"])
    params = optax.apply_updates(train_state["params"], updates)
    state = objective.after_update(params, state, step)
    metrics = {**metrics, "lr": schedule(step), "grad_norm": optax.tree.norm(grads)}
    first_bad = jnp.where((first_bad < 0) & ~jnp.isfinite(metrics["loss"]), step + 1, first_bad)
    return ({"params": params, "state": state, "opt_state": opt_state, "step": step + 1},
            first_bad, metrics)

  return update


def initial_state(config, objective):
  """(train_state, optimizer, lr schedule) at step 0."""
  size = config.data.image_size
  sample = jnp.zeros((2, size, size, 3), jnp.float32)
  # Jitted: run op by op, a ViT's random initialisers cost ~8 s of per-op compilation in every
  # new process (2 cores); one compiled init is ~4 s, and the persistent cache serves it after.
  params, state = jax.jit(objective.init)(jax.random.PRNGKey(config.seed), sample)
  tx, schedule = make_optimizer(config, params, objective)
  train_state = {"params": params, "state": state, "opt_state": tx.init(params),
                 "step": jnp.zeros((), jnp.int32)}
  return train_state, tx, schedule


def initial_encoder(config, objective):
  """The encoder params config.init_encoder names (None when it is ""), checked against the
  encoder this config trains: the same parameter names and shapes, or one error."""
  spec = str(config.get("init_encoder", "") or "")
  if not spec:
    return None
  from clmim.checkpoints import registry  # loads checkpoints: only when asked for
  size = config.data.image_size
  expected = jax.eval_shape(
      lambda: objective.encoder.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  try:  # an objective that needed the checkpoint's architecture has resolved it already
    model = objective.pretrained or registry.resolve(spec)
    export.check_params(expected["params"], model.params, spec)
  except ClmimError as e:
    raise ClmimError(f"config.init_encoder={spec!r} cannot start this config.model: {e}") from None
  return jax.tree.map(jnp.asarray, model.params)


def checkpoint_manager(workdir: str, keep: int):
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1))


def restore(manager, step: int, template, workdir: str):
  """Restores checkpoint `step`; a checkpoint of another model or objective is one error, not
  orbax's traceback (workdirs written before config.json existed are caught here)."""
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(template))
  except Exception as e:  # orbax raises ValueError, KeyError, TypeError, ... for a mismatch
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    raise ClmimError(f"cannot restore step {step} of {workdir}/checkpoints with this config "
                     f"(was it trained with another model or objective?): "
                     f"{(lines[-1] if lines else type(e).__name__)[:300]}; use the run's own "
                     f"config, or a new --workdir to start fresh.") from None


def pretraining_decoder(objective, params):
  """The objective's decoder on the host ({"kind", "params", "config"}, see
  `clmim.train.common.SingleEncoderObjective.pretraining_decoder`), or None."""
  decoder = objective.pretraining_decoder(params)
  return None if decoder is None else {**decoder, "params": jax.device_get(decoder["params"])}


def read_metrics(workdir: str) -> list[dict]:
  """The records of workdir/metrics.jsonl (empty if none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


