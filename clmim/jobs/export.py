"""Mode "export": the encoder of a training run's checkpoint as a clmim checkpoint."""
from __future__ import annotations

import os
from typing import Optional

import jax

from clmim import preflight
from clmim.checkpoints import native as export  # clmim's own checkpoint format
from clmim.errors import ClmimError
from clmim.models.vit import vit_fields
from clmim.train import objectives, trainer


def run(config, workdir: str, invocation: Optional[dict] = None) -> str:
  """Exports the latest checkpoint into `<workdir>/export_step_<step>` and says where; returns
  that folder."""
  out = export_checkpoint(config, workdir, invocation=invocation)
  print(f"Exported the encoder of the latest checkpoint in {workdir} to {out}")
  return out


def export_checkpoint(config, workdir: str, step=None, out_dir=None, invocation=None) -> str:
  """Exports the encoder of orbax checkpoint `step` (default: latest) of a training workdir."""
  preflight.check_run(config, workdir, jax.device_count())
  steps = preflight.checkpoint_steps(workdir)  # looked up first: orbax would create the folder
  step = (steps[-1] if steps else None) if step is None else step
  if step is None or step not in steps:
    raise ClmimError(f"No checkpoint{'' if step is None else f' of step {step}'} in "
                     f"{workdir}/checkpoints to export (it has {steps or 'none'}).")
  objective = objectives.load(config)
  manager = trainer.checkpoint_manager(workdir, config.keep_checkpoints)
  train_state, _, _ = trainer.initial_state(config, objective)
  train_state = trainer.restore(manager, step, train_state, workdir)
  encoder = objective.encoder_params(train_state["params"], train_state["state"])
  metrics = trainer.read_metrics(workdir)
  record = next((m for m in reversed(metrics) if m["step"] <= step), {})
  out_dir = out_dir or os.path.join(workdir, f"export_step_{step}")
  return export.save(out_dir, config, jax.device_get(encoder), vit_fields(objective.encoder),
                     steps=int(step), final_loss=record.get("loss"), invocation=invocation,
                     extra={"training_time_s": record.get("elapsed_s")},
                     decoder=trainer.pretraining_decoder(objective, train_state["params"]))
