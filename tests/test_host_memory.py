"""clmim/host_memory.py: `keep_freed_memory()` sets glibc's three keep-freed-memory options (and
only those), training runs call it and nothing else does, CLMIM_HOST_MEMORY=system leaves glibc
alone, and the status says why; `run_with_tcmalloc()` restarts a command once with tcmalloc
preloaded (a stand-in library where the machine has no tcmalloc), and the command line does so
for training runs only.

These tests check what clmim controls: the options it sets, the library it preloads, the status
it reports. What the allocator then does (page faults and time per call) differs between
machines, kernels and glibc builds; benchmarks/host_memory.py measures it.

Each case runs in a fresh interpreter: the settings only work before JAX starts its threads.
"""
import os
import platform
import shutil
import subprocess
import sys

import pytest

from clmim import host_memory

# A fresh interpreter that records every mallopt call clmim makes (ctypes.CDLL is wrapped before
# clmim is imported), runs a small jitted function under the setting, and prints the status and
# the calls. What the allocator then does with the options (page faults per call: ~12,000 with
# glibc's defaults, ~0 with them, on one machine) depends on the machine's glibc and kernel, so it
# is measured by benchmarks/host_memory.py, not asserted here.
SCRIPT = """
import ctypes
calls = []
_CDLL = ctypes.CDLL
class _Recording(_CDLL):
  def __getattr__(self, name):
    function = super().__getattr__(name)
    if name != "mallopt":
      return function
    def mallopt(option, value):
      calls.append((option, value))
      return function(option, value)
    setattr(self, name, mallopt)  # CDLL caches the bare function on first access
    return mallopt
ctypes.CDLL = _Recording
{before}
from clmim import host_memory
{call}
import jax, jax.numpy as jnp
assert float(jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x)))(jnp.ones((64, 64)))) > 0
print(repr((host_memory.status(), calls)))
"""
# glibc's mallopt options (malloc.h) as keep_freed_memory must set them: one arena, no mmap for
# large blocks, no trimming.
KEEP_OPTIONS = [(-8, 1), (-4, 0), (-1, 2**31 - 1)]

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the settings are glibc's")


def _python(script, **env):
  """Runs `script` in a fresh interpreter with CLMIM_HOST_MEMORY unset (then `env`)."""
  environment = {k: v for k, v in os.environ.items() if k != "CLMIM_HOST_MEMORY"}
  return subprocess.run([sys.executable, "-c", script], env={**environment, **env},
                        capture_output=True, text=True, timeout=240, check=True)


def _run(before="", call="host_memory.keep_freed_memory()", **env):
  """(status, mallopt calls, stderr) of SCRIPT in a fresh interpreter."""
  done = _python(SCRIPT.format(before=before, call=call), **env)
  status, calls = eval(done.stdout.strip().splitlines()[-1])  # pylint: disable=eval-used
  return status, calls, done.stderr


@glibc_only
def test_keeping_freed_memory_sets_the_three_glibc_options():
  status, calls, _ = _run()
  # "keep" means glibc accepted every option (mallopt returned 1 for each).
  assert status == "keep" and calls == KEEP_OPTIONS, (status, calls)


@glibc_only
def test_system_setting_leaves_glibc_alone():
  status, calls, _ = _run(CLMIM_HOST_MEMORY="system")
  assert status == "system (CLMIM_HOST_MEMORY=system)" and calls == []


@glibc_only
def test_too_late_once_jax_has_started():
  status, calls, _ = _run(before="import jax; jax.devices()")
  assert status == "system (JAX's backends had already started)" and calls == []


@glibc_only
def test_importing_clmim_changes_nothing(imported_everything):
  """Importing clmim (every module of it and every config, as imported_everything does) makes
  no mallopt call, and JAX then runs with glibc's own settings."""
  status, calls = eval(imported_everything[-1])  # pylint: disable=eval-used
  assert status == "system (not requested: not a training run)" and calls == []


@glibc_only
def test_unknown_setting_warns_and_keeps():
  status, calls, stderr = _run(CLMIM_HOST_MEMORY="always")
  assert status == "keep" and calls == KEEP_OPTIONS
  assert ("CLMIM_HOST_MEMORY='always' is not one of ('tcmalloc', 'keep', 'system'); "
          "using 'tcmalloc'") in stderr


def test_an_option_glibc_refuses_is_reported(monkeypatch):
  """If mallopt returns 0 for an option, the status says so instead of claiming "keep"."""
  class RefusingLibc:
    def __init__(self, name):
      assert name == "libc.so.6"
    def mallopt(self, option, value):
      return 0 if option == -4 else 1
  monkeypatch.setattr(host_memory, "_status", None)
  monkeypatch.setattr(host_memory, "tcmalloc_loaded", lambda: None)
  monkeypatch.setattr(host_memory, "_backends_started", lambda: False)
  monkeypatch.setattr(host_memory.platform, "system", lambda: "Linux")
  monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
  monkeypatch.setattr(host_memory.ctypes, "CDLL", RefusingLibc)
  monkeypatch.setenv("CLMIM_HOST_MEMORY", "keep")
  assert host_memory.keep_freed_memory() == "system (glibc refused an option)"


# run_with_tcmalloc() in a `python -c` program: whether it ran before and after the restart.
RESTART_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from clmim import host_memory
print("loaded" if host_memory.tcmalloc_loaded() else "not loaded", flush=True)
host_memory.run_with_tcmalloc()
print(repr(host_memory.keep_freed_memory()))
"""
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESTART_LINE = "clmim: restarting with tcmalloc"


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
  """A harmless library under a tcmalloc name (a copy of this interpreter's libm): preloading it
  shows the restart without tcmalloc on the machine; the allocator stays glibc's."""
  with open("/proc/self/maps") as maps:
    libm = next(line.split()[-1] for line in maps if "/libm." in line or "/libm-" in line)
  path = tmp_path_factory.mktemp("lib") / "libtcmalloc_standin.so"
  shutil.copy(libm, path)
  return str(path)


@glibc_only
def test_run_with_tcmalloc_restarts_once_with_the_library_preloaded(stand_in):
  done = _python(RESTART_SCRIPT.format(root=ROOT), CLMIM_TCMALLOC=stand_in)
  assert done.stdout.splitlines() == ["not loaded", "loaded", "'tcmalloc'"]
  assert done.stderr.count(RESTART_LINE) == 1 and stand_in in done.stderr


@glibc_only
def test_a_preload_the_linker_ignores_restarts_once_and_keeps_glibc(tmp_path):
  missing = str(tmp_path / "libtcmalloc_missing.so")
  done = _python(RESTART_SCRIPT.format(root=ROOT), CLMIM_TCMALLOC=missing)
  assert done.stdout.splitlines() == ["not loaded", "not loaded", "'keep'"]
  assert done.stderr.count(RESTART_LINE) == 1 and "the linker ignored" in done.stderr


@glibc_only
@pytest.mark.parametrize("setting,expected", [("keep", "'keep'"),
                                              ("system", "'system (CLMIM_HOST_MEMORY=system)'")])
def test_keep_and_system_never_restart(stand_in, setting, expected):
  done = _python(RESTART_SCRIPT.format(root=ROOT), CLMIM_TCMALLOC=stand_in,
                 CLMIM_HOST_MEMORY=setting)
  assert done.stdout.splitlines() == ["not loaded", expected]
  assert RESTART_LINE not in done.stderr


@pytest.mark.slow
@glibc_only
@pytest.mark.parametrize("config,restarts", [("pretrain_simmim.py:runlocal", True),
                                             ("nmi.py", False)])
def test_the_command_line_restarts_training_runs_only(stand_in, tmp_path, config, restarts):
  """A file as --workdir stops either run at its checks, after the restart (or none)."""
  not_a_folder = tmp_path / "file"
  not_a_folder.write_text("")
  environment = {k: v for k, v in os.environ.items() if k != "CLMIM_HOST_MEMORY"}
  done = subprocess.run(
      [sys.executable, "-m", "clmim.main", "--config", os.path.join(ROOT, "configs", config),
       "--workdir", str(not_a_folder)], env={**environment, "CLMIM_TCMALLOC": stand_in},
      cwd=ROOT, capture_output=True, text=True, timeout=240)
  assert done.returncode == 1 and "is a file, not a folder" in done.stderr, done.stderr
  assert done.stderr.count(RESTART_LINE) == (1 if restarts else 0), done.stderr


@glibc_only
@pytest.mark.skipif(not host_memory.find_tcmalloc(),
                    reason="no tcmalloc on this machine (apt-get install libtcmalloc-minimal4)")
def test_with_tcmalloc_preloaded_glibc_is_left_alone():
  """With the real tcmalloc preloaded, the status says so and no glibc option is set."""
  status, calls, _ = _run(LD_PRELOAD=host_memory.find_tcmalloc())
  assert status == "tcmalloc" and calls == []


# main.run with a pretraining config and a file as its workdir: the run stops at its checks, after
# the mode has decided about host memory; an analysis config leaves it alone.
RUN_SCRIPT = """
import sys, tempfile
sys.path.insert(0, {root!r})
from clmim import host_memory, main
from clmim.errors import ClmimError
from configs import {module}
not_a_folder = tempfile.NamedTemporaryFile(delete=False).name
try:
  main.run({module}.get_config({variant!r}), not_a_folder)
except ClmimError as e:
  print("stopped:", e)
print(repr(host_memory.status()))
"""


@glibc_only
@pytest.mark.parametrize("module,variant,expected", [
    ("pretrain_simmim", "runlocal", "keep"),
    ("nmi", "", "system (not requested: not a training run)"),
])
def test_training_runs_keep_freed_memory(module, variant, expected):
  done = _python(RUN_SCRIPT.format(root=ROOT, module=module, variant=variant))
  assert "stopped:" in done.stdout
  assert eval(done.stdout.strip().splitlines()[-1]) == expected  # pylint: disable=eval-used


# Every module of clmim and every config, imported in one fresh interpreter: none may start JAX's
# backends, or what must run before them (host_memory.keep_freed_memory, and on a pod
# jax.distributed.initialize) could no longer run after `import` lines. A jnp array made at
# import time, as clmim/data/augment.py once did, starts them.
IMPORT_EVERYTHING = """
import importlib, os, pkgutil, sys
sys.path.insert(0, {root!r})
from jax._src import xla_bridge
import clmim
names = [m.name for m in pkgutil.walk_packages(clmim.__path__, "clmim.")]
names += ["configs." + f[:-3] for f in sorted(os.listdir(os.path.join({root!r}, "configs")))
          if f.endswith(".py") and not f.startswith("_")]
for name in names:
  importlib.import_module(name)
  if xla_bridge.backends_are_initialized():
    print("started by", name)
    break
else:
  print("not started after", len(names), "modules")
"""


@pytest.fixture(scope="module")
def imported_everything():
  """The output lines of IMPORT_EVERYTHING run as SCRIPT's call (mallopt calls recorded, then
  the small jitted function): one fresh interpreter (~2 s of imports) serves both the
  import-time tests, which ask different questions of the same imports."""
  done = _python(SCRIPT.format(before="", call=IMPORT_EVERYTHING.format(root=ROOT)))
  return done.stdout.strip().splitlines()


def test_importing_any_module_leaves_jax_unstarted(imported_everything):
  last = imported_everything[-2]  # the line before SCRIPT's (status, calls)
  assert last.startswith("not started after"), last
  assert int(last.split()[-2]) > 50  # every module was imported, not a handful
