"""`clmim.main` runs whatever `clmim.jobs.JOBS` names: a new mode is one module and one row."""
import pytest

from clmim import jobs, main, preflight
from clmim.errors import ClmimError
from configs import analyze as all_config

CALLS = []


def run(config, workdir, invocation=None):  # a job: what the row's target names
  CALLS.append((config.mode, workdir, invocation["workdir"]))
  return "done"


def test_every_row_points_at_a_run_function():
  import importlib
  for job in jobs.JOBS.values():
    module, function = job.target.split(":")
    assert callable(getattr(importlib.import_module(module), function)), job.mode
  assert preflight.MODES == tuple(jobs.JOBS)


def test_a_registered_job_runs_through_main(tmp_path, monkeypatch):
  monkeypatch.setitem(jobs.JOBS, "count", jobs.Job(
      "count", "analysis", f"{__name__}:run", None, False, "a test job"))
  monkeypatch.setattr(preflight, "MODES", tuple(jobs.JOBS))
  monkeypatch.setattr(preflight, "ANALYSIS_MODES", jobs.modes("analysis"))
  config = all_config.get_config("runlocal")
  config.mode = "count"
  assert main.run(config, str(tmp_path)) == "done"
  assert CALLS[-1] == ("count", str(tmp_path), str(tmp_path))
  config.mode = "counts"
  with pytest.raises(ClmimError, match="config.mode='counts': expected one of analyze"):
    main.run(config, str(tmp_path))
