"""Test set-up: eight fake CPU devices so every sharded code path runs on every test run.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.
"""
import os

# LLVM at -O0: the tests' models are tiny, so compiling dominates their time (~15 % less of it);
# XLA's matmuls and convolutions are library calls, unaffected.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
# Training runs make glibc keep freed memory (clmim/host_memory.py), which can slow XLA's
# compilation (the demo MoCo v3 step: 12.1-13.0 -> 15.3-15.8 s in one comparison); the tests
# mostly compile, so they run without it. tests/test_host_memory.py checks it with it on.
os.environ.setdefault("CLMIM_HOST_MEMORY", "system")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")

# One persistent compilation cache for the whole session, in a fresh folder: tests that compile
# the same step (a runlocal trainer, say) compile it once, and a session's time does not depend
# on what an earlier session left in ~/.cache/clmim/jax. Configs made in tests name it too.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

from clmim import config_lib, main  # noqa: E402

# With pytest-xdist the workers inherit the controller's environment, so they all share the one
# folder the controller made (and only the controller removes it).
if "CLMIM_TEST_CACHE" not in os.environ:
  os.environ["CLMIM_TEST_CACHE"] = tempfile.mkdtemp(prefix="clmim-test-cache-")
  atexit.register(shutil.rmtree, os.environ["CLMIM_TEST_CACHE"], ignore_errors=True)
SESSION_CACHE = os.environ["CLMIM_TEST_CACHE"]
config_lib.COMPILATION_CACHE = SESSION_CACHE
# Commands the tests start (python -m clmim.main, the notebooks, benchmarks) default to it too:
# no test reads or fills the user's ~/.cache/clmim/jax.
os.environ["CLMIM_COMPILATION_CACHE"] = SESSION_CACHE
main.enable_compilation_cache(SESSION_CACHE)



import pytest  # noqa: E402

from reference_timm import install_torchvision_import_fix  # noqa: E402

# torchvision (test-only, for timm) imports only through this fix: see reference_timm.py.
install_torchvision_import_fix()


@pytest.fixture
def no_compute(monkeypatch):
  """Any forward pass or training-state initialisation fails the test: a check under test must
  come before the first of them (an error after an hour of compute loses the hour)."""
  from clmim.analysis import runner  # pylint: disable=import-outside-toplevel
  from clmim.train import trainer  # pylint: disable=import-outside-toplevel

  def tripwire(*args, **kwargs):
    raise AssertionError("compute started before the input was checked")
  monkeypatch.setattr(runner.Analyzer, "run", tripwire)
  monkeypatch.setattr(trainer, "initial_state", tripwire)
