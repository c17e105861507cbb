"""Metrics over pretraining: the analysis job applied to every kept checkpoint of a training run.

  python -m clmim.main --config configs/pretrain_moco_v3.py:demo --config.mode=snapshots \
      --workdir runs/moco_v3_demo

For each orbax checkpoint in workdir/checkpoints it runs the analyses of
`config.snapshot_analyses` on `config.snapshot_images` held-out procedural images, through the
same `Session` as the analysis job (one compiled step for every checkpoint, the run's global
batch `config.batch_size` split over the devices, the multi-process plan), and writes
workdir/snapshots.json ({"steps": [...], "<result key>": [[per x position] per step], ...}: the
depth curve each analysis declares, e.g. per-block means over heads) and workdir/snapshots.png
(one panel per curve, x = step, one line per block). This is how to see when a contrastive
model's later layers stop attending uniformly.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from clmim import config_lib, preflight
from clmim.analysis import core
from clmim.atomic import save_figure_atomic, write_json_atomic
from clmim.checkpoints.registry import Model
from clmim.data.eval_data import EvalImages
from clmim.errors import ClmimError
from clmim.analysis.session import Session
from clmim.jobs.analyze import analysis_setup
from clmim.models.vit import vit_fields
from clmim.train import objectives, trainer


def held_out_images(config) -> EvalImages:
  """config.snapshot_images held-out images of the run's procedural generator (the split it
  never saw, its data seed and generator version), normalised like its inputs."""
  return EvalImages(config_lib.held_out_data(config, config.snapshot_images),
                    {"image_size": config.data.image_size})


def curves(modules) -> list:
  """The Results with a depth curve, in module order: what snapshots.json and the figure hold."""
  return [r for m in modules for r in m.RESULTS if r.series is not None]


def run(config, workdir: str, invocation: dict | None = None) -> dict:
  """Analyses every kept checkpoint of `workdir`; returns the snapshots dict."""
  preflight.check_run(config, workdir, jax.device_count())
  steps = preflight.checkpoint_steps(workdir)  # looked up first: orbax would create the folder
  if not steps:
    raise ClmimError(f"No checkpoints in {workdir}/checkpoints to analyse.")
  modules, options = analysis_setup(config.snapshot_analyses, None)
  several = [m.NAME for m in modules if core.is_multi_pass(m)]
  if several:
    raise ClmimError(f"config.snapshot_analyses: {several[0]!r} fits probes on labelled images "
                     f"in several passes, which snapshots do not run; analyse exported "
                     f"checkpoints with --config.mode=analyze (configs/probing.py) instead.")
  objective = objectives.load(config)
  manager = trainer.checkpoint_manager(workdir, config.keep_checkpoints)
  template, _, _ = trainer.initial_state(config, objective)
  images = held_out_images(config)
  model = Model(name=config.name, family=config.family, vit=objective.encoder, params=None,
                preprocessing={"image_size": config.data.image_size}, source=workdir, info={})
  session = Session(modules, options, config.batch_size, progress=False)
  shown = curves(modules)
  snapshots = {"steps": [], **{r.key: [] for r in shown}}
  for step in steps:
    state = trainer.restore(manager, step, template, workdir)
    params = objective.encoder_params(state["params"], state["state"])
    out, _ = session.analyze(dataclasses.replace(model, name=f"{config.name} step {step}"),
                             images, params=params, quiet=True)
    snapshots["steps"].append(int(step))
    for result in shown:
      if out.get(result.key) is not None:
        snapshots[result.key].append([float(v) for v in result.series(out[result.key])])
    if jax.process_index() == 0:
      print(f"step {step}: " + ", ".join(
          f"{r.key} (last) {snapshots[r.key][-1][-1]:.4f}" for r in shown[:3]))
  snapshots["x"] = {r.key: r.x for r in shown}
  snapshots["labels"] = {r.key: r.label for r in shown}
  snapshots["architecture"] = vit_fields(objective.encoder)
  snapshots["num_images"] = config.snapshot_images
  snapshots["compilations"] = session.compilations
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, "snapshots.json"), snapshots)
    figure_path = os.path.join(workdir, "snapshots.png")
    plot(snapshots, figure_path, title=f"{config.name}: metrics over pretraining")
    print(f"Wrote {workdir}/snapshots.json and {figure_path}")
  return snapshots


def plot(snapshots: dict, path: str, title: str) -> None:
  """One panel per curve; x = step, one line per block (darker = deeper); a stage curve's
  embedding entry (stage 0) is left out, since it does not change with training."""
  keys = [k for k in snapshots["labels"] if snapshots[k]]
  figure = Figure(figsize=(4 * len(keys), 3.4), dpi=150)
  steps = snapshots["steps"]
  for i, key in enumerate(keys):
    axis = figure.add_subplot(1, len(keys), i + 1)
    values = np.asarray(snapshots[key], np.float64)  # [steps, positions]
    first = 1 if snapshots["x"][key] == "stage" else 0
    blocks = values.shape[1] - first
    for column in range(first, values.shape[1]):
      layer = column - first
      shade = 0.25 + 0.75 * layer / max(blocks - 1, 1)
      axis.plot(steps, values[:, column], color=(0.1, 0.2, 0.5, shade), label=f"block {layer + 1}")
    axis.set_xlabel("step")
    # Steps are whole numbers: with few checkpoints the default locator ticks 2.5, 7.5, ...
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel(snapshots["labels"][key])
    axis.grid(alpha=0.3)
  figure.axes[0].legend(fontsize=6)
  figure.suptitle(title)
  figure.tight_layout()
  save_figure_atomic(figure, path)
