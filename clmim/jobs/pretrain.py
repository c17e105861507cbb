"""Mode "pretrain" (and "finetune"): the training loop of any objective, and the checks of a
pretraining config.

Reads top to bottom: the config's checks and what a resumed run must share; then the run:
objective, mesh, input stream, state, update step, loop, export. The pieces the loop uses
(optimizer, update step, state, checkpoints) are the library `clmim.train.trainer`; the
objective (`clmim.train.objectives`) owns the model, the augmentations and the loss.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from clmim import host_memory, jobs, preflight
from clmim.atomic import write_json_atomic
from clmim.checkpoints import native as export  # clmim's own checkpoint format
from clmim.config_checks import check_int, path_pattern
from clmim.data import sources, train_data
from clmim.errors import ClmimError
from clmim.models.vit import vit_fields
from clmim.train import objectives, tensorboard, trainer

# The trainer's own sections and fields that fix what a run computes; the objective adds its
# SECTIONS (clmim.train.objectives.Objective).
TRAINER_SECTIONS = ("objective", "seed", "init_encoder", "batch_size", "model", "data", "augment")
# Trainer fields newer than some recorded runs, with the value that reproduces those runs.
TRAINER_ADDED_LATER = {"augment.second_view_ramp": [0, 0], "init_encoder": "",
                       "data.source": "synthetic"}


def check_config(config, mode: str, devices: int) -> None:
  """Every field a pretraining config's jobs read, checked before anything is loaded: the
  objective against the mode, the trainer's numbers and patterns, the data source's fields,
  the objective's section."""
  objective = objectives.get(config.objective)
  wanted = jobs.JOBS[mode].objective_mode
  if wanted is not None and objective.MODE != wanted:
    others = [name for name in objectives.NAMES if objectives.get(name).MODE == wanted]
    raise ClmimError(f"config.mode={mode!r} with config.objective={config.objective!r}: that "
                     f"objective is trained by mode {objective.MODE!r}; mode {mode!r} trains "
                     f"the objective{'s' if len(others) > 1 else ''} {', '.join(others)}.")
  source = sources.of(config.data)
  source.check(config.data)
  check_int(config, "batch_size", 1, devices)
  for field in ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                "snapshot_images", "data.image_size", "data.num_train_images",
                "data.render_workers", "data.read_threads"):
    check_int(config, field, 1)
  check_int(config, "warmup_steps", 0)
  path_pattern(config, "no_weight_decay")
  path_pattern(config, "freeze")
  check_second_view(config)
  objective.check_config(config)
  source.check_training(config.data, str(config.get("augment", {}).get("second_view", "")))
  tensorboard.check_available(config)


def check_second_view(config) -> None:
  """config.augment.second_view (MoCo) must name a second view the procedural data can render."""
  from clmim.data.synthetic import parse_second_view  # numpy only: cheap
  if "augment" not in config or "second_view" not in config.augment:
    return
  try:
    parse_second_view(str(config.augment.second_view))
  except ClmimError as e:
    raise ClmimError(f"config.augment.{e}") from None
  ramp = config.augment.get("second_view_ramp", (0, 0))
  if (not isinstance(ramp, (tuple, list)) or len(ramp) != 2
      or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ramp)):
    raise ClmimError(f"config.augment.second_view_ramp={ramp!r}: expected (start, end), two "
                     f"steps >= 0 ((0, 0) = the second view for every pair from step 0).")


def resume_fields(config) -> preflight.ResumeFields:
  """What a saved run must share with `config` to be resumed, exported or snapshotted: the
  trainer's sections and the objective's, less the fields the objective and the data sources
  declare harmless, with the defaults of fields added after a run was recorded. `config`: a
  ConfigDict or its dict."""
  objective = objectives.get(config["objective"])
  return preflight.ResumeFields(
      sections=TRAINER_SECTIONS + tuple(s for s in objective.SECTIONS
                                        if s not in TRAINER_SECTIONS),
      how_not_what=sources.how_not_what() + tuple(objective.HOW_NOT_WHAT),
      added_later={**TRAINER_ADDED_LATER, **sources.added_later(), **objective.ADDED_LATER})


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


class _Inputs:
  """A training run's input side: this process's rows of every step, the source's opened
  images, the labels a supervised objective reads, and how one host batch becomes the step's
  sharded inputs."""

  def __init__(self, config, objective, batch_sharding):
    self.config, self.sharding = config, batch_sharding
    self.rows = train_data.local_rows(config.batch_size, jax.process_index(),
                                      jax.process_count())
    self.source = sources.of(config.data)
    # Opened (listed, indexed) now: a missing folder fails before anything compiles.
    self.dataset = self.source.training_images(config.data)
    # A supervised objective (fine-tuning) reads each batch's labels.
    self.label_key = objective.label_key
    self.labels = self.source.training_labels(self.dataset, "config.data") \
        if self.label_key else None
    self.second_view = str(config.get("augment", {}).get("second_view", ""))

  def stream(self, start_step: int):
    """The endless host batches from `start_step` on (the same rows a fresh run reads there)."""
    return self.source.training_batches(self.dataset, self.config, start_step, self.rows,
                                        self.labels)

  def sharded(self, batch):
    """The step's inputs from this process's `batch`. With a second view each image comes as
    a pair [b, 2, S, S, 3]: view 0 the image, view 1 its second rendering (the objective
    augments one view of each). The random views and masks are drawn inside the step for the
    global batch from (seed, step), so any number of processes trains the same run."""
    images = np.stack([batch["image"], batch["second"]], axis=1) if self.second_view else \
        batch["image"]
    inputs = jax.make_array_from_process_local_data(self.sharding, images)
    if self.label_key:
      inputs = {"image": inputs, "label": jax.make_array_from_process_local_data(
          self.sharding, batch[self.label_key])}
    return inputs


def _start(config, objective, workdir: str, encoder, replicated):
  """(train_state on the devices, optimizer, schedule, checkpoint manager): step 0 (from
  config.init_encoder's `encoder` if given) or the workdir's latest checkpoint. The config is
  recorded once the checkpoints are known to fit: a refused resume must not relabel the run."""
  train_state, tx, schedule = trainer.initial_state(config, objective)
  if encoder is not None:  # a fresh run that starts from another run's encoder
    params, state = objective.with_encoder(train_state["params"], train_state["state"], encoder)
    train_state = {**train_state, "params": params, "state": state}
  os.makedirs(workdir, exist_ok=True)
  manager = trainer.checkpoint_manager(workdir, config.keep_checkpoints)
  if manager.latest_step() is not None:
    train_state = trainer.restore(manager, manager.latest_step(), train_state, workdir)
    print(f"Resumed from step {manager.latest_step()} in {workdir}/checkpoints")
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, preflight.CONFIG_RECORD), config.to_dict())
  return jax.device_put(train_state, replicated), tx, schedule, manager


def _diverged(first_bad: int, manager) -> ClmimError:
  manager.wait_until_finished()
  saved = manager.latest_step()
  return ClmimError(f"Training diverged: the loss was not finite at step {first_bad}; nothing "
                    f"after it was written (latest checkpoint: "
                    f"{saved if saved is not None else 'none'}). Lower config.lr or raise "
                    f"config.warmup_steps.")


def _stopped(preemption: PreemptionNotice, step: int, workdir: str) -> ClmimError:
  # Several processes: the one that got the signal may be another.
  stopped = ClmimError(f"Stopped by {preemption.signal_name or 'a stop signal'} after step "
                       f"{step}: checkpoint saved in {workdir}/checkpoints; run the same command "
                       f"again to resume.")
  if preemption.signal_name == "SIGINT":
    stopped.exit_status = 130  # the shell's 128 + SIGINT, as clmim.main's other Ctrl-Cs
  return stopped


def run(config, workdir: str, invocation: dict | None = None) -> dict:
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
  objective = objectives.load(config)
  resuming = bool(preflight.checkpoint_steps(workdir))
  encoder = None if resuming else trainer.initial_encoder(config, objective)  # checked now

  # One data axis over every device; the batch (a multiple of the device count: check_run)
  # is split across it.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  batch_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  inputs = _Inputs(config, objective, batch_sharding)
  # Validation images (fine-tuning) are opened here too: a missing or unlabelled set fails
  # before anything is written.
  evaluator = objective.evaluator(batch_sharding, replicated, inputs.rows)
  eval_every = evaluator.every if evaluator is not None else 0
  writer = jax.process_index() == 0  # logs, the config record and the export: process 0 only

  train_state, tx, schedule, manager = _start(config, objective, workdir, encoder, replicated)
  start_step = int(train_state["step"])
  update = jax.jit(trainer.make_update(objective, tx, schedule),
                   in_shardings=(replicated, replicated, batch_sharding, replicated),
                   out_shardings=(replicated, replicated, replicated), donate_argnums=(0,))
  # The first step whose loss was not finite (-1: none), carried by the step on the device so
  # that no step waits for it; read before every log record and every checkpoint, so nothing
  # written after a divergence holds its parameters.
  first_bad = jax.device_put(jnp.asarray(-1, jnp.int32), replicated)

  log_path = os.path.join(workdir, "metrics.jsonl")
  kept = [r for r in trainer.read_metrics(workdir) if r["step"] <= start_step]
  if writer:
    with open(log_path, "w") as f:  # drop records past the checkpoint we resume from
      f.writelines(json.dumps(r) + "\n" for r in kept)
  stream = inputs.stream(start_step)
  rng = jax.random.PRNGKey(config.seed)
  metrics, last_eval, started = {}, {}, time.time()
  # Wall time of earlier sessions of this run, so a resumed run reports its total cost.
  earlier_s = kept[-1].get("elapsed_s", 0.0) if kept else 0.0
  bar = tqdm(range(start_step, config.total_steps), initial=start_step, total=config.total_steps,
             desc="finetune" if config.objective == "finetune" else f"pretrain {config.objective}",
             unit="step", dynamic_ncols=True, disable=not writer)
  preemption = PreemptionNotice()
  scalars = tensorboard.ScalarWriter(workdir, writer and config.get("tensorboard", False))
  try:
    for step in bar:
      train_state, first_bad, metrics = update(train_state, first_bad,
                                               inputs.sharded(next(stream)),
                                               jax.random.fold_in(rng, step))
      done = step + 1
      log_now = done % config.log_every == 0 or done == config.total_steps
      stopping = preemption.agreed(log_now)
      saving = stopping or done % config.checkpoint_every == 0 or done == config.total_steps
      if (log_now or saving) and int(first_bad) >= 0:
        raise _diverged(int(first_bad), manager)
      if log_now:
        metrics = {k: float(v) for k, v in metrics.items()}
        images_per_s = (done - start_step) * config.batch_size / (time.time() - started)
        record = {"step": done, **metrics, "images_per_s": images_per_s,
                  "elapsed_s": round(earlier_s + time.time() - started, 1)}
        if evaluator is not None and (done == config.total_steps or (
            eval_every and done % eval_every == 0)):
          last_eval = evaluator(train_state["params"], train_state["state"])
          record.update(last_eval)
        if writer:
          with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars.write(done, {k: v for k, v in record.items() if k != "step"})
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{images_per_s:.0f}")
      if saving:
        # From one host copy: every device holds the replicated state, and orbax would write
        # each array as one slice per device (3.7 s instead of ~0.2 s per save on 8 CPU devices).
        manager.save(done, args=ocp.args.StandardSave(jax.device_get(train_state)))
      if stopping:
        if preemption.signal_name == "SIGINT":  # someone is watching: say why it waits
          bar.write(f"Ctrl-C: saving the checkpoint of step {done} before stopping "
                    f"(Ctrl-C again stops at once, without it).", file=sys.stderr)
        manager.wait_until_finished()
        raise _stopped(preemption, done, workdir)
    manager.wait_until_finished()
  finally:
    preemption.close()
    scalars.close()
    bar.close()

  final = {k: float(v) for k, v in metrics.items()} if metrics else {}
  final.update(last_eval)
  if writer:
    _export(config, objective, train_state, workdir, final, invocation,
            len(evaluator.labels) if evaluator is not None else None)
  return final


def _export(config, objective, train_state, workdir: str, final: dict, invocation, eval_images):
  """The finished run's encoder (and pretraining decoder) as workdir/export, and its line."""
  records = trainer.read_metrics(workdir)
  encoder = jax.device_get(objective.encoder_params(train_state["params"], train_state["state"]))
  out = export.save(os.path.join(workdir, "export"), config, encoder,
                    vit_fields(objective.encoder), steps=int(train_state["step"]),
                    final_loss=final.get("loss"), invocation=invocation,
                    # what the time depends on most, after the machine (clmim/host_memory.py)
                    extra={"training_time_s": (records or [{}])[-1].get("elapsed_s"),
                           "host_memory": host_memory.status()},
                    decoder=trainer.pretraining_decoder(objective, train_state["params"]))
  name = export.read_manifest(out)[0].get("name")
  print(summary_line(records, config.objective, out, name, eval_images))
