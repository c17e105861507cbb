"""Checks that run before any compute: a mistake costs seconds, not the hours of a run.

`check_run(config, workdir, devices)` is what every job (analysis, pretraining, export,
snapshots) calls first: the mode against the kind of config, the workdir (writable, and one
kind of run per folder: `check_run_kind`), the numeric fields
(batch sizes, counts), a resumed run's config. The jobs then resolve their models and data
sources, still before the first forward pass. Nothing here
creates a file or a folder: a refused run leaves the disk as it was.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import tempfile

from clmim import jobs
from clmim.errors import ClmimError
from clmim.suggestions import did_you_mean

CONFIG_RECORD = "config.json"  # a training workdir's config, for resume checks


@dataclasses.dataclass(frozen=True)
class ResumeFields:
  """What a saved run must share with a config to be resumed (exported, snapshotted); the
  components declare it (for pretraining configs: `clmim.jobs.pretrain.resume_fields`).

  Attributes:
    sections: top-level fields and sections that fix what the run computes, in report order.
    how_not_what: dotted fields inside them that say how a run is carried out, not what it
      computes: a run may be resumed with other values.
    added_later: {dotted field: value} of fields added after runs were recorded without them: a
      record that lacks one is compared as if it held this value.
  """
  sections: tuple
  how_not_what: tuple = ()
  added_later: dict = dataclasses.field(default_factory=dict)


def config_kind(config) -> str:
  """"analysis" or "pretraining" (the kinds of `jobs.KINDS`), told by the config's fields."""
  if "analyses" in config:
    return "analysis"
  if "objective" in config:
    return "pretraining"
  raise ClmimError("the config has neither 'analyses' (an analysis config) nor 'objective' (a "
                   "pretraining config); start from a file in configs/.")


def check_mode(config) -> str:
  """The config's mode, checked against its kind; returns the mode."""
  mode, kind = config.get("mode"), config_kind(config)
  if mode not in jobs.JOBS:  # the modes and their kinds: clmim/jobs/__init__.py
    raise ClmimError(f"config.mode={mode!r}{did_you_mean(str(mode), jobs.JOBS)}: expected one "
                     f"of {', '.join(jobs.JOBS)}.")
  needed = jobs.JOBS[mode].kind
  if needed != kind:
    article = "an" if kind == "analysis" else "a"
    raise ClmimError(f"config.mode={mode!r} does not apply to {article} {kind} config (its "
                     f"modes: {', '.join(jobs.modes(kind))}); mode {mode!r} needs a config "
                     f"like {jobs.KINDS[needed].examples}.")
  return mode


def _nearest_existing(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return path


def check_workdir(workdir: str, must_exist: bool = False) -> None:
  """The workdir can be written: an existing folder, or one that can be created. Checked by
  creating and removing a temporary folder in it (or in its nearest existing parent), so a
  read-only file system, a file in the way or /proc are caught before any compute."""
  if not workdir:
    raise ClmimError("--workdir is empty: name an output folder.")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ClmimError(f"--workdir {workdir}: is a file, not a folder.")
  if must_exist and not os.path.isdir(workdir):
    raise ClmimError(f"--workdir {workdir}: no such folder (this mode reads a training run's "
                     f"workdir).")
  anchor = _nearest_existing(workdir)
  if not os.path.isdir(anchor):
    raise ClmimError(f"--workdir {workdir}: cannot be created, {anchor} is a file.")
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".clmim-write-check-", dir=anchor))
  except OSError as e:
    where = "" if anchor == os.path.abspath(workdir) else f" (in {anchor})"
    raise ClmimError(f"--workdir {workdir}: cannot write there{where}: "
                     f"{e.strerror or e}.") from None


def check_fields(config, mode: str, devices: int) -> None:
  """Every field the jobs of this kind of config read, before anything is loaded: the kind's
  check in the jobs table (`jobs.KINDS`), which asks the config's components."""
  jobs.KINDS[config_kind(config)].check(config, mode, devices)


def saved_config(workdir: str):
  """The config dict a pretraining workdir recorded (None when it has none)."""
  path = os.path.join(workdir, CONFIG_RECORD)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ClmimError(f"{path} cannot be read ({e}); it records the run's config.") from None


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def config_differences(saved: dict, current: dict, fields: ResumeFields) -> list[str]:
  """'field: saved -> current' for every field of `fields.sections` that differs, in their
  order, less `fields.how_not_what`; a section only one config has is one entry."""
  saved = copy.deepcopy(saved)
  for field, value in fields.added_later.items():  # a record older than the field
    *sections, name = field.split(".")
    holder = saved
    for section in sections:
      holder = holder.get(section) if isinstance(holder, dict) else None
    if isinstance(holder, dict):
      holder.setdefault(name, value)
  differences = []
  for key in fields.sections:
    before, after = saved.get(key), current.get(key)
    if isinstance(before, dict) and isinstance(after, dict):
      flat_before, flat_after = _flatten(before, f"{key}."), _flatten(after, f"{key}.")
      differences += [f"{k}: {flat_before.get(k)!r} -> {flat_after.get(k)!r}"
                      for k in sorted(set(flat_before) | set(flat_after))
                      if flat_before.get(k) != flat_after.get(k) and k not in fields.how_not_what]
    elif _flatten(before) != _flatten(after):
      shown = lambda v: "(a section)" if isinstance(v, dict) else repr(v)
      differences.append(f"{key}: {shown(before)} -> {shown(after)}")
  return differences


def check_resume(config, workdir: str) -> None:
  """A workdir trained with another model, objective or data is not resumed (nor exported)."""
  saved = saved_config(workdir)
  if saved is None:
    return
  fields = jobs.KINDS[config_kind(config)].resume_fields(config)
  differences = config_differences(saved, config.to_dict(), fields)
  if differences:
    shown = "; ".join(differences[:6]) + ("; ..." if len(differences) > 6 else "")
    raise ClmimError(f"--workdir {workdir} holds a run with a different config ({shown}); "
                     f"use the same config to resume it (its config is in "
                     f"{os.path.join(workdir, CONFIG_RECORD)}), or a new --workdir to start "
                     f"fresh.")


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the orbax checkpoints in workdir/checkpoints, read without creating anything."""
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root)
                if d.isdigit() and os.path.isdir(os.path.join(root, d)))


ANALYSIS_RECORD = "results.json"  # an analysis workdir's mark (written last, when whole)


def training_marks(workdir: str) -> list[str]:
  """What shows `workdir` holds a training run: its config record, checkpoints, metrics log."""
  marks = [name for name in (CONFIG_RECORD, "metrics.jsonl")
           if os.path.isfile(os.path.join(workdir, name))]
  return marks + (["checkpoints/"] if checkpoint_steps(workdir) else [])


def check_run_kind(mode: str, workdir: str) -> None:
  """One kind of run per workdir: a new training run is refused in a workdir holding an analysis
  run (results.json), and an analysis run in one holding a training run (config.json,
  checkpoints, metrics.jsonl). Neither would overwrite the other's files, but a folder mixing
  two runs' outputs reads as one run. A workdir that already holds both (made before this
  check) is used as before, with a one-line warning."""
  writes = jobs.JOBS[mode].writes
  if writes is None or not os.path.isdir(workdir):
    return
  analysis = os.path.isfile(os.path.join(workdir, ANALYSIS_RECORD))
  training = training_marks(workdir)
  if analysis and training:
    _warn(f"--workdir {workdir} holds both an analysis run ({ANALYSIS_RECORD}) and a training "
          f"run ({', '.join(training)}); going on, but one --workdir per run keeps their "
          f"outputs apart.")
  elif analysis and writes == "training":
    raise ClmimError(f"--workdir {workdir} holds an analysis run ({ANALYSIS_RECORD}); a "
                     f"training run (mode {mode!r}) needs a folder of its own: choose a new "
                     f"--workdir, e.g. {os.path.join(workdir, mode)}.")
  elif training and writes == "analysis":
    raise ClmimError(f"--workdir {workdir} holds a training run ({', '.join(training)}); an "
                     f"analysis run needs a folder of its own: choose a new --workdir, e.g. "
                     f"{os.path.join(workdir, 'analysis')} (the run's encoder to analyse: "
                     f"{os.path.join(workdir, 'export')}).")


def _warn(message: str) -> None:
  """One 'clmim: warning: ...' line on stderr (by the first process only)."""
  import jax  # already started by the job that calls preflight
  if jax.process_index() == 0:
    print(f"clmim: warning: {message}", file=sys.stderr, flush=True)


def check_run(config, workdir: str, devices: int) -> str:
  """Everything `clmim.main` checks before a job starts; returns the mode."""
  mode = check_mode(config)
  check_fields(config, mode, devices)
  job = jobs.JOBS[mode]
  check_workdir(workdir, must_exist=job.reads_run)
  check_run_kind(mode, workdir)
  if job.writes == "training" or job.reads_run:  # (a sweep checks each λ's own folder)
    check_resume(config, workdir)
  if job.writes == "analysis" and os.path.exists(os.path.join(workdir, "results.json")) \
      and not config.overwrite:
    raise ClmimError(f"--workdir {workdir} already holds an analysis run (results.json); "
                     f"choose a new --workdir, or add --config.overwrite=True to replace that "
                     f"run's outputs.")
  if job.reads_run and not checkpoint_steps(workdir):
    raise ClmimError(f"--workdir {workdir}: no checkpoints in {workdir}/checkpoints to "
                     f"read (mode {mode!r}: {jobs.JOBS[mode].description}; train first "
                     f"with --config.mode=pretrain).")
  return mode
