"""Host memory: which C allocator serves XLA:CPU, and how it is told to keep freed memory.

XLA:CPU gives each call of a compiled function one scratch buffer for all its intermediate
values (321 MB for the demo ViT's gradient at batch 64), allocated on one of XLA's worker threads
and freed when the call ends, and its matmul and YNNPACK kernels allocate packing buffers on every
call. glibc's malloc serves both badly:

- with its defaults, a block as large as the scratch buffer comes from a fresh `mmap` (from a
  worker thread's arena it always does, whatever the thresholds say), so every call page-faults
  the whole buffer in again and the kernel zeroes each page: ~150,000 page faults and ~0.5 s of
  kernel time per demo MoCo v3 step on a 2-core VM, a fifth of the step's CPU time;
- told to keep freed memory (one arena, `M_ARENA_MAX` 1; no `mmap` for large blocks,
  `M_MMAP_MAX` 0; no trimming, `M_TRIM_THRESHOLD` at its maximum) the faults are gone, but
  `_int_malloc` itself then takes 8-11 % of the step's CPU samples (perf), sorting its bins for
  the packing buffers.

tcmalloc (gperftools' `libtcmalloc_minimal.so.4`; `apt-get install libtcmalloc-minimal4`) does
neither: the demo MoCo v3 update ran 1.1-1.2x faster with it than with either glibc setting, and
compiled as fast as with glibc's defaults (benchmarks/host_memory.py). An allocator can only be
chosen when a process starts, so the command line (`python -m clmim.main` for config.mode
pretrain, finetune and sweep) and the training benchmarks call `run_with_tcmalloc()`, which
re-executes the same command once with tcmalloc in `LD_PRELOAD` when it is installed and not loaded
yet; the environment variable CLMIM_TCMALLOC names the library where it is not on the linker's
search path. Code that trains from Python (a notebook) cannot restart itself: it calls
`keep_freed_memory()` first thing, which finds tcmalloc if the process started with it (a Jupyter
server started with LD_PRELOAD set; Colab's runtimes long did that, and may not now) and otherwise
sets the three glibc options above, before JAX starts its threads.

The glibc options' price is that the process keeps its peak heap until it exits, and one arena
can slow XLA's multi-threaded compilation (the demo MoCo v3 step compiled in 12.1-13.0 s with
glibc's defaults and 15.3-15.8 s with them in one comparison), so analysis runs, which are short
or at ViT-B/16 scale have few faults for their compute, leave the allocator alone.

CLMIM_HOST_MEMORY chooses: "tcmalloc" (the default: tcmalloc where it can be had, else the
glibc options), "keep" (the glibc options; never restart) or "system" (leave everything alone).
The glibc options do nothing where libc is not glibc (macOS, musl) and once JAX's backends have
started (their threads have their arenas by then). `status()` says what applied; analysis runs
record it in results.json (`versions.host_memory`), training runs in their export's
manifest.json (`host_memory`, next to `training_time_s`), the benchmarks in their JSON.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
import warnings

ENV_VAR = "CLMIM_HOST_MEMORY"
CHOICES = ("tcmalloc", "keep", "system")
LIBRARY_VAR = "CLMIM_TCMALLOC"  # the tcmalloc library to preload, where the linker cannot find it
# Set in the restarted process, so that a preload the linker ignored does not restart it again.
_RESTARTED_VAR = "CLMIM_TCMALLOC_RESTARTED"

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1

_status: str | None = None


def _backends_started() -> bool:
  if "jax" not in sys.modules:  # not imported yet, so certainly not started
    return False
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  return xla_bridge.backends_are_initialized()


def _choice() -> str:
  choice = os.environ.get(ENV_VAR, "tcmalloc")
  if choice not in CHOICES:
    warnings.warn(f"{ENV_VAR}={choice!r} is not one of {CHOICES}; using 'tcmalloc'.",
                  stacklevel=3)
    choice = "tcmalloc"
  return choice


def tcmalloc_loaded() -> str | None:
  """The path of the tcmalloc library mapped into this process (then it is the allocator: only a
  preloaded one can be), or None."""
  try:
    with open("/proc/self/maps") as maps:
      for line in maps:
        path = line.split(maxsplit=5)[-1].strip()
        if os.path.basename(path).startswith("libtcmalloc"):
          return path
  except OSError:  # not Linux
    pass
  return None


def find_tcmalloc() -> str | None:
  """The tcmalloc library to preload: $CLMIM_TCMALLOC, else gperftools' as the linker finds it
  (libtcmalloc_minimal, then libtcmalloc), else None."""
  if os.environ.get(LIBRARY_VAR):
    return os.environ[LIBRARY_VAR]
  import ctypes.util  # pylint: disable=import-outside-toplevel
  return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def run_with_tcmalloc() -> None:
  """Restarts this command (same interpreter, same arguments) with tcmalloc preloaded, once, when
  CLMIM_HOST_MEMORY is "tcmalloc" (the default), the process runs on Linux without tcmalloc and
  a tcmalloc library is found; otherwise returns and the caller goes on. Call it first thing in a
  program's entry point (nothing printed, nothing started: the process is replaced): never in a
  notebook or under a test runner, which would restart with it."""
  if _choice() != "tcmalloc" or platform.system() != "Linux" or tcmalloc_loaded():
    return
  if os.environ.get(_RESTARTED_VAR):
    warnings.warn(f"{_RESTARTED_VAR} is set but no tcmalloc is loaded: the linker ignored "
                  f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}; going on with glibc's "
                  f"malloc. Set {LIBRARY_VAR} to the library's path.", stacklevel=2)
    return
  library, argv = find_tcmalloc(), getattr(sys, "orig_argv", None)
  if not library or not argv:
    return
  env = dict(os.environ)
  env["LD_PRELOAD"] = " ".join(filter(None, [library, env.get("LD_PRELOAD")]))
  env[_RESTARTED_VAR] = "1"
  # tcmalloc reports every allocation over 1 GiB on stderr; a ViT-B/16 step's scratch buffer is.
  env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
  print(f"clmim: restarting with tcmalloc ({library}) as the memory allocator, which XLA:CPU "
        f"needs to run fast (clmim/host_memory.py; {ENV_VAR}=keep skips this).",
        file=sys.stderr, flush=True)
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable] + list(argv[1:]), env)


def keep_freed_memory() -> str:
  """Makes freed host memory stay with the process for XLA's next call, once per process, before
  JAX starts: nothing to do where tcmalloc is the allocator, else the glibc options of the module
  docstring (unless CLMIM_HOST_MEMORY=system). Returns status()."""
  global _status
  if _status is not None:
    return _status
  choice = _choice()
  if tcmalloc_loaded():
    _status = "tcmalloc"
  elif choice == "system":
    _status = f"system ({ENV_VAR}=system)"
  elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    _status = "system (libc is not glibc)"
  elif _backends_started():
    _status = "system (JAX's backends had already started)"
    logging.info("clmim: freed host memory is not kept for reuse: call "
                 "host_memory.keep_freed_memory() before anything runs on JAX.")
  else:
    libc = ctypes.CDLL("libc.so.6")
    done = all(libc.mallopt(option, value) == 1 for option, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX)))
    _status = "keep" if done else "system (glibc refused an option)"
  return _status


def status() -> str:
  """What serves host memory: 'tcmalloc' (the process started with it), 'keep' (glibc told to
  keep freed memory), or 'system (<why>)' (glibc's defaults)."""
  if _status is None and tcmalloc_loaded():
    return "tcmalloc"
  return _status or "system (not requested: not a training run)"
