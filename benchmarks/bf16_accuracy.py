r"""How far bfloat16 moves each metric: the same analysis run in float32 and bfloat16.

Runs `clmim.jobs.analyze.run` twice on the same models and images — `config.dtype="float32"`,
then `"bfloat16"` (the user's own path: the models' matmuls in bf16, softmax, LayerNorm
statistics and every metric sum in float32) — and compares every numeric result per model and
metric:

  max_rel    max |bf16 - f32| / max |f32| over the metric's entries (blocks, heads, ...);
  max_abs    max |bf16 - f32| (for accuracies: top-1 points).

Prints one JSON object (also the wall time of each run). The README's table comes from

  python benchmarks/bf16_accuracy.py                      # the demo models, 512 images
  python benchmarks/bf16_accuracy.py --models random:B/16 --images 64 --batch 16 \
      --analyses attention_distance,nmi,fourier,homogeneity,feature_variance,svd,cka
"""
import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/ is not a package of the installed clmim

DEMO_ANALYSES = ("attention_distance,nmi,fourier,homogeneity,feature_variance,svd,cka,"
                 "object_attention,probing")


def numeric_leaves(tree, prefix=""):
  """{path: float64 array} of every numeric leaf (lists of numbers) in a results entry."""
  out = {}
  if isinstance(tree, dict):
    for key, value in tree.items():
      out.update(numeric_leaves(value, f"{prefix}/{key}" if prefix else str(key)))
    return out
  try:
    array = np.asarray(tree, np.float64)
  except (TypeError, ValueError):
    return out
  if array.size and np.isfinite(array).all():
    out[prefix] = array
  return out


def compare(full: dict, half: dict) -> dict:
  """{metric: {max_rel, max_abs}} for the metrics both results hold with the same shape."""
  full_leaves, half_leaves = numeric_leaves(full), numeric_leaves(half)
  out = {}
  for name, reference in full_leaves.items():
    other = half_leaves.get(name)
    if other is None or other.shape != reference.shape:
      continue
    difference = float(np.abs(other - reference).max())
    scale = float(np.abs(reference).max())
    out[name] = {"max_rel": round(difference / scale, 6) if scale else None,
                 "max_abs": round(difference, 6)}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="moco_v3_demo,simmim_demo")
  parser.add_argument("--analyses", default=DEMO_ANALYSES)
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--probe-images", type=int, default=2000,
                      help="probe training images (probing only)")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--untrained", action="store_true", help="also the untrained copies")
  args = parser.parse_args()

  import jax
  from clmim.jobs import analyze
  from configs import paper

  results, seconds = {}, {}
  workdir = tempfile.mkdtemp(prefix="clmim-bf16-")
  for dtype in ("float32", "bfloat16"):
    config = paper.get_config("demo")
    with config.unlocked():
      config.models, config.analyses, config.dtype = args.models, args.analyses, dtype
      config.include_untrained, config.progress = args.untrained, False
      config.data.num_images, config.batch_size = args.images, args.batch
      config.probe_data.num_images = args.probe_images
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the job's tables; stdout is the JSON only
      results[dtype] = analyze.run(config, os.path.join(workdir, dtype))
    seconds[dtype] = round(time.perf_counter() - started, 1)
  models = {name: compare(results["float32"]["models"][name],
                          results["bfloat16"]["models"][name])
            for name in results["float32"]["models"]}
  print(json.dumps({
      "benchmark": "bf16_accuracy", "models": models, "analyses": args.analyses.split(","),
      "images": results["float32"]["num_images"], "seconds": seconds,
      "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
      "devices": jax.device_count(), "cpu_count": os.cpu_count(),
      "machine": platform.machine(), "jax": jax.__version__,
  }))


if __name__ == "__main__":
  main()
