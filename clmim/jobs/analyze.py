"""The analysis job behind `python -m clmim.main --config configs/nmi.py` (config.mode "analyze").

For every model of `config.models` (plus, optionally, an untrained copy of each architecture:
models of one architecture and preprocessing share one copy, "A + B (untrained)")
it streams the evaluation images through the sharded `Analyzer` and collects the analyses of
`config.analyses` (modules of `clmim.analysis`, see `clmim.analysis.core`), with the options of
`config.analysis_options.<name>`. Everything that can be wrong with the input (workdir, fields,
analysis names and options, model specs, files, data) is checked before any compute. Models of
one architecture share one compiled step. results.json is written atomically at the end, last,
so a failed run leaves no partial result behind.

With several processes (jax.distributed), each process reads only the images of its own
devices (`Analyzer.plan`), all run the same number of steps, psum combines the sums over every
device, and only process 0 prints and writes files.

results.json:
  {"models": {name: {<every key of every analysis' RESULTS>, "num_images": N}},
   "model_info": {name: {"family", "source", "method", "steps", "image_size", "patch_size",
                         "depth", "num_heads", "architecture_from": {field: where from},
                         "uniform_attention_distance", "preprocessing", "data", "seconds",
                         untrained copies: "architecture_of" and, when one copy stands for
                         several models' architecture, "shared_by": [their names]}},
   "analyses": {name: {"options": {...}, "results": {key: {"label", "layout", "x", ...}}}},
   "<analysis>_between_models": what an analysis measures between the models (core.py), e.g.
     "cka_between_models": {"A ~ B": {"cka_mean_tokens": [stage of A][stage of B], ...}},
   "intervals": {"folds", "replicates", "seed", "coverage", "not_resampled": {analysis: why},
                 "models": {name: {key: {"low": [...], "high": [...]}}}} (bootstrap, per curve),
   "findings": [one entry per result the paper compares CL and MIM on, with its verdict:
                `clmim.jobs.verdicts`],
   "placements": {"cl_reference", "mim_reference", "findings": {key: {"models": {name:
                  {"value", "placement", "interval"}}}}} (`clmim.jobs.placements`; also written
                  as placements.md when the run has more than the two references), or None,
   "num_images": N, "compilations": C, "compile_seconds": s (the per-model steps' compilation,
   including their first step), "config": {...},
   "run": {"command", "overrides", "workdir"}, "versions": {...},
   "figures": [exactly this run's figure files]}

A workdir that already holds an analysis run is refused unless `config.overwrite` is True; then
that run's results.json, summary.txt, report.md/html, placements.md and the figures it lists are
removed before
the new ones are written, so the workdir never mixes two runs.
"""
from __future__ import annotations

import json
import os
import platform
import re

import jax
import numpy as np

from clmim import preflight
from clmim.analysis import bootstrap, core, plots
from clmim.analysis.session import Session
from clmim.atomic import removed_unless_complete, write_atomic, write_json_atomic
from clmim.checkpoints import registry
from clmim.data.eval_data import EvalImages
from clmim.data.labelled import ProbeData
from clmim.errors import ClmimError
from clmim.jobs import placements, report, verdicts
from clmim.config_checks import check_int
from clmim.data import sources
from clmim.models.vit import DTYPES, vit_fields

OUTPUTS = ("results.json", "summary.txt", "report.md", "report.html",
           "placements.md")  # besides the figures


def check_config(config, mode: str, devices: int) -> None:
  """The fields an analysis config's run reads, before anything is loaded: the batch, the dtype,
  the data counts, and the data source's fields. (The analyses check their options, the models
  and the data when they are resolved, still before any compute: `run`.)"""
  del mode  # "analyze" is the only mode of an analysis config
  sources.of(config.data).check(config.data)
  check_int(config, "batch_size", 1, devices)
  if config.get("dtype", "float32") not in DTYPES:
    raise ClmimError(f"config.dtype={config.dtype!r}: expected one of {DTYPES}.")
  check_int(config, "data.num_images", 0, why="0 = all images")
  check_int(config, "data.max_batches", 0, why="0 = no cap")
  check_int(config, "data.max_images_per_class", 0, why="0 = all")
  check_int(config, "data.num_workers", 0, why="0 = one per CPU core, at most 8")
  check_int(config, "probe_data.num_images", 0, why="0 = the whole training split")
  if not 0.0 <= float(config.data.fraction_per_class) <= 1.0:
    raise ClmimError(f"config.data.fraction_per_class={config.data.fraction_per_class}: "
                     f"expected a fraction in [0, 1] (0 = all).")


def versions() -> dict:
  """The software and runtime a result came from (results.json's "versions")."""
  import flax
  import clmim
  from clmim import host_memory
  return {"clmim": clmim.__version__, "jax": jax.__version__, "flax": flax.__version__,
          "numpy": np.__version__, "python": platform.python_version(),
          "backend": jax.default_backend(), "devices": jax.device_count(),
          "processes": jax.process_count(), "host_memory": host_memory.status()}


def analysis_setup(names, options_config) -> tuple[list, dict]:
  """(modules, {name: options}) for `config.analyses` and `config.analysis_options`; unknown
  names and options fail here, before anything is loaded."""
  modules = core.load_all(names)
  given = options_config.to_dict() if hasattr(options_config, "to_dict") else \
      dict(options_config or {})
  options = {m.NAME: core.resolve_options(m, given.get(m.NAME)) for m in modules}
  return modules, options


def describe_analyses(modules, options) -> dict:
  """What results.json records about each analysis: its options and its result keys."""
  return {m.NAME: {"options": options[m.NAME], "results": {
      r.key: {"label": r.label, "layout": r.layout, "x": r.x, "cl_direction": r.cl_direction,
              "description": r.description} for r in m.RESULTS}} for m in modules}


def resolve_models(config) -> list:
  """[(Model, EvalImages)] for every spec of config.models (+ untrained copies), all loaded and
  checked before any compute; names made unique or refused.

  Models of one name are told apart by their folder (two snapshots of one run); a model shipped
  with clmim keeps its name. The untrained copies (`config.include_untrained`) are made from the
  loaded models, named after their final names, and one copy stands for every model of the
  same architecture and preprocessing (see `share_untrained`)."""
  specs = registry.split_specs(config.models)
  if not specs:
    raise ClmimError("config.models is empty: name at least one model, e.g. 'moco_v3_demo'.")
  resolved = [(spec, registry.resolve(spec, seed=config.seed)) for spec in specs]
  tell_apart(resolved)
  copies = [(f"random:{spec}", registry.untrained_copy(model, config.seed))
            for spec, model in resolved
            if config.include_untrained and not spec.startswith("random:")]
  models = share_untrained(resolved, copies)
  check_unique_names(models)
  jobs = []
  for _, model in models:
    model.vit = model.vit.clone(dtype=config.get("dtype", "float32"))  # how it computes
    jobs.append((model, EvalImages(config.data, model.preprocessing)))
  return jobs


def tell_apart(resolved) -> None:
  """Renames trained models that share a name "<name> [<folder>]" (e.g. two snapshots of one
  run, or a runlocal export beside the shipped model it is named after), in place; a model
  shipped with clmim keeps its name."""
  names = [model.name for _, model in resolved]
  for _, model in resolved:
    shipped = model.source.endswith("(shipped with clmim)")
    if names.count(model.name) > 1 and model.family != "random" and not shipped:
      model.name = f"{model.name} [{os.path.basename(os.path.normpath(model.source))}]"


def untrained_key(model) -> str:
  """What an untrained model's numbers depend on: its ViT fields, its decoder's kind and sizes,
  its preprocessing and its seed (`source`). Equal keys mean equal weights on equal images."""
  decoder = getattr(model, "decoder", None)
  return json.dumps([vit_fields(model.vit), decoder and [decoder["kind"], decoder["config"]],
                     model.preprocessing, model.source], sort_keys=True, default=str)


# A shared untrained copy names at most this many of its models (model_info lists them all).
_NAMED_SHARERS = 3


def share_untrained(resolved, copies) -> list:
  """`resolved` then `copies` ([(spec, Model)]) with one untrained model per `untrained_key`:
  a copy whose twin is already there (an explicit `random:` spec, or another model's copy) is
  dropped, and the one kept records whose copies it stands for in model_info["shared_by"]; a
  copy shared by several models is named after them: "A + B (untrained)"."""
  kept = list(resolved)
  by_key = {}
  for _, model in resolved:
    if model.family == "random":
      by_key.setdefault(untrained_key(model), model)
  sharers = {}
  for spec, copy in copies:
    key = untrained_key(copy)
    if key not in by_key:
      by_key[key] = copy
      kept.append((spec, copy))
    sharers.setdefault(key, []).append(copy.info["architecture_of"])
  for key, names in sharers.items():
    model = by_key[key]
    if len(names) == 1 and model.name == f"{names[0]} (untrained)":
      continue  # one model's own copy, as ever
    model.info["shared_by"] = names
    if model.name == f"{names[0]} (untrained)":  # a copy, not a name the user gave
      shown = names if len(names) <= _NAMED_SHARERS else \
          names[:_NAMED_SHARERS - 1] + [f"{len(names) - _NAMED_SHARERS + 1} more"]
      model.name = f"{' + '.join(shown)} (untrained)"
  return kept


def check_unique_names(models) -> None:
  """One error naming both specs (and the `?name=` that fixes it) when two models share a name."""
  seen = {}
  for spec, model in models:
    if model.name in seen:
      stem = re.sub(r" \[[^\]]*\]$", "", model.name)  # without tell_apart's folder tag
      simple = re.fullmatch(r"[\w.-]+", stem)
      fix = registry.with_option(spec, "name", f"{stem}_2" if simple else "other")
      raise ClmimError(f"config.models names the same model twice: {model.name!r} (from "
                       f"{seen[model.name]!r} and {spec!r}); give one of them a name of its own "
                       f"with '?name=...', e.g. {fix!r}.")
    seen[model.name] = spec


def check_models(modules, options, jobs, data_cfg=None, probe_cfg=None) -> dict:
  """Each analysis' own `check` on every model (e.g. a decoder it needs), and the multi-pass
  analyses' `check_data` (which opens their image sets), before any compute. Returns
  {model name: ProbeData} (empty when no multi-pass analysis runs)."""
  probe_data = {}
  for module in modules:
    for model, _ in jobs:
      try:
        if hasattr(module, "check"):
          module.check(model, options[module.NAME])
        if core.is_multi_pass(module):
          if model.name not in probe_data:
            probe_data[model.name] = ProbeData(data_cfg, probe_cfg, model.preprocessing)
          module.check_data(probe_data[model.name], options[module.NAME])
      except ClmimError as e:
        raise ClmimError(f"analysis {module.NAME!r} on model {model.name!r}: {e}") from None
  return probe_data


def interval_settings(config) -> dict:
  """config.intervals as Session's keyword arguments (folds 0 when the config has none)."""
  section = config.get("intervals")
  if section is None:
    return {"folds": 0, "replicates": 1000, "seed": 0}
  settings = {"folds": section.folds, "replicates": section.replicates, "seed": section.seed}
  bootstrap.check_settings(**settings)
  return settings


def remove_previous_outputs(workdir: str) -> list[str]:
  """Deletes the files an earlier analysis run wrote in `workdir` (its results.json, summary,
  report and the figures its results.json lists); other files are left alone."""
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
  """Runs the analyses of `config`; writes results.json, figures, summary.txt and the report."""
  preflight.check_run(config, workdir, jax.device_count())
  modules, options = analysis_setup(config.analyses, config.get("analysis_options"))
  jobs = resolve_models(config)
  probe_data = check_models(modules, options, jobs, config.data, config.probe_data)

  intervals = interval_settings(config)
  session = Session(modules, options, config.batch_size, config.progress,
                    int(config.data.max_batches), **intervals)
  results = {"models": {}, "model_info": {}}
  for model, images in jobs:
    results["models"][model.name], results["model_info"][model.name] = \
        session.analyze(model, images, probe_data=probe_data.get(model.name))
  compile_seconds = session.compile_seconds  # the per-model steps only
  for module in modules:  # what an analysis measures between the models (core.py)
    if hasattr(module, "between_models"):
      value = module.between_models(jobs, options[module.NAME], session)
      if value is not None:
        results[core.between_models_key(module)] = value
  results["analyses"] = describe_analyses(modules, options)
  results["intervals"] = verdicts.interval_record(intervals, session)
  results["findings"] = verdicts.findings(results, modules, session.replicates)
  results["placements"] = placements.placements(results, modules, session.replicates)
  results["num_images"] = min(r["num_images"] for r in results["models"].values())
  results["compilations"] = session.compilations
  results["compile_seconds"] = round(compile_seconds, 2)
  results["config"] = config.to_dict()
  results["run"] = invocation or {"command": None, "overrides": [], "workdir": workdir}
  results["versions"] = versions()
  if jax.process_index() == 0:  # only one process writes
    write_outputs(results, modules, options, workdir, config.overwrite)
  return results


def write_outputs(results: dict, modules, options, workdir: str, overwrite: bool) -> None:
  """Figures, summary.txt, report.md/html, and results.json last."""
  os.makedirs(workdir, exist_ok=True)
  removed = remove_previous_outputs(workdir) if overwrite else []
  if removed:
    print(f"Replaced the earlier run's outputs in {workdir} ({len(removed)} files).")
  with removed_unless_complete(workdir):  # an error or a Ctrl-C here leaves no half run
    paths = plots.write_figures(results, modules, options, workdir)
    for module in modules:
      key = core.between_models_key(module)
      figure = module.between_models_figure(results[key]) if key in results else None
      if figure is not None:
        paths.append(plots.save(figure, os.path.join(workdir, f"{key}.png")))
    results["figures"] = [os.path.basename(p) for p in paths]
    text = report.summary(results, modules)
    write_atomic(os.path.join(workdir, "summary.txt"), lambda f: f.write(text.encode() + b"\n"))
    report.write(results, modules, workdir)
    placed = results.get("placements")
    if placed and len(results["models"]) > 2:  # more than the two references: a table
      write_atomic(os.path.join(workdir, "placements.md"),
                   lambda f: f.write(placements.markdown(placed).encode()))
    path = os.path.join(workdir, "results.json")
    write_json_atomic(path, results)  # last: a results.json means the run's outputs are whole
  print(text)
  print(f"Wrote {path}, summary.txt, report.md, report.html and "
        f"{', '.join(results['figures'])} in {workdir}")
