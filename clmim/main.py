r"""clmim's command-line entry point.

  python -m clmim.main --config configs/nmi.py [--workdir DIR] [--config.field=value ...]

The config file's `get_config(arg)` returns a locked ConfigDict; `config.mode` selects what runs:
"analyze" (the analyses of configs/nmi.py, attention_distance.py, fourier.py, all.py) or
"pretrain" (configs/pretrain_*.py), or "export" (with a pretraining config and its --workdir:
writes the encoder of the latest orbax checkpoint as a clmim checkpoint), or "snapshots" (the
analyses over every kept checkpoint of a training run; see clmim/train/snapshots.py).
A misspelt `--config.x` override fails with one message.
User errors (bad files, fields, names) print one line and exit with status 1.
"""
from __future__ import annotations

import os
import re
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally followed by ':variant'.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder. Default: runs/<config name>-<date>-<time>.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host runs); also "
    "enabled by CLMIM_DISTRIBUTED=1.")


def initialize_distributed():
  """`jax.distributed.initialize()` for a multi-process run.

  On Cloud TPU VMs, SLURM, Open MPI and Kubernetes JAX finds its peers by itself. Elsewhere
  (e.g. several processes on one machine) set JAX_COORDINATOR_ADDRESS=host:port, which JAX
  reads, plus CLMIM_NUM_PROCESSES and CLMIM_PROCESS_ID, which are passed on here.
  """
  import jax
  from clmim.errors import ClmimError
  kwargs = {}
  for key, env in (("num_processes", "CLMIM_NUM_PROCESSES"), ("process_id", "CLMIM_PROCESS_ID")):
    if os.environ.get(env):
      try:
        kwargs[key] = int(os.environ[env])
      except ValueError:
        raise ClmimError(f"{env}={os.environ[env]!r}: expected an integer.") from None
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, TypeError) as e:
    raise ClmimError(f"jax.distributed.initialize() failed: {_last_line(e)}; outside Cloud TPU, "
                     "SLURM, MPI and Kubernetes set JAX_COORDINATOR_ADDRESS=host:port, "
                     "CLMIM_NUM_PROCESSES and CLMIM_PROCESS_ID.") from e


def default_workdir(config) -> str:
  name = config.get("name", "run")
  return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def run(config, workdir: str):
  """Runs `config` in `workdir` (what `main` does after parsing flags)."""
  if config.mode == "pretrain":
    from clmim.train import trainer
    return trainer.train(config, workdir)
  if config.mode == "export":
    from clmim.train import trainer
    out = trainer.export_checkpoint(config, workdir)
    print(f"Exported the encoder of the latest checkpoint in {workdir} to {out}")
    return out
  if config.mode == "snapshots":
    from clmim.train import snapshots
    return snapshots.run(config, workdir)
  if config.mode == "analyze":
    from clmim.analysis import experiment
    return experiment.run(config, workdir)
  from clmim.errors import ClmimError
  raise ClmimError(f"config.mode={config.mode!r}: expected 'analyze', 'pretrain', 'export' or "
                   f"'snapshots'.")


def main(argv):
  del argv
  from clmim.errors import ClmimError
  try:
    config = _CONFIG.value
    if config is None:
      raise app.UsageError("--config is required, e.g. --config configs/nmi.py")
    config.get("mode")  # config_flags defers a file's load error to the first access
  except OSError as e:
    _fail(f"cannot load the config file {flags.FLAGS['config'].config_filename!r}: "
          f"{_last_line(e)}")
  try:
    if _DISTRIBUTED.value or os.environ.get("CLMIM_DISTRIBUTED") == "1":
      initialize_distributed()
    workdir = _WORKDIR.value
    if workdir is None:
      workdir = default_workdir(config)
      print(f"No --workdir given; writing to {workdir}")
    run(config, workdir)
  except ClmimError as e:
    _fail(str(e))


def parse_flags(argv):
  """absl flag parsing with one clear line (and status 1) instead of a traceback for a bad
  config file, variant or `--config.field` override."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"bad flag: {_last_line(e)}")
  except (AttributeError, KeyError) as e:
    # ml_collections reports an unknown override as a bare key; name the flag that caused it.
    overrides = [a for a in argv if a.startswith("--config.")]
    culprit = next((a for a in overrides
                    if a.split("=")[0].rsplit(".", 1)[-1] in str(e)), None)
    hint = re.search(r'Did you mean "[^"]+"', str(e))
    _fail(f"{culprit or 'a --config override'}: the config has no such field"
          f"{' (' + hint.group(0) + '?)' if hint else ''}; every field is documented in the "
          f"config file and clmim/config_lib.py.")
  except (ValueError, TypeError, OSError, SyntaxError) as e:
    _fail(f"cannot load the config: {_last_line(e)}")


def _last_line(error: Exception) -> str:
  """The informative last line of a (possibly traceback-laden) error message."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else repr(error)


def _fail(message: str):
  print(f"clmim: error: {message}", file=sys.stderr)
  sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
