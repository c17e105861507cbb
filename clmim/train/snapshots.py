"""Metrics over pretraining: the analyses applied to every kept checkpoint of a training run.

  python -m clmim.main --config configs/pretrain_moco_v3.py:demo --config.mode=snapshots \
      --workdir runs/moco_v3_demo

For each orbax checkpoint in workdir/checkpoints it runs attention distance, NMI/entropy and
Fourier on `config.snapshot_images` held-out procedural images, and writes
workdir/snapshots.json ({"steps": [...], "<metric>": [[per layer] per step]}; per-layer values
are means over heads) and workdir/snapshots.png (metric vs step, one line per layer). This is how
to see when a contrastive model's later layers stop attending uniformly.
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np
from matplotlib.figure import Figure

from clmim import preflight
from clmim.analysis import attention_distance, fourier, nmi
from clmim.analysis.experiment import uniform_attention_distance
from clmim.atomic import save_figure_atomic, write_json_atomic
from clmim.analysis.runner import Analyzer
from clmim.data.synthetic import ShapesTextures
from clmim.errors import ClmimError
from clmim.models.vit import forward_with_states
from clmim.train import trainer
from clmim.train.common import mean_std

PANELS = (("attention_distance", "attention distance (px)"), ("nmi", "NMI"),
          ("attention_entropy", "attention entropy / log N"), ("fourier", "high-freq. ΔlogA"))


def _per_layer(key, values):
  if key == "fourier":  # highest frequency of each block output (stage 0 = embedding dropped)
    return [row[-1] for row in values][1:]
  return np.asarray(values).mean(axis=-1).tolist()


def run(config, workdir: str) -> dict:
  """Analyses every kept checkpoint of `workdir`; returns the snapshots dict."""
  preflight.check_run(config, workdir, jax.device_count())
  steps = preflight.checkpoint_steps(workdir)  # looked up first: orbax would create the folder
  if not steps:
    raise ClmimError(f"No checkpoints in {workdir}/checkpoints to analyse.")
  objective = trainer.load_objective(config)
  manager = trainer.checkpoint_manager(workdir, config.keep_checkpoints)
  template, _, _ = trainer.initial_state(config, objective)
  vit = objective.encoder
  mean, std = (np.asarray(v, np.float32) for v in mean_std(config.data))
  images = ShapesTextures(vit.image_size, "validation", config.snapshot_images, config.data.seed)
  analyzer = Analyzer(functools.partial(forward_with_states, vit),
                      [attention_distance, nmi, fourier], vit.patch_size,
                      device_batch_size=max(1, 64 // jax.device_count()))
  snapshots = {"steps": [], **{key: [] for key, _ in PANELS}}
  for step in steps:
    state = trainer.restore(manager, step, template, workdir)
    params = objective.encoder_params(state["params"], state["state"])
    batches = ((b["image"] - mean) / std for b in images.batches(64))
    out = analyzer.run(params, batches, progress=False)
    snapshots["steps"].append(int(step))
    for key, _ in PANELS:
      snapshots[key].append(_per_layer(key, out[key]))
    print(f"step {step}: late-layer entropy {snapshots['attention_entropy'][-1][-1]:.3f}, "
          f"NMI {snapshots['nmi'][-1][-1]:.4f}")
  snapshots["uniform_attention_distance"] = uniform_attention_distance(vit.grid, vit.patch_size)
  snapshots["num_images"] = config.snapshot_images
  write_json_atomic(os.path.join(workdir, "snapshots.json"), snapshots)
  figure_path = os.path.join(workdir, "snapshots.png")
  plot(snapshots, figure_path, title=f"{config.name}: metrics over pretraining")
  print(f"Wrote {workdir}/snapshots.json and {figure_path}")
  return snapshots


def plot(snapshots: dict, path: str, title: str) -> None:
  """One panel per metric; x = step, one line per layer (darker = deeper)."""
  figure = Figure(figsize=(4 * len(PANELS), 3.4), dpi=150)
  steps = snapshots["steps"]
  for i, (key, label) in enumerate(PANELS):
    axis = figure.add_subplot(1, len(PANELS), i + 1)
    values = np.asarray(snapshots[key])  # [steps, layers]
    for layer in range(values.shape[1]):
      shade = 0.25 + 0.75 * layer / max(values.shape[1] - 1, 1)
      axis.plot(steps, values[:, layer], color=(0.1, 0.2, 0.5, shade), label=f"block {layer + 1}")
    axis.set_xlabel("step")
    axis.set_ylabel(label)
    axis.grid(alpha=0.3)
  figure.axes[0].axhline(snapshots["uniform_attention_distance"], ls=":", color="k",
                         label="uniform")
  figure.axes[0].legend(fontsize=6)
  figure.suptitle(title)
  figure.tight_layout()
  save_figure_atomic(figure, path)
