"""Host memory: ask the C allocator to keep freed memory for reuse (Linux, glibc), and why.

XLA:CPU gives each call of a compiled function one scratch buffer for all its intermediate
values (321 MB for the demo ViT's gradient at batch 64), allocated on one of XLA's worker threads
and freed when the call ends. glibc serves a block that large with a fresh `mmap` (from a worker
thread's arena it always does, whatever its thresholds say), so every call page-faults the whole
buffer in again and the kernel zeroes each page. Measured on a 2-core VM: ~150,000 page faults
and ~0.5 s of kernel time per demo MoCo v3 training step, a fifth of the step's CPU time.

`keep_freed_memory()` sets three glibc options before JAX starts its threads: one malloc arena
for all threads (`M_ARENA_MAX` 1), no `mmap` for large blocks (`M_MMAP_MAX` 0) and no trimming
of the heap (`M_TRIM_THRESHOLD` at its maximum). The next call then reuses the previous call's
buffer: no page faults. The cost is that the process keeps its peak heap until it exits.

Training runs call it (`clmim.main.run` for `config.mode` pretrain, finetune and sweep): they
compile a few steps once and run them thousands of times. Nothing else does, because one arena
can slow XLA's multi-threaded compilation (the demo MoCo v3 step compiled in 12.1-13.0 s with
glibc's defaults and 15.3-15.8 s with these settings in one comparison; 17.6-18.2 against
18.1-20.4 s in benchmarks/host_memory.py), and analysis runs are short or, at ViT-B/16
scale, have few faults for their compute. Code that trains from Python calls it first thing.
The environment variable CLMIM_HOST_MEMORY="system" turns it off. It has no effect where libc
is not glibc (macOS, musl) and none once JAX's backends have started (their threads have their
arenas by then): `status()` says which.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
import warnings

ENV_VAR = "CLMIM_HOST_MEMORY"
CHOICES = ("keep", "system")

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


def keep_freed_memory() -> str:
  """Applies the settings described in the module docstring once per process; returns status()."""
  global _status
  if _status is not None:
    return _status
  choice = os.environ.get(ENV_VAR, "keep")
  if choice not in CHOICES:
    warnings.warn(f"{ENV_VAR}={choice!r} is not one of {CHOICES}; using 'keep'.", stacklevel=2)
    choice = "keep"
  if choice == "system":
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
  """'keep' when the settings are in force; otherwise 'system (<why>)'."""
  return _status or "system (not requested: not a training run)"
