r"""Wall time and peak memory of whole commands a user runs: the embedded analysis runs and the
test suite's two tiers.

Each command runs in a fresh process, one after another, with a fresh JAX compilation cache (a
temporary folder, so every compilation is cold as on a new machine; `--warm` keeps the user's
own cache instead) and a temporary workdir. Measured per command: wall seconds, the peak
resident memory of the process tree's largest process (`os.wait4`'s rusage), its exit status,
and for the test tiers the summary line pytest printed.

  python benchmarks/command_times.py [--runs nmi,analyze,paper] [--tests quick,full] [--warm]

`--runs` names analysis configs (`configs/<name>.py`, or `<name>:<variant>`); `--tests` names tiers:
`quick` is `python -m pytest -q -n 2 -m "not slow" tests`, `full` the README's (and CI's)
`python -m pytest -q -n 2 tests`. Run it on a quiet machine; it prints one JSON object.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine_info import cpu_name  # noqa: E402

TIERS = {"quick": ["-m", "pytest", "-q", "-n", "2", "-m", "not slow", "tests"],
         "full": ["-m", "pytest", "-q", "-n", "2", "tests"]}


def timed(arguments, env):
  """Runs `python <arguments>` in ROOT: (wall seconds, peak RSS in MB, exit status, output)."""
  with tempfile.TemporaryFile("w+") as output:
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, *arguments], cwd=ROOT, env=env, stdout=output,
                               stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    output.seek(0)
    text = output.read()
  # ru_maxrss is in kB on Linux: the largest single process among the finished children.
  return round(seconds, 1), round(usage.ru_maxrss / 1024), process.returncode, text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", default="nmi,analyze,paper",
                      help="analysis configs to run (configs/<name>.py[:variant]), comma-separated")
  parser.add_argument("--tests", default="",
                      help="test tiers to time: quick, full (comma-separated; default none)")
  parser.add_argument("--warm", action="store_true",
                      help="use the user's compilation cache instead of a fresh one")
  args = parser.parse_args(argv)
  report = {"benchmark": "command_times", "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "compilation_cache": "warm (the user's)" if args.warm else "cold (a fresh folder)",
            "runs": {}, "tests": {}}
  with tempfile.TemporaryDirectory(prefix="clmim-command-times-") as scratch:
    env = dict(os.environ)
    if not args.warm:
      # Every config's compilation_cache defaults to this folder (clmim/config_lib.py), and the
      # test suite makes a fresh one per session anyway.
      env["CLMIM_COMPILATION_CACHE"] = os.path.join(scratch, "jax-cache")
    for name in filter(None, args.runs.split(",")):
      module, _, variant = name.partition(":")
      config = f"configs/{module}.py" + (f":{variant}" if variant else "")
      seconds, peak, status, text = timed(
          ["-m", "clmim.main", "--config", config, "--workdir", os.path.join(scratch, name),
           "--config.progress=False"], env)
      report["runs"][name] = {"command": f"python -m clmim.main --config {config}",
                              "wall_s": seconds, "peak_rss_mb": peak, "exit_status": status}
      print(f"{name}: {seconds} s, {peak} MB, status {status}", file=sys.stderr, flush=True)
      if status:
        print(text[-3000:], file=sys.stderr)
    for tier in filter(None, args.tests.split(",")):
      seconds, peak, status, text = timed(TIERS[tier], env)
      summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed)", line)]
      report["tests"][tier] = {"command": "python " + " ".join(
          f'"{a}"' if " " in a else a for a in TIERS[tier]), "wall_s": seconds,
                               "exit_status": status, "summary": summary[-1] if summary else ""}
      print(f"{tier} tests: {seconds} s, status {status}", file=sys.stderr, flush=True)
      if status:
        print(text[-6000:], file=sys.stderr)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
