"""The analysis job behind `python -m clmim.main --config configs/nmi.py` (config.mode "analyze").

For every model of `config.models` (plus, optionally, an untrained copy of each architecture)
it streams the evaluation images through the sharded `Analyzer` and collects the analyses of
`config.analyses`. Everything that can be wrong with the input (model names, files, data,
analysis names) is checked before any compute, and results.json is written atomically at the
end, so a failed run leaves no partial result behind.

With several processes (jax.distributed), each process reads only the images of its own
devices (`Analyzer.plan`), all run the same number of steps, psum combines the sums over every
device, and only process 0 prints and writes files.

results.json:
  {"models": {name: {"attention_distance": [[per head] per layer], "nmi": [[...]],
                     "attention_entropy": [[...]], "fourier": [[per frequency] per stage],
                     "fourier_all_states": [[...]], "num_images": N}},
   "model_info": {name: {"family", "source", "method", "steps", "image_size", "patch_size",
                         "depth", "num_heads", "architecture_from": {field: where from},
                         "preprocessing", "data", "seconds"}},
   "reference": {"attention_distance": uniform-attention distance (px), "nmi": 0,
                 "attention_entropy": 1},
   "num_images": N, "config": {...}, "run": {"command", "overrides", "workdir"},
   "versions": {...}, "figures": [exactly this run's figure files]}

A workdir that already holds an analysis run is refused unless `config.overwrite` is True; then
that run's results.json, summary.txt and the figures it lists are removed before the new ones
are written, so the workdir never mixes two runs.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import platform
import time

import jax
import numpy as np

from clmim.analysis import attention_distance, plots
from clmim.analysis.runner import Analyzer
from clmim.checkpoints import registry
from clmim.data.eval_data import EvalImages
from clmim import preflight
from clmim.atomic import write_atomic, write_json_atomic
from clmim.errors import ClmimError
from clmim.models.vit import forward_with_states

ANALYSES = ("attention_distance", "nmi", "fourier")
LABELS = {"attention_distance": ("attention distance (px)", "attention_distance"),
          "nmi": ("NMI", "nmi"), "attention_entropy": ("attention entropy / log N", "nmi"),
          "fourier": ("high-frequency ΔlogA", "fourier")}


def uniform_attention_distance(grid: int, patch_size: int) -> float:
  """Mean distance (px) between two patches drawn uniformly on a grid x grid lattice."""
  return float(attention_distance.grid_distances(grid, patch_size).astype(np.float64).mean())


def load_analyses(names: str) -> list:
  modules = []
  for name in registry.split_specs(names):
    if name not in ANALYSES:
      raise ClmimError(f"config.analyses: unknown analysis {name!r}; expected some of {ANALYSES}.")
    modules.append(importlib.import_module(f"clmim.analysis.{name}"))
  if not modules:
    raise ClmimError(f"config.analyses is empty; expected some of {ANALYSES}.")
  return modules


def versions() -> dict:
  import flax
  import clmim
  return {"clmim": clmim.__version__, "jax": jax.__version__, "flax": flax.__version__,
          "numpy": np.__version__, "python": platform.python_version(),
          "backend": jax.default_backend(), "devices": jax.device_count(),
          "processes": jax.process_count()}


def _layer_means(values) -> np.ndarray:
  return np.asarray(values, np.float64).mean(axis=-1)


def _table(rows, columns) -> list[str]:
  """Aligned text table: rows of (model, family, values), one column per entry of `columns`."""
  width = max([len("model")] + [len(name) for name, _, _ in rows])
  lines = [f"  {'model':<{width}}  {'family':<6} " + " ".join(f"{c:>7}" for c in columns)]
  for name, family, values in rows:
    cells = [f"{v:7.3f}" for v in values] + [" " * 7] * (len(columns) - len(values))
    lines.append(f"  {name:<{width}}  {family:<6} " + " ".join(cells))
  return lines


def summary(results: dict) -> str:
  """A text report: per analysis, a table of per-layer values (means over heads) per model.

  Attention tables have one column per block (1 .. depth); the Fourier table has the embedding
  output ("emb") and then each block's output, at the highest frequency read out.
  """
  lines = [f"{results['num_images']} images per model"]
  for key, (label, _) in LABELS.items():
    rows = [(name, r[key]) for name, r in results["models"].items() if key in r]
    if not rows:
      continue
    reference = results["reference"].get(key)
    ref = f"; uniform attention: {reference:.3g}" if reference is not None else ""
    fourier = key == "fourier"
    what = "highest frequency, by stage" if fourier else f"mean over heads, by block{ref}"
    lines.append(f"{label} ({what}):")
    table = []
    for name, values in rows:
      series = [row[-1] for row in values] if fourier else _layer_means(values)
      table.append((name, results["model_info"][name]["family"], list(series)))
    stages = max(len(v) for _, _, v in table)
    columns = (["emb"] + [str(i) for i in range(1, stages)]) if fourier else \
        [str(i) for i in range(1, stages + 1)]
    lines += _table(table, columns)
  lines.append(_comparison(results))
  return "\n".join(line for line in lines if line)


def _comparison(results: dict) -> str:
  """States, for the first CL and MIM models, whether the paper's directions appear."""
  info, models = results["model_info"], results["models"]
  cl = next((n for n in models if info[n]["family"] == "cl"), None)
  mim = next((n for n in models if info[n]["family"] == "mim"), None)
  if not cl or not mim:
    return ""
  checks = []
  late = lambda values: float(np.mean(_layer_means(values)[len(values) // 2:]))
  if "attention_distance" in models[cl]:
    a, b = late(models[cl]["attention_distance"]), late(models[mim]["attention_distance"])
    checks.append(f"later-layer attention distance CL {a:.2f} vs MIM {b:.2f} px: "
                  f"{'CL larger, as in the paper' if a > b else 'NOT as in the paper'}")
  if "nmi" in models[cl]:
    a, b = late(models[cl]["nmi"]), late(models[mim]["nmi"])
    checks.append(f"later-layer NMI CL {a:.3f} vs MIM {b:.3f}: "
                  f"{'CL lower, as in the paper' if a < b else 'NOT as in the paper'}")
  if "fourier" in models[cl]:
    hf = lambda v: float(np.mean([row[-1] for row in v][1:]))
    a, b = hf(models[cl]["fourier"]), hf(models[mim]["fourier"])
    checks.append(f"high-frequency ΔlogA over blocks CL {a:.2f} vs MIM {b:.2f}: "
                  f"{'CL lower, as in the paper' if a < b else 'NOT as in the paper'}")
  return "Paper's directions:\n  " + "\n  ".join(checks)


OUTPUTS = ("results.json", "summary.txt")  # besides the figures results.json lists


def remove_previous_outputs(workdir: str) -> list[str]:
  """Deletes the files an earlier analysis run wrote in `workdir` (its results.json, summary
  and the figures its results.json lists); other files are left alone. Returns their names."""
  path = os.path.join(workdir, "results.json")
  try:
    with open(path) as f:
      figures = list(json.load(f).get("figures", []))
  except (OSError, ValueError, AttributeError):
    figures = []
  removed = []
  for name in figures + list(OUTPUTS):
    target = os.path.join(workdir, os.path.basename(str(name)))
    if os.path.isfile(target):
      os.remove(target)
      removed.append(os.path.basename(target))
  return removed


def run(config, workdir: str, invocation: dict | None = None) -> dict:
  """Runs the analyses of `config` and writes results.json, figures and summary.txt.

  Every input is checked before any model runs: the config's fields and the workdir
  (`preflight.check_run`), the analyses, every model spec and every data source.
  """
  preflight.check_run(config, workdir, jax.device_count())
  analyses = load_analyses(config.analyses)
  specs = registry.split_specs(config.models)
  if not specs:
    raise ClmimError("config.models is empty: name at least one model, e.g. 'moco_v3_demo'.")
  if config.include_untrained:
    specs += [f"random:{s}" for s in specs if not s.startswith("random:")]
  # Resolve every model and data source before computing anything: bad input fails fast.
  jobs = []
  for spec in specs:
    model = registry.resolve(spec, seed=config.seed)
    jobs.append((model, EvalImages(config.data, model.preprocessing)))
  names = [m.name for m, _ in jobs]
  for model, _ in jobs:  # e.g. two snapshots of one run: tell them apart by their folder
    if names.count(model.name) > 1 and model.family != "random":
      model.name = f"{model.name} [{os.path.basename(os.path.normpath(model.source))}]"
  names = [m.name for m, _ in jobs]
  if len(set(names)) != len(names):
    raise ClmimError(f"config.models names the same model twice: {names}.")

  results = {"models": {}, "model_info": {}, "reference": {"nmi": 0.0, "attention_entropy": 1.0}}
  uniform = set()
  max_batches = int(config.data.max_batches)
  main_process = jax.process_index() == 0
  device_batch = config.batch_size // jax.device_count()  # exact: preflight checked it
  for model, images in jobs:
    started = time.time()
    forward = functools.partial(forward_with_states, model.vit)
    analyzer = Analyzer(forward, analyses, model.vit.patch_size, device_batch_size=device_batch)
    num_images = len(images)
    if max_batches:
      num_images = min(num_images, max_batches * analyzer.global_batch_size)
    plan = analyzer.plan(num_images)
    if main_process:
      capped = f" (first {num_images}: max_batches={max_batches})" if num_images < len(images) \
          else ""
      print(f"{model.name}: {images.description}{capped}")
    batches = images.load_batches(plan.local_indices, analyzer.local_batch_size)
    out = analyzer.run(model.params, batches, progress=config.progress, plan=plan,
                       desc=model.name)
    results["models"][model.name] = out
    grid = model.vit.grid
    uniform.add(uniform_attention_distance(grid, model.vit.patch_size))
    results["model_info"][model.name] = {
        "family": model.family, "source": model.source, **model.info,
        "image_size": model.vit.image_size, "patch_size": model.vit.patch_size,
        "depth": model.vit.depth, "num_heads": model.vit.num_heads,
        "uniform_attention_distance": uniform_attention_distance(grid, model.vit.patch_size),
        "preprocessing": model.preprocessing, "data": images.description,
        "seconds": round(time.time() - started, 2)}
  if len(uniform) == 1:  # one reference line only makes sense when all grids agree
    results["reference"]["attention_distance"] = uniform.pop()
  results["num_images"] = min(r["num_images"] for r in results["models"].values())
  results["config"] = config.to_dict()
  results["run"] = invocation or {"command": None, "overrides": [], "workdir": workdir}
  results["versions"] = versions()

  if main_process:  # only one process writes
    os.makedirs(workdir, exist_ok=True)
    removed = remove_previous_outputs(workdir) if config.overwrite else []
    if removed:
      print(f"Replaced the earlier run's outputs in {workdir} ({len(removed)} files).")
    results["figures"] = [os.path.basename(p) for p in plots.write_all_figures(results, workdir)]
    text = summary(results)
    write_atomic(os.path.join(workdir, "summary.txt"), lambda f: f.write(text.encode() + b"\n"))
    path = os.path.join(workdir, "results.json")
    write_json_atomic(path, results)  # last: a results.json means the run's outputs are whole
    print(text)
    print(f"Wrote {path}, summary.txt and {', '.join(results['figures'])} in {workdir}")
  return results
