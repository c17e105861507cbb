r"""The complete analysis suite (configs/paper.py) end to end: wall time, peak memory, compilations.

Runs `clmim.jobs.analyze.run` in this process on `--images` held-out procedural images for the
two demo models and their untrained copies (every analysis of clmim/analysis/), and prints one
JSON object: total and per-model seconds, the peak resident memory of the process, the number
of compilations of the analysis step (one per architecture) and the analyses run.

  python benchmarks/analysis_suite.py [--images 1000] [--batch 64] [--workdir /tmp/suite]
"""
import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/ is not a package of the installed clmim


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--analyses", default="", help="comma-separated; default: all")
  parser.add_argument("--workdir", default="")
  args = parser.parse_args()

  import jax
  from clmim.jobs import analyze
  from configs import paper

  config = paper.get_config("demo")
  config.data.num_images = args.images
  config.batch_size = args.batch
  config.progress = False
  if args.analyses:
    config.analyses = args.analyses
  workdir = args.workdir or tempfile.mkdtemp(prefix="clmim-suite-")
  shutil.rmtree(workdir, ignore_errors=True)
  started = time.perf_counter()
  with contextlib.redirect_stdout(sys.stderr):  # the job's tables; stdout is the JSON only
    results = analyze.run(config, workdir)
  seconds = time.perf_counter() - started
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(json.dumps({
      "benchmark": "analysis_suite", "images": results["num_images"],
      "models": list(results["models"]), "analyses": config.analyses.split(","),
      "batch": args.batch, "seconds": round(seconds, 1),
      "seconds_per_model": {n: i["seconds"] for n, i in results["model_info"].items()},
      "compilations": results["compilations"], "compile_seconds": results["compile_seconds"],
      "peak_memory_mb": round(peak_kib / 1024),
      "figures": results["figures"], "workdir": args.workdir or "a temporary folder",
      "backend": jax.default_backend(), "devices": jax.device_count(),
      "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
  }))


if __name__ == "__main__":
  main()
