"""`clmim.main` runs whatever `clmim.jobs.JOBS` names: a new mode is one module and one row."""
import pytest

from clmim import jobs, main
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
  for kind in jobs.KINDS.values():  # every kind of config has its check, and a resumed one
    for target in filter(None, (kind.check_target, kind.resume_target)):  # its resume rule
      module, function = target.split(":")
      assert callable(getattr(importlib.import_module(module), function)), target
  assert {job.kind for job in jobs.JOBS.values()} == set(jobs.KINDS)


def test_a_registered_job_runs_through_main(tmp_path, monkeypatch):
  monkeypatch.setitem(jobs.JOBS, "count", jobs.Job(
      "count", "analysis", f"{__name__}:run", None, False, "a test job"))
  config = all_config.get_config("runlocal")
  config.mode = "count"
  assert main.run(config, str(tmp_path)) == "done"
  assert CALLS[-1] == ("count", str(tmp_path), str(tmp_path))
  config.mode = "counts"
  with pytest.raises(ClmimError, match="config.mode='counts' .did you mean 'count'.*: "
                     "expected one of analyze"):
    main.run(config, str(tmp_path))
