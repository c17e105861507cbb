"""The jobs `clmim.main` runs, and the one table of them (`JOBS`, by `config.mode`).

The jobs are the only code that wires configs, models, data and analyses together
(`clmim.analysis` and `clmim.train` never import each other, and `clmim.analysis` never imports
`clmim.data` or `clmim.checkpoints`). Each row says which kind of config a mode applies to,
what it writes into its workdir, whether it trains (and so wants the training host allocator),
and where its `run(config, workdir, invocation)` lives; the function's module is imported only
when the job runs, so reading the table costs nothing. `clmim.main` is parse, preflight,
`JOBS[mode].run(...)`; `clmim.preflight` takes the mode lists from here.

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
    finetuning: True / False: it needs config.objective to be / not to be "finetune" (fine-
      tuning and pretraining share the trainer); None: either.
  """
  mode: str
  kind: str
  target: str
  writes: Optional[str]
  training: bool
  description: str
  reads_run: bool = False
  finetuning: Optional[bool] = None

  def run(self, config, workdir: str, invocation: Optional[dict] = None):
    module, function = self.target.split(":")
    return getattr(importlib.import_module(module), function)(config, workdir, invocation)


JOBS = {job.mode: job for job in (
    Job("analyze", "analysis", "clmim.jobs.analyze:run", "analysis", False,
        "the analyses of an analysis config over every model"),
    Job("pretrain", "pretraining", "clmim.train.trainer:train", "training", True,
        "trains a pretraining config, resuming from the workdir", finetuning=False),
    Job("finetune", "pretraining", "clmim.train.trainer:train", "training", True,
        "supervised fine-tuning of a pretrained encoder (configs/finetune.py)", finetuning=True),
    Job("export", "pretraining", "clmim.jobs.export:run", None, False,
        "the encoder of a training run's latest checkpoint as a clmim checkpoint",
        reads_run=True),
    Job("snapshots", "pretraining", "clmim.jobs.snapshots:run", None, False,
        "the analyses over every kept checkpoint of a training run", reads_run=True),
    Job("sweep", "pretraining", "clmim.jobs.sweep:run", None, True,
        "one hybrid model per λ, then the analyses over all of them", finetuning=False),
)}
MODES = tuple(JOBS)


def modes(kind: str) -> tuple:
  """The modes of configs of `kind` ("analysis" or "pretraining"), in table order."""
  return tuple(mode for mode, job in JOBS.items() if job.kind == kind)
