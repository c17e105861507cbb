"""The jobs `clmim.main` runs: the table of them (`JOBS`, by `config.mode`) and the table of the
kinds of config they take (`KINDS`: each kind's checks and, for resumable runs, the fields a
saved run must share).

The jobs are the only code that wires configs, models, data and analyses together
(`clmim.analysis` and `clmim.train` never import each other, `clmim.analysis` never imports
`clmim.data` or `clmim.checkpoints`, and nothing below the jobs imports them: tests/
test_layers.py). Each row says which kind of config a mode applies to,
what it writes into its workdir, whether it trains (and so wants the training host allocator),
and where its `run(config, workdir, invocation)` lives; the function's module is imported only
when the job runs, so reading the table costs nothing. `clmim.main` is parse, preflight,
`JOBS[mode].run(...)`; `clmim.preflight` takes the modes, the kinds' checks and the resume
rules from here and names no component itself.

Adding a job is one module with a `run(config, workdir, invocation)` and one row here.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Job:
  """One mode of `clmim.main`.

  Attributes:
    mode: the value of config.mode.
    kind: the kind of config it applies to: "analysis" or "pretraining".
    target: "module:function" of its run(config, workdir, invocation).
    writes: the kind of run it leaves in its workdir ("analysis", "training"), or None when it
      only reads one (export, snapshots) or manages folders of its own (sweep): one kind per
      workdir (preflight.check_run_kind).
    training: whether it runs training steps (the host allocator of clmim/host_memory.py).
    description: one line for --help and errors.
    reads_run: it reads the checkpoints of a training run in its workdir (which must exist).
    objective_mode: the MODE the config's objective must declare (`clmim.train.objectives`):
      fine-tuning and pretraining share the trainer, but each objective is trained by one of
      them; None: any objective.
  """
  mode: str
  kind: str
  target: str
  writes: Optional[str]
  training: bool
  description: str
  reads_run: bool = False
  objective_mode: Optional[str] = None

  def run(self, config, workdir: str, invocation: Optional[dict] = None):
    return _function(self.target)(config, workdir, invocation)


def _function(target: str):
  module, function = target.split(":")
  return getattr(importlib.import_module(module), function)


@dataclasses.dataclass(frozen=True)
class ConfigKind:
  """One kind of config (what `clmim.preflight.config_kind` tells apart).

  Attributes:
    name: "analysis" or "pretraining".
    examples: the config files of this kind, for errors.
    check_target: "module:function" of check(config, mode, devices): one error for any field
      the kind's jobs read, before anything is loaded (it asks the config's components).
    resume_target: "module:function" of resume_fields(config) -> preflight.ResumeFields, for
      kinds whose workdirs are resumed; None otherwise.
  """
  name: str
  examples: str
  check_target: str
  resume_target: Optional[str] = None

  def check(self, config, mode: str, devices: int) -> None:
    _function(self.check_target)(config, mode, devices)

  def resume_fields(self, config):
    return _function(self.resume_target)(config)


KINDS = {kind.name: kind for kind in (
    ConfigKind("analysis", "configs/analyze.py or nmi.py", "clmim.jobs.analyze:check_config"),
    ConfigKind("pretraining", "configs/pretrain_*.py or finetune.py",
               "clmim.jobs.pretrain:check_config",
               "clmim.jobs.pretrain:resume_fields"),
)}


JOBS = {job.mode: job for job in (
    Job("analyze", "analysis", "clmim.jobs.analyze:run", "analysis", False,
        "the analyses of an analysis config over every model"),
    Job("pretrain", "pretraining", "clmim.jobs.pretrain:run", "training", True,
        "trains a pretraining config, resuming from the workdir", objective_mode="pretrain"),
    Job("finetune", "pretraining", "clmim.jobs.pretrain:run", "training", True,
        "supervised fine-tuning of a pretrained encoder (configs/finetune.py)",
        objective_mode="finetune"),
    Job("export", "pretraining", "clmim.jobs.export:run", None, False,
        "the encoder of a training run's latest checkpoint as a clmim checkpoint",
        reads_run=True),
    Job("snapshots", "pretraining", "clmim.jobs.snapshots:run", None, False,
        "the analyses over every kept checkpoint of a training run", reads_run=True),
    Job("sweep", "pretraining", "clmim.jobs.sweep:run", None, True,
        "one hybrid model per λ, then the analyses over all of them", objective_mode="pretrain"),
)}
MODES = tuple(JOBS)


def modes(kind: str) -> tuple:
  """The modes of configs of `kind` ("analysis" or "pretraining"), in table order."""
  return tuple(mode for mode, job in JOBS.items() if job.kind == kind)
