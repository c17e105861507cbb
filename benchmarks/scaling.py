r"""Scaling of an analysis run with the number of images: time linear, memory flat.

For each N of --images, runs `Analyzer` (a random-init ViT --variant at --size px, the analyses
of --analyses, float32) over N procedural validation images streamed through the evaluation
loader (`EvalImages.load_batches`: worker threads, a bounded number of batches in flight; no
N-sized array is ever built) and measures the run's wall time and the process's memory.

Each N runs in a fresh subprocess (this script with --child N): the peak resident memory of a
process (getrusage ru_maxrss) never goes down, so in one process a small N measured after a
large one would report the large one's peak. In its subprocess each N first runs one batch
(which compiles the step), then the timed run over all N images: `seconds` is that streamed run
only (rendering, preprocessing, transfer, steps, host accumulation; no compile), and the peak
is the whole subprocess's (Python, JAX, the compiled step and the run).

  python benchmarks/scaling.py [--variant Ti/16] [--size 224] [--depth 0]
      [--images 512,2048,8192] [--analyses attention_distance,nmi,fourier] [--batch 32]
      [--workers 0]
  # the CPU smoke setting of tests/test_benchmarks.py (two fake devices):
  XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
    python benchmarks/scaling.py --variant mu/4 --size 32 --depth 2 --images 16,64,256 --batch 8

--depth (0 = the variant's) gives the ViT fewer or more blocks (a quick smoke run with fewer).

Prints one JSON object:
  model, image_size, depth, analyses, device_batch, global_batch, workers (loader threads).
  runs: per N, in the order given: images (N), num_images (the run's own count), seconds,
    images_per_s, seconds_per_image, compile_s (the warm-up batch that compiled the step, not
    in seconds), compilations (traces of the step: 1), peak_rss_mb (ru_maxrss of the
    subprocess at its end), peak_growth_mb (how much the timed run raised that peak over the
    peak before it: small and not growing with N when the stream's memory is bounded),
    rss_before_mb and rss_after_mb (resident memory just before and after the timed
    run, from /proc/self/statm; null where there is none).
  fit: seconds = a + b * N by least squares: a_s, b_s_per_image, r2 (1 = exactly linear),
    images_per_s (1 / b).
  peak_memory_ratio: peak_rss_mb of the largest N over that of the smallest (1 = flat).
  backend, device, device_count, jax (from the first subprocess), cpu_count, machine, python,
  total_seconds (the whole script, subprocesses included).
Memory is the host's resident memory; on an accelerator the device's memory is not measured
(the compiled step's buffers are fixed by the batch, not by N).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # clmim without installing it, and benchmarks/ as a namespace package

DEFAULT_ANALYSES = "attention_distance,nmi,fourier"


def _mib(num_bytes: float) -> float:
  """Bytes -> MiB, one decimal (the JSON's *_mb fields)."""
  return round(num_bytes / 2 ** 20, 1)


def peak_rss_bytes() -> int:
  """The process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes():
  """The process's resident memory now (/proc/self/statm), or None where there is no /proc."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return None


def run_child(args) -> dict:
  """One N in this process: compile on one batch, then the timed streamed run; one JSON line."""
  import functools

  import jax

  from benchmarks.device_check import random_params, synthetic_config
  from clmim.analysis import core, runner
  from clmim.data import loader
  from clmim.data.eval_data import EvalImages
  from clmim.models.vit import build_vit, forward_with_states

  n = args.child
  model = build_vit(args.variant, image_size=args.size, depth=args.depth or None)
  mesh = runner.make_mesh()
  params = jax.device_put(random_params(model),
                          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  analyzer = runner.Analyzer(functools.partial(forward_with_states, model),
                             core.load_all(args.analyses), model.patch_size, mesh=mesh,
                             device_batch_size=args.batch)
  workers = args.workers or loader.default_num_workers()
  images = EvalImages(synthetic_config(n, workers),
                      {"image_size": args.size, "mean": "imagenet", "std": "imagenet"})
  batch = analyzer.local_batch_size
  # One batch first: the compile is a constant, not part of how the run scales.
  analyzer.run(params, images.load_batches(range(min(n, batch)), batch), progress=False)
  peak_before, rss_before = peak_rss_bytes(), current_rss_bytes()
  start = time.perf_counter()
  results = analyzer.run(params, images.load_batches(range(n), batch), num_images=n,
                         progress=False)
  seconds = time.perf_counter() - start
  peak_after, rss_after = peak_rss_bytes(), current_rss_bytes()
  devices = jax.devices()
  return {
      "images": n, "num_images": results["num_images"], "seconds": round(seconds, 4),
      "images_per_s": round(n / seconds, 2), "seconds_per_image": float(f"{seconds / n:.4g}"),
      "compile_s": round(analyzer.compile_seconds, 2), "compilations": analyzer.compilations,
      "peak_rss_mb": _mib(peak_after), "peak_growth_mb": _mib(peak_after - peak_before),
      "rss_before_mb": None if rss_before is None else _mib(rss_before),
      "rss_after_mb": None if rss_after is None else _mib(rss_after),
      "device_batch": analyzer.device_batch_size, "global_batch": analyzer.global_batch_size,
      "workers": workers, "depth": model.depth, "backend": jax.default_backend(),
      "device": str(devices[0].device_kind), "device_count": len(devices),
      "jax": jax.__version__,
  }


def linear_fit(xs, ys) -> dict:
  """Least-squares ys = a + b * xs, with R^2 (1 when ys is exactly linear in xs)."""
  import numpy as np
  x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  b, a = np.polyfit(x, y, 1)
  residual = float(((y - (a + b * x)) ** 2).sum())
  total = float(((y - y.mean()) ** 2).sum())
  return {"a_s": round(float(a), 4), "b_s_per_image": float(f"{b:.4g}"),
          "r2": round(1.0 - residual / total, 5) if total > 0 else None,
          "images_per_s": round(1.0 / b, 2) if b > 0 else None}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="Ti/16")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--depth", type=int, default=0, help="ViT blocks (0 = the variant's)")
  parser.add_argument("--images", default="512,2048,8192", help="comma list of N")
  parser.add_argument("--analyses", default=DEFAULT_ANALYSES)
  parser.add_argument("--batch", type=int, default=32, help="images per device per step")
  parser.add_argument("--workers", type=int, default=0,
                      help="loader threads; 0 = the loader's default (one per core, at most 8)")
  parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(run_child(args)))
    return

  started = time.perf_counter()
  counts = [int(x) for x in args.images.split(",") if x.strip()]
  if len(counts) < 2 or min(counts) < 1:
    parser.error(f"--images: expected at least two positive counts, got {args.images!r}")
  runs = []
  for n in counts:
    command = [sys.executable, os.path.abspath(__file__), "--child", str(n),
               "--variant", args.variant, "--size", str(args.size), "--depth", str(args.depth),
               "--analyses", args.analyses,
               "--batch", str(args.batch), "--workers", str(args.workers)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
      sys.stderr.write(done.stderr)
      raise SystemExit(f"scaling: the run over {n} images failed (exit {done.returncode}).")
    runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
  first = runs[0]
  smallest = min(runs, key=lambda r: r["images"])
  largest = max(runs, key=lambda r: r["images"])
  print(json.dumps({
      "benchmark": "scaling", "model": f"ViT-{args.variant}", "image_size": args.size,
      "depth": first["depth"],
      "analyses": [a.strip() for a in args.analyses.split(",") if a.strip()],
      "device_batch": first["device_batch"], "global_batch": first["global_batch"],
      "workers": first["workers"],
      "runs": [{k: v for k, v in r.items()
                if k not in ("device_batch", "global_batch", "workers", "depth", "backend",
                             "device", "device_count", "jax")} for r in runs],
      "fit": linear_fit([r["images"] for r in runs], [r["seconds"] for r in runs]),
      "peak_memory_ratio": round(largest["peak_rss_mb"] / smallest["peak_rss_mb"], 4),
      "backend": first["backend"], "device": first["device"],
      "device_count": first["device_count"], "jax": first["jax"], "cpu_count": os.cpu_count(),
      "machine": platform.machine(), "python": platform.python_version(),
      "total_seconds": round(time.perf_counter() - started, 2),
  }))


if __name__ == "__main__":
  main()
