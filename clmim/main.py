r"""clmim's command-line entry point.

  python -m clmim.main --config configs/nmi.py [--workdir DIR] [--config.field=value ...]

The config file's `get_config(arg)` returns a locked ConfigDict (`--config file.py:arg` picks a
variant such as `runlocal`); `config.mode` selects what runs:
  analyze    the analyses of an analysis config (configs/nmi.py, analyze.py:<analyses>,
             paper.py, ...): results.json, figures and a summary in the workdir;
  pretrain   a pretraining config (configs/pretrain_*.py): trains, resuming from the workdir;
  finetune   configs/finetune.py: supervised fine-tuning of a pretrained encoder, resuming from
             the workdir, validated on held-out images;
  export     with a pretraining (or fine-tuning) config and its --workdir: the encoder of the latest checkpoint
             as a clmim checkpoint;
  snapshots  with a pretraining config and its --workdir: the analyses over every kept
             checkpoint (metrics over training);
  sweep      with configs/pretrain_hybrid.py: one model per λ of config.sweep.weights, then
             the analyses over all of them and a figure against λ.
Every config field is documented in the README's "Configs" section and next to its default in
clmim/config_lib.py. `--print_config` prints the resolved config and exits.
Every user error (a bad file, field, name, workdir) is checked before any compute and printed as
one line "clmim: error: ..." with exit status 1. Ctrl-C prints one line "clmim: interrupted
(Ctrl-C); ..." saying what the run left in its workdir, with exit status 130 (an analysis leaves
no partial outputs; training saves a checkpoint first, see clmim/jobs/pretrain.py).
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
import _thread

_BEFORE_RUN = "clmim: interrupted (Ctrl-C) before the run started; nothing was written.\n"


def _exit_before_run(signum, frame):
  """Ctrl-C while flags, the config and the libraries load: nothing is written yet, so the
  process ends at once (a KeyboardInterrupt raised inside an import or a garbage-collector
  callback would print a traceback, or be ignored)."""
  del signum, frame
  os.write(2, _BEFORE_RUN.encode())
  os._exit(130)


# Before the slow imports below. A process started with SIGINT ignored (a `&` job of a shell
# without job control, e.g. a script's background run) keeps ignoring it: the terminal's Ctrl-C
# is meant for the command in the foreground.
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
  signal.signal(signal.SIGINT, _exit_before_run)

from absl import app, flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally followed by ':variant'.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder. Default: runs/<config name>-<date>-<time>.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config (after overrides) and exit.")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show the INFO logs of JAX, orbax and absl (hidden by default).")
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


def run(config, workdir: str, invocation: dict | None = None):
  """Runs `config` in `workdir` (what `main` does after parsing flags).

  Everything that can be checked without loading models or data is checked first
  (`clmim.preflight`); the jobs then resolve their models and data, still before any compute.
  `invocation` (command line, overrides, workdir) is recorded in what the run writes.
  """
  from clmim import preflight
  from clmim.jobs import JOBS
  mode = preflight.check_mode(config)  # each job runs the rest of preflight.check_run first
  if JOBS[mode].training:
    from clmim import host_memory  # before JAX starts: see clmim/host_memory.py
    host_memory.keep_freed_memory()
  enable_compilation_cache(config.get("compilation_cache", ""))
  invocation = invocation or {"command": None, "overrides": [], "workdir": workdir}
  return JOBS[mode].run(config, workdir, invocation)


def enable_compilation_cache(folder: str) -> None:
  """Keeps compiled XLA programs in `folder` (JAX's persistent compilation cache), so that a
  later run of the same steps on the same backend loads them instead of compiling again; ""
  leaves the cache off. Every program is cached, however quick its compilation."""
  if not folder:
    return
  import jax
  from clmim.errors import ClmimError
  folder = os.path.expanduser(folder)
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise ClmimError(f"config.compilation_cache={folder!r}: cannot create the folder "
                     f"({e.strerror}); name a writable folder, or '' to turn the cache off.")
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# What the Ctrl-C line reports: the run's mode and workdir, and the workdir's listing when the
# run started (set by `main` once they are known).
_RUN = {}


def listing(workdir) -> dict:
  """{name: modification time (ns)} of the entries directly in `workdir` ({} if none)."""
  try:
    with os.scandir(workdir) as entries:
      return {e.name + ("/" if e.is_dir() else ""): e.stat().st_mtime_ns for e in entries}
  except OSError:
    return {}


def interrupted_line(mode=None, workdir=None, before=None) -> str:
  """The one line a Ctrl-C prints: what the run left in its workdir (the entries written or
  removed since it started, from `before`, its listing then) and how to go on."""
  line = "clmim: interrupted (Ctrl-C)"
  if not mode or not workdir:
    return f"{line} before the run started; nothing was written."
  now, before = listing(workdir), before or {}
  written = sorted(name for name, mtime in now.items() if before.get(name) != mtime)
  removed = sorted(set(before) - set(now))
  shown = lambda names: ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6
                                                else "")
  what = f"wrote {shown(written)} in {workdir}" if written else \
      f"nothing was written in {workdir}"
  if removed:
    what += f", removed {shown(removed)}" + (" (--config.overwrite=True)" if mode == "analyze"
                                             else "")
  if mode == "analyze":
    tail = "" if "results.json" in written else \
        " (an analysis writes its outputs together, at the end)"
  elif mode in ("pretrain", "finetune", "sweep"):
    from clmim import preflight
    steps = preflight.checkpoint_steps(workdir)
    tail = (f"; the checkpoint of step {steps[-1]} is kept: the same command resumes from it"
            if steps else "; the same command runs it again")
    if mode == "sweep":
      tail = "; finished λ runs are kept: the same command resumes the sweep"
  else:
    tail = "; the same command runs it again"
  return f"{line}; {what}{tail}."


def invocation_record(argv, workdir: str) -> dict:
  """What a run records about how it was started: the command, its overrides, the workdir."""
  args = list(argv[1:])
  return {"command": "python -m clmim.main " + shlex.join(args),
          "overrides": [a for a in args if a.startswith("--config.")], "workdir": workdir}


def config_text(config) -> str:
  """The resolved config as plain YAML: every value as `--config.field=value` takes it, tuples
  as [a, b] lists, no `!!python/tuple` tags and no `&id001` anchors for values that happen to
  be shared (ConfigDict's own str() prints both)."""
  import yaml

  class Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):
      return True  # a value used twice is printed twice, not as an anchor and an alias

  sequence = lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", list(data),
                                                            flow_style=True)
  Dumper.add_representer(tuple, sequence)
  Dumper.add_representer(list, sequence)
  # Anything else a config may hold (a path object, a dtype) as its text, not a Python tag.
  Dumper.add_multi_representer(object, lambda dumper, data: dumper.represent_str(str(data)))
  return yaml.dump(config.to_dict(), Dumper=Dumper, default_flow_style=False, sort_keys=True,
                   allow_unicode=True, width=100)


def quiet_libraries():
  """Hides the INFO chatter of absl, orbax and JAX (a user reads results, not library logs)."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  for name in ("absl", "jax", "orbax", "orbax.checkpoint", "etils"):
    logging.getLogger(name).setLevel(logging.WARNING)


def main(argv):
  from clmim.errors import ClmimError
  try:
    config = _CONFIG.value
    if config is None:
      _fail("--config is required, e.g. --config configs/nmi.py (see --help).")
    config.get("mode")  # config_flags defers a file's load error to the first access
  except OSError as e:
    _fail(f"cannot load the config file {flags.FLAGS['config'].config_filename!r}: "
          f"{_last_line(e)}")
  if _PRINT_CONFIG.value:
    print(config_text(config), end="")
    return
  from clmim.jobs import JOBS  # the table only: nothing heavy is imported
  if config.get("mode") in JOBS and JOBS[config.get("mode")].training:
    from clmim import host_memory  # before anything is printed or started: it may restart us
    host_memory.run_with_tcmalloc()
  if not _VERBOSE.value:
    quiet_libraries()
  try:
    if _DISTRIBUTED.value or os.environ.get("CLMIM_DISTRIBUTED") == "1":
      initialize_distributed()
    workdir = _WORKDIR.value
    if workdir is None:
      workdir = default_workdir(config)
      print(f"No --workdir given; writing to {workdir}")
    _RUN.update(mode=config.get("mode"), workdir=workdir, before=listing(workdir))
    if signal.getsignal(signal.SIGINT) is _exit_before_run:
      # From here a Ctrl-C unwinds (the jobs' cleanup runs) and `cli` reports it.
      signal.signal(signal.SIGINT, signal.default_int_handler)
      sys.unraisablehook = _interrupt_again
    run(config, workdir, invocation_record(sys.argv, workdir))  # absl strips argv of flags
  except ClmimError as e:
    # An error may carry its own status (e.g. 130 for a run stopped by Ctrl-C); else 1.
    _fail(str(e), getattr(e, "exit_status", 1))


_HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")


def _print_help():
  print(__doc__.strip())
  print("\nFlags:\n" + "\n".join(
      f"  --{name}: {flags.FLAGS[name].help}" for name in
      ("config", "workdir", "print_config", "verbose", "distributed")))


def parse_flags(argv):
  """absl flag parsing with one clear line (and status 1) instead of a traceback for a bad
  config file, variant or `--config.field` override; `--help` prints the usage, status 0."""
  if any(a in _HELP_FLAGS for a in argv[1:]):
    _print_help()
    sys.exit(0)
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


def _fail(message: str, status: int = 1):
  print(f"clmim: error: {message}", file=sys.stderr)
  sys.exit(status)


def _signal_main_thread():
  """SIGINT to the main thread itself, which also wakes it from a blocking wait (a sleep, a
  lock); `_thread.interrupt_main` (where threads cannot be signalled) only when it returns."""
  if hasattr(signal, "pthread_kill"):
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
  else:
    _thread.interrupt_main()


def _interrupt_again(unraisable):
  """A KeyboardInterrupt raised where Python can only ignore it (a garbage-collector callback,
  a __del__) is raised again a moment later, from another thread, so that it lands in the main
  thread's own code (raised here, it would be ignored again); anything else as Python reports
  it."""
  if isinstance(unraisable.exc_value, KeyboardInterrupt):
    threading.Timer(0.01, _signal_main_thread).start()
    return
  sys.__unraisablehook__(unraisable)


def cli():
  """`python -m clmim.main`: `main` under absl, with a Ctrl-C reported in one line (what the run
  left behind, `interrupted_line`) and exit status 130 (128 + SIGINT), not a traceback.
  Training saves a checkpoint on Ctrl-C and stops with its own line (clmim.jobs.pretrain)."""
  try:
    app.run(main, flags_parser=parse_flags)
  except KeyboardInterrupt:
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # a second Ctrl-C: out at once
    print(interrupted_line(**_RUN), file=sys.stderr, flush=True)
    sys.exit(130)
  finally:
    sys.unraisablehook = sys.__unraisablehook__


if __name__ == "__main__":
  cli()
