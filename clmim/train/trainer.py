"""The one trainer: self-supervised pretraining of a ViT with any objective in clmim/train/.

Reads top to bottom: objective, mesh, input pipeline, optimizer, update step, checkpoint, loop.
The objective is `clmim.train.<config.objective>.Objective` (MoCo v3, SimMIM, ...), which owns
the model, the augmentations and the loss; the trainer owns everything else.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from clmim import host_memory, preflight
from clmim.atomic import write_json_atomic
from clmim.data import sources, train_data
from clmim.errors import ClmimError
from clmim.checkpoints import native as export  # clmim's own checkpoint format
from clmim.models.vit import vit_fields
from clmim.train import tensorboard


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
  no_decay = preflight.path_pattern(config, "no_weight_decay")
  freeze = preflight.path_pattern(config, "freeze")
  decay_mask = jax.tree_util.tree_map_with_path(
      lambda p, x: x.ndim > 1 and not _matches(no_decay, _path_str(p)), params)
  labels = jax.tree_util.tree_map_with_path(
      lambda p, _: "frozen" if objective.frozen(_path_str(p)) or _matches(freeze, _path_str(p))
      else "train", params)
  scales = None
  if hasattr(objective, "lr_scale"):
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


def objectives() -> list[str]:
  """The objectives clmim can train: the modules of clmim/train/ that define an Objective."""
  folder = os.path.dirname(os.path.abspath(__file__))
  names = [f[:-3] for f in sorted(os.listdir(folder)) if f.endswith(".py")]
  return [n for n in names
          if "\nclass Objective" in open(os.path.join(folder, f"{n}.py")).read()]


def load_objective(config):
  """The `Objective` of clmim/train/<config.objective>.py."""
  try:
    module = importlib.import_module(f"clmim.train.{config.objective}")
  except ModuleNotFoundError as e:
    raise ClmimError(f"config.objective={config.objective!r}: no module clmim/train/"
                     f"{config.objective}.py (expected one of {', '.join(objectives())}).") from e
  return module.Objective(config)


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
    model = getattr(objective, "pretrained", None) or registry.resolve(spec)
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


def export_checkpoint(config, workdir: str, step=None, out_dir=None, invocation=None) -> str:
  """Exports the encoder of orbax checkpoint `step` (default: latest) of a training workdir."""
  preflight.check_run(config, workdir, jax.device_count())
  steps = preflight.checkpoint_steps(workdir)  # looked up first: orbax would create the folder
  step = (steps[-1] if steps else None) if step is None else step
  if step is None or step not in steps:
    raise ClmimError(f"No checkpoint{'' if step is None else f' of step {step}'} in "
                     f"{workdir}/checkpoints to export (it has {steps or 'none'}).")
  objective = load_objective(config)
  manager = checkpoint_manager(workdir, config.keep_checkpoints)
  train_state, _, _ = initial_state(config, objective)
  train_state = restore(manager, step, train_state, workdir)
  encoder = objective.encoder_params(train_state["params"], train_state["state"])
  metrics = read_metrics(workdir)
  record = next((m for m in reversed(metrics) if m["step"] <= step), {})
  out_dir = out_dir or os.path.join(workdir, f"export_step_{step}")
  return export.save(out_dir, config, jax.device_get(encoder), vit_fields(objective.encoder),
                     steps=int(step), final_loss=record.get("loss"), invocation=invocation,
                     extra={"training_time_s": record.get("elapsed_s")},
                     decoder=pretraining_decoder(objective, train_state["params"]))


def pretraining_decoder(objective, params):
  """The objective's decoder on the host ({"kind", "params", "config"}, see
  `clmim.train.common.SingleEncoderObjective.pretraining_decoder`), or None."""
  decoder = getattr(objective, "pretraining_decoder", lambda _: None)(params)
  return None if decoder is None else {**decoder, "params": jax.device_get(decoder["params"])}


def read_metrics(workdir: str) -> list[dict]:
  """The records of workdir/metrics.jsonl (empty if none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class PreemptionNotice:
  """Notes a SIGTERM (a scheduler's or a cloud's preemption notice) or a SIGINT (Ctrl-C)
  instead of dying at once, so the loop can save a checkpoint first; `close` restores the
  previous handlers. A SIGINT that comes while a stop is pending (the second Ctrl-C, e.g.
  during a slow save) raises KeyboardInterrupt at once: the user is never trapped. A signal the
  process ignores (SIG_IGN, e.g. SIGINT of a job started with `&`) stays ignored."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_name = None  # the first stop signal noted: "SIGTERM" or "SIGINT"
    self._previous = {}
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread
      for signum in self.SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
          self._previous[signum] = signal.signal(signum, self._note)

  @property
  def requested(self) -> bool:
    """Whether a stop signal came (to this process)."""
    return self.signal_name is not None

  def _note(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now, without waiting for the save
    self.signal_name = self.signal_name or signal.Signals(signum).name

  def agreed(self, log_step: bool) -> bool:
    """Whether to save and stop after this step. One process: as soon as the notice came.
    Several: at a log step, if any process got it — every process must save the same step."""
    if jax.process_count() == 1:
      return self.requested
    if not log_step:
      return False
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))

  def close(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def summary_line(records: list[dict], objective: str, out: str | None, name: str | None = None,
                 eval_images: int | None = None) -> str:
  """The line a finished run prints: its steps, wall time (all sessions), final loss and, for
  fine-tuning, the last held-out top-1 and loss, then where the encoder was exported.
  `records`: metrics.jsonl's."""
  last = records[-1] if records else {}
  what = "fine-tuning" if objective == "finetune" else f"{objective} pretraining"
  parts = [f"Finished {last.get('step', 0)} steps of {what}"
           + (f" in {last['elapsed_s']:.1f} s" if last.get("elapsed_s") is not None else "")]
  if last.get("loss") is not None:
    parts.append(f"final loss {last['loss']:.4f}")
  evaluated = next((r for r in reversed(records) if "eval_top1" in r), None)
  if evaluated is not None:
    about = [f"loss {evaluated['eval_loss']:.4f}"]
    if eval_images:
      about.append(f"{eval_images} images")
    if evaluated is not last:  # a run that ended between validation passes
      about.append(f"at step {evaluated['step']}")
    parts.append(f"held-out top-1 {evaluated['eval_top1']:.3f} ({', '.join(about)})")
  line = ", ".join(parts) + "."
  if out:
    line += f" Exported encoder{f' {name!r}' if name else ''} to {out}"
  return line


def train(config, workdir: str, invocation: dict | None = None) -> dict:
  """Pretrains per `config` (see configs/pretrain_*.py), resuming from `workdir` if possible.

  Writes the config to workdir/config.json (a later run with another model, objective or data
  refuses to resume), orbax checkpoints to workdir/checkpoints, a metrics log
  workdir/metrics.jsonl and, at the end, the encoder as an exported checkpoint
  (workdir/export/) with its manifest — the files by process 0 alone, the checkpoints by every
  process. Each process loads only its rows of every step (clmim/data/train_data.py), so a
  resumed run reads what the uninterrupted one would have. SIGTERM or Ctrl-C (SIGINT) saves
  the current step and stops (one ClmimError line; a second Ctrl-C stops at once). A finished
  run prints one line: steps, time, final loss (fine-tuning: held-out top-1 and loss) and the
  export. MAE, SimMIM and hybrid exports keep the pretraining decoder too. Returns the final
  metrics.
  """
  preflight.check_run(config, workdir, jax.device_count())
  # --- Objective ------------------------------------------------------------------------
  objective = load_objective(config)
  resuming = bool(preflight.checkpoint_steps(workdir))
  encoder = None if resuming else initial_encoder(config, objective)  # checked before any step

  # --- Mesh: one data axis over every device; the batch is split across it ---------------
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  preflight.check_int(config, "batch_size", 1, mesh.size)
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  # --- Input pipeline: this process's rows of every step (clmim/data/train_data.py) --------
  data_cfg = config.data
  rows = train_data.local_rows(config.batch_size, jax.process_index(), jax.process_count())
  source = sources.of(data_cfg)
  # Opened (listed, indexed) now: a missing folder fails before anything compiles.
  dataset = source.training_images(data_cfg)
  writer = jax.process_index() == 0  # logs, the config record and the export: process 0 only
  # A supervised objective (fine-tuning) reads each batch's labels and is validated on held-out
  # images, opened here too: a missing or unlabelled set fails before anything is written.
  label_key = getattr(objective, "label_key", None)
  labels = source.training_labels(dataset, "config.data") if label_key else None
  evaluator = objective.evaluator(batch_sharding, replicated, rows) \
      if hasattr(objective, "evaluator") else None
  eval_every = int(config.finetune.eval_every) if evaluator is not None else 0

  # --- Parameters, optimizer, checkpoint --------------------------------------------------
  rng = jax.random.PRNGKey(config.seed)
  train_state, tx, schedule = initial_state(config, objective)
  if encoder is not None:  # a fresh run that starts from another run's encoder
    params, state = objective.with_encoder(train_state["params"], train_state["state"], encoder)
    train_state = {**train_state, "params": params, "state": state}
  os.makedirs(workdir, exist_ok=True)
  manager = checkpoint_manager(workdir, config.keep_checkpoints)
  if manager.latest_step() is not None:
    train_state = restore(manager, manager.latest_step(), train_state, workdir)
    print(f"Resumed from step {manager.latest_step()} in {workdir}/checkpoints")
  # Recorded once the checkpoints are known to fit: a refused resume must not relabel the run.
  if writer:
    write_json_atomic(os.path.join(workdir, preflight.CONFIG_RECORD), config.to_dict())
  train_state = jax.device_put(train_state, replicated)
  start_step = int(train_state["step"])

  # --- Update step ------------------------------------------------------------------------
  update = jax.jit(make_update(objective, tx, schedule),
                   in_shardings=(replicated, replicated, batch_sharding, replicated),
                   out_shardings=(replicated, replicated, replicated), donate_argnums=(0,))
  # The first step whose loss was not finite (-1: none), carried by the step on the device so
  # that no step waits for it; read before every log record and every checkpoint, so nothing
  # written after a divergence holds its parameters.
  first_bad = jax.device_put(jnp.asarray(-1, jnp.int32), replicated)

  # --- Loop -------------------------------------------------------------------------------
  log_path = os.path.join(workdir, "metrics.jsonl")
  kept = [r for r in read_metrics(workdir) if r["step"] <= start_step]
  if writer:
    with open(log_path, "w") as f:  # drop records past the checkpoint we resume from
      f.writelines(json.dumps(r) + "\n" for r in kept)
  augment = config.get("augment", {})
  second_view = str(augment.get("second_view", ""))
  stream = source.training_batches(dataset, config, start_step, rows, labels)
  metrics, last_eval, started = {}, {}, time.time()
  # Wall time of earlier sessions of this run, so a resumed run reports its total cost.
  earlier_s = kept[-1].get("elapsed_s", 0.0) if kept else 0.0
  bar = tqdm(range(start_step, config.total_steps), initial=start_step, total=config.total_steps,
             desc="finetune" if config.objective == "finetune" else f"pretrain {config.objective}",
             unit="step", dynamic_ncols=True,
             disable=not writer)
  preemption = PreemptionNotice()
  scalars = tensorboard.ScalarWriter(workdir, writer and config.get("tensorboard", False))
  try:
    for step in bar:
      batch = next(stream)
      # With a second view each image comes as a pair [b, 2, S, S, 3]: view 0 the image, view 1
      # its second rendering (augment.second_view); the objective augments one view of each.
      images = np.stack([batch["image"], batch["second"]], axis=1) if second_view else \
          batch["image"]
      # This process's rows; the random views and masks are drawn inside the step for the
      # global batch from (seed, step), so any number of processes trains the same run.
      inputs = jax.make_array_from_process_local_data(batch_sharding, images)
      if label_key:
        inputs = {"image": inputs, "label": jax.make_array_from_process_local_data(
            batch_sharding, batch[label_key])}
      train_state, first_bad, metrics = update(train_state, first_bad, inputs,
                                               jax.random.fold_in(rng, step))
      log_now = (step + 1) % config.log_every == 0 or step + 1 == config.total_steps
      stopping = preemption.agreed(log_now)
      saving = stopping or (step + 1) % config.checkpoint_every == 0 \
          or step + 1 == config.total_steps
      if (log_now or saving) and int(first_bad) >= 0:
        manager.wait_until_finished()
        saved = manager.latest_step()
        raise ClmimError(f"Training diverged: the loss was not finite at step "
                         f"{int(first_bad)}; nothing after it was written (latest checkpoint: "
                         f"{saved if saved is not None else 'none'}). Lower config.lr or raise "
                         f"config.warmup_steps.")
      if log_now:
        metrics = {k: float(v) for k, v in metrics.items()}
        images_per_s = (step + 1 - start_step) * config.batch_size / (time.time() - started)
        record = {"step": step + 1, **metrics, "images_per_s": images_per_s,
                  "elapsed_s": round(earlier_s + time.time() - started, 1)}
        if evaluator is not None and (step + 1 == config.total_steps or (
            eval_every and (step + 1) % eval_every == 0)):
          last_eval = evaluator(train_state["params"], train_state["state"])
          record.update(last_eval)
        if writer:
          with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars.write(step + 1, {k: v for k, v in record.items() if k != "step"})
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{images_per_s:.0f}")
      if saving:
        # From one host copy: every device holds the replicated state, and orbax would write
        # each array as one slice per device (3.7 s instead of ~0.2 s per save on 8 CPU devices).
        manager.save(step + 1, args=ocp.args.StandardSave(jax.device_get(train_state)))
      if stopping:
        if preemption.signal_name == "SIGINT":  # someone is watching: say why it waits
          bar.write(f"Ctrl-C: saving the checkpoint of step {step + 1} before stopping "
                    f"(Ctrl-C again stops at once, without it).", file=sys.stderr)
        manager.wait_until_finished()
        # Several processes: the one that got the signal may be another.
        stopped = ClmimError(f"Stopped by {preemption.signal_name or 'a stop signal'} after "
                             f"step {step + 1}: checkpoint saved in {workdir}/checkpoints; run "
                             f"the same command again to resume.")
        if preemption.signal_name == "SIGINT":
          stopped.exit_status = 130  # the shell's 128 + SIGINT, as clmim.main's other Ctrl-Cs
        raise stopped
    manager.wait_until_finished()
  finally:
    preemption.close()
    scalars.close()
    bar.close()

  final = {k: float(v) for k, v in metrics.items()} if metrics else {}
  final.update(last_eval)
  encoder = objective.encoder_params(train_state["params"], train_state["state"])
  records = read_metrics(workdir)
  elapsed = (records or [{}])[-1].get("elapsed_s")
  encoder = jax.device_get(encoder)
  decoder = pretraining_decoder(objective, train_state["params"])
  if writer:
    out = export.save(os.path.join(workdir, "export"), config, encoder,
                      vit_fields(objective.encoder), steps=int(train_state["step"]),
                      final_loss=final.get("loss"), invocation=invocation,
                      # what the time depends on most, after the machine (clmim/host_memory.py)
                      extra={"training_time_s": elapsed, "host_memory": host_memory.status()},
                      decoder=decoder)
    name = export.read_manifest(out)[0].get("name")
    print(summary_line(records, config.objective, out, name,
                       len(evaluator.labels) if evaluator is not None else None))
  return final
