r"""Device check: a ViT forward + every one-stream analysis in float32 and bfloat16, and the input
pipeline, in one short run on a GPU/TPU machine (under 5 minutes on an H100 by default).

For each dtype of --dtypes, on a random ViT (--variant, --size; LeCun-normal kernels, see
`random_params`) and procedural images (clmim.data.synthetic, rendered by the loader's worker
threads, ImageNet-normalised):
- the full analysis step: `Analyzer` over a mesh of all devices with every one-stream analysis
  of clmim/analysis/ that runs on a bare encoder (multi-pass analyses, those whose `check`
  refuses a bare ViT, e.g. `decoder`, and --skip are left out and listed with the reason);
- the bare forward: jit of `model.apply` (final-normed tokens out) on the same sharded batch;
- the `Analyzer.run` rate on in-memory batches (adds the host->device transfer and the host's
  float64 accumulation of every step's sums, e.g. cka's P x D^2 moments), and its per-run cost;
and, with both dtypes, how far bfloat16 results are from float32 ones on the same images.
The input pipeline (no model) is timed with `benchmarks/input_pipeline.py`'s `time_source`:
procedural images rendered and normalised at 224 px (its ViT-B/16 preprocessing, whatever
--size) in as many worker threads as the machine has cores.

Batch (`--batch`, images per device): a number, or 0 = auto: on the first dtype, double from 16
(at most --max_batch: 256 on accelerators, 16 on CPU) while the step compiles and runs without
running out of memory, the step's images/s improves by at least 5%, and the time budget leaves
room for the rest; the best measured batch is used for every dtype. Each candidate compiles once;
the chosen one's Analyzer is the one measured, so its compile is not paid twice.

Time budget (--budget_s, default 270 s, the whole script): the input pipeline runs first (its
size is --images); the batch search stops before a candidate that would not leave time for the
remaining dtypes (estimated from the last candidate's cost); the timed repeats of every part are
cut to what fits. `part_seconds` shows where the time went. The budget is a target: a compile
cannot be interrupted, so a very slow first compile can overrun it.

Needs jax, flax, numpy, Pillow, tqdm and matplotlib (which the analysis modules import); not
ml_collections, tensorflow_datasets nor scikit-learn (without it `tsne` is refused anyway).

  python benchmarks/device_check.py [--variant B/16] [--size 224] [--depth 0] [--batch 0]
      [--repeats 5] [--images 256] [--dtypes float32,bfloat16] [--budget_s 270]
  # the CPU smoke setting of tests/test_benchmarks.py (two fake devices):
  XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
    python benchmarks/device_check.py --variant mu/4 --size 32 --depth 2 --repeats 2 --images 32

--depth (0 = the variant's) gives the ViT fewer or more blocks; fewer make a quick smoke run
(the compiles shrink with the depth), not a measurement of the variant.

Prints one JSON object:
  model, image_size, depth, params_m: the ViT, its blocks and its parameter count (millions).
  analyses: the analyses in the step; excluded: {name: why it is not in the step}.
  batch: device_batch (images per device per step), global_batch (all devices), mode ("auto" or
    "given"), and for auto: search_dtype, search ([{device_batch, fits, compile_s,
    step_images_per_s} or the error] per candidate), stopped (why the doubling stopped).
  dtypes.<dtype>:
    step_images_per_s, step_s, step_times_s: the jit-compiled analysis step (forward + every
      analysis + psum) on a device-resident batch: median seconds and images/s.
    forward_images_per_s, forward_s, forward_times_s, forward_compile_s: the bare forward.
    forward_share: forward_s / step_s, the share of the step's time that is the forward.
    run_images_per_s, run_fixed_s, run_steps: `Analyzer.run` on in-memory batches (adds the
      transfer to the devices and the host's float64 accumulation of every step's sums, e.g.
      cka's P x D^2 moments; no image decoding): the steady per-step rate, from runs of 1 and
      1 + run_steps batches, and what every run pays once on top (finalize, set-up).
    compilations, compile_s: traces of this dtype's analysis step (expected 1) and the wall
      time of the run that compiled it (`Analyzer.compilations`, `compile_seconds`).
  bf16_vs_f32 (with both dtypes): max_rel_diff {metric: max |bf16 - f32| / max |f32|} over the
    float entries of each result key (entries NaN in both skipped; NaN in one only: inf), worst
    [metric, value], images (how many were compared), not_compared (keys without floats).
  input_pipeline: images_per_s, all_images_per_s, route (from `time_source`), image_size (224),
    workers, images, pipeline_over_step {dtype: pipeline images/s / step images/s} (only when
    --size is 224: above 1 the pipeline can feed the step).
  budget_s, part_seconds {input_pipeline, setup, search, <dtype>, compare}, total_seconds (from
    the start of the script, imports included).
  device, backend, device_count, matmul_precision (jax_default_matmul_precision; null = the
    backend's default, TF32 for float32 matmuls on recent NVIDIA GPUs), jax, flax, python,
    machine, cpu_count, load_average (before, after).
"""
import time

_STARTED = time.perf_counter()  # total_seconds counts the imports too

import argparse
import importlib
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # clmim without installing it, and benchmarks/ as a namespace package

import flax
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks.analysis_step import (
    ImageCache, StepCheck, is_out_of_memory, random_params, relative_differences,
    repeats_within, select_analyses, synthetic_config)
from clmim.analysis import runner
from clmim.errors import ClmimError
from clmim.models import vit as vit_lib

# Left out unless --skip says otherwise: its finalize fits a t-SNE on the host with scikit-learn
# (absent on our GPU machines, where its `check` refuses it anyway), which is host time, not
# device work, and a stochastic embedding whose bf16/f32 difference measures no precision.
DEFAULT_SKIP = "tsne"
MIN_GAIN = 0.05  # the auto batch keeps doubling while images/s improves by at least this much
PIPELINE_SIZE = 224  # the input pipeline is timed at the ViT-B/16 preprocessing of time_source


class Budget:
  """Wall-clock budget of the whole script, counted from its start."""

  def __init__(self, seconds: float):
    self.seconds = float(seconds)

  def left(self) -> float:
    """Seconds left (negative once overrun)."""
    return self.seconds - (time.perf_counter() - _STARTED)


def measure_pipeline(args, module) -> dict:
  """The input pipeline's images/s with one worker thread per CPU core (`time_source`)."""
  workers = os.cpu_count() or 1
  cfg = synthetic_config(args.images, workers)
  result = module.time_source(cfg, workers, min(args.repeats, 3), 64)
  return dict(result, image_size=module.VIT_B16["image_size"], workers=workers,
              images=args.images)


def search_batch(args, model, modules, params, mesh, images, budget, reserve_parts):
  """The auto batch (see the module doc): returns (StepCheck, results, step (median, times),
  batch info). `reserve_parts` is how many more compiles of this size must still fit."""
  cpu = jax.default_backend() == "cpu"
  cap = args.max_batch or (16 if cpu else 256)
  candidates, b = [], min(16, cap)
  while b <= cap:
    candidates.append(b)
    b *= 2
  search, best, stopped, last_cost = [], None, f"reached the cap of {cap} per device", None
  for device_batch in candidates:
    # A candidate costs about what the last one did (a compile, then timed steps); stop if it
    # would not leave the time the other dtypes' compiles and timings need.
    if best is not None and budget.left() < last_cost * (1.3 + reserve_parts):
      stopped = "time budget"
      break
    start = time.perf_counter()
    check = StepCheck(model, modules, params, mesh, device_batch, images, args.analysis_options)
    try:
      results = check.compile_and_run()
      step = check.time_step(args.repeats, 0.05 * max(budget.left(), 0.0))
    except Exception as e:  # noqa: BLE001 (only out-of-memory is expected; others re-raise)
      if not is_out_of_memory(e):
        raise
      search.append({"device_batch": device_batch, "fits": False,
                     "error": str(e).splitlines()[0][:200]})
      stopped = "out of memory"
      break
    last_cost = time.perf_counter() - start
    rate = check.analyzer.global_batch_size / step[0]
    search.append({"device_batch": device_batch, "fits": True,
                   "compile_s": round(check.analyzer.compile_seconds, 2),
                   "step_images_per_s": round(rate, 2)})
    improved = best is None or rate >= best[0] * (1 + MIN_GAIN)
    if best is None or rate > best[0]:
      best = (rate, check, results, step)
    if not improved:
      stopped = f"images/s improved by less than {MIN_GAIN:.0%}"
      break
  if best is None:
    raise ClmimError(f"device_check: even {candidates[0]} images per device do not fit: "
                     f"{search[-1]['error']}")
  return best[1], best[2], best[3], {"search": search, "stopped": stopped}


def measure_dtype(args, check: StepCheck, step, budget, parts_left: int) -> dict:
  """Times the bare forward and `Analyzer.run` for an already compiled StepCheck."""
  a = check.analyzer
  share = max(budget.left(), 0.0) / max(parts_left, 1)
  if step is None:
    step = check.time_step(args.repeats, 0.3 * share)
  step_s, step_times = step
  forward_compile, forward_s, forward_times = check.time_forward(args.repeats, 0.2 * share)
  steps = max(2, repeats_within(args.repeats, 1.5 * step_s, 0.3 * share))
  run_rate, run_fixed = check.time_run(steps)
  n = a.global_batch_size
  return {
      "step_images_per_s": round(n / step_s, 2), "step_s": round(step_s, 4),
      "step_times_s": [round(t, 4) for t in step_times],
      "forward_images_per_s": round(n / forward_s, 2), "forward_s": round(forward_s, 4),
      "forward_times_s": [round(t, 4) for t in forward_times],
      "forward_compile_s": round(forward_compile, 2),
      "forward_share": round(forward_s / step_s, 4),
      "run_images_per_s": round(run_rate, 2), "run_fixed_s": round(run_fixed, 3),
      "run_steps": steps,
      # After every timing above: the step must not have traced again.
      "compilations": a.compilations, "compile_s": round(a.compile_seconds, 2),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--size", type=int, default=224, help="the model's image size (px)")
  parser.add_argument("--depth", type=int, default=0, help="ViT blocks (0 = the variant's)")
  parser.add_argument("--batch", type=int, default=0,
                      help="images per device per step; 0 = auto (see the module doc)")
  parser.add_argument("--max_batch", type=int, default=0,
                      help="cap of the auto batch; 0 = 256 on accelerators, 16 on CPU")
  parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each part")
  parser.add_argument("--images", type=int, default=256,
                      help="images per pass of the input pipeline measurement")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--skip", default=DEFAULT_SKIP, help="analyses to leave out (comma list)")
  parser.add_argument("--budget_s", type=float, default=270.0,
                      help="target wall time of the whole script (s)")
  parser.add_argument("--matmul_precision", default="",
                      help="jax_default_matmul_precision, e.g. 'highest'; '' = backend default")
  parser.add_argument("--options", default="{}",
                      help='analysis options as JSON, e.g. \'{"svd": {"method": "gram"}}\'')
  args = parser.parse_args()
  try:
    args.analysis_options = json.loads(args.options)
  except json.JSONDecodeError as e:
    parser.error(f"--options: expected a JSON object, got {args.options!r} ({e})")
  dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  if not dtypes or any(d not in vit_lib.DTYPES for d in dtypes) or len(set(dtypes)) < len(dtypes):
    parser.error(f"--dtypes: expected distinct names from {vit_lib.DTYPES}, got {args.dtypes!r}")
  if args.images < 1 or args.repeats < 1 or args.batch < 0 or args.depth < 0:
    parser.error("--images and --repeats must be >= 1, --batch and --depth >= 0")
  if args.matmul_precision:
    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
  budget = Budget(args.budget_s)
  load_before = os.getloadavg()
  parts = {}

  # The input pipeline first: it is bounded by --images and leaves the rest to the device parts.
  start = time.perf_counter()
  pipeline = measure_pipeline(args, importlib.import_module("benchmarks.input_pipeline"))
  parts["input_pipeline"] = time.perf_counter() - start

  start = time.perf_counter()
  model = vit_lib.build_vit(args.variant, image_size=args.size, depth=args.depth or None)
  params = random_params(model)
  modules, excluded = select_analyses(model, f"ViT-{args.variant} (random init)",
                                      {s.strip() for s in args.skip.split(",")})
  if not modules:
    raise ClmimError(f"device_check: no analysis left to run; excluded: {excluded}")
  mesh = runner.make_mesh()
  # Replicated on the mesh once: every `run` then finds them in place instead of copying them.
  params = jax.device_put(params, NamedSharding(mesh, P()))
  images = ImageCache(args.size, os.cpu_count() or 1)
  parts["setup"] = time.perf_counter() - start

  checks, results, batch = {}, {}, {}
  first = dtypes[0]
  start = time.perf_counter()
  first_model = model.clone(dtype=first)
  if args.batch > 0:
    checks[first] = StepCheck(first_model, modules, params, mesh, args.batch, images,
                              args.analysis_options)
    results[first] = checks[first].compile_and_run()
    step = None
    batch = {"mode": "given"}
  else:
    checks[first], results[first], step, info = search_batch(
        args, first_model, modules, params, mesh, images, budget, len(dtypes) - 1)
    batch = {"mode": "auto", "search_dtype": first, **info}
    parts["search"] = time.perf_counter() - start
  device_batch = checks[first].analyzer.device_batch_size
  per_dtype = {first: measure_dtype(args, checks[first], step, budget, len(dtypes))}
  parts[first] = time.perf_counter() - start - parts.get("search", 0.0)

  for i, dtype in enumerate(dtypes[1:], start=1):
    start = time.perf_counter()
    checks[dtype] = StepCheck(model.clone(dtype=dtype), modules, params, mesh, device_batch,
                              images, args.analysis_options)
    results[dtype] = checks[dtype].compile_and_run()  # the same images as the first dtype
    per_dtype[dtype] = measure_dtype(args, checks[dtype], None, budget, len(dtypes) - i)
    parts[dtype] = time.perf_counter() - start

  report = {
      "benchmark": "device_check", "model": f"ViT-{args.variant}", "image_size": args.size,
      "depth": model.depth,
      "params_m": round(sum(x.size for x in jax.tree.leaves(params)) / 1e6, 2),
      "analyses": [m.NAME for m in modules], "excluded": excluded,
      "batch": {"device_batch": device_batch,
                "global_batch": checks[first].analyzer.global_batch_size, **batch},
      "dtypes": per_dtype,
  }
  if "float32" in results and "bfloat16" in results:
    start = time.perf_counter()
    diffs, not_compared = relative_differences(results["bfloat16"], results["float32"])
    diffs.pop("num_images", None)
    worst = max(diffs.items(), key=lambda kv: kv[1]) if diffs else None
    report["bf16_vs_f32"] = {
        "max_rel_diff": {k: float(f"{v:.3g}") for k, v in diffs.items()},
        "worst": [worst[0], float(f"{worst[1]:.3g}")] if worst else None,
        "images": results["float32"]["num_images"], "not_compared": not_compared}
    parts["compare"] = time.perf_counter() - start
  if args.size == PIPELINE_SIZE:
    pipeline["pipeline_over_step"] = {
        d: round(pipeline["images_per_s"] / r["step_images_per_s"], 2)
        for d, r in per_dtype.items()}
  report["input_pipeline"] = pipeline
  devices = jax.devices()
  report.update({
      "budget_s": args.budget_s, "part_seconds": {k: round(v, 2) for k, v in parts.items()},
      "total_seconds": round(time.perf_counter() - _STARTED, 2),
      "device": str(devices[0].device_kind), "backend": jax.default_backend(),
      "device_count": len(devices),
      "matmul_precision": getattr(jax.config, "jax_default_matmul_precision", None),
      "analysis_options": args.analysis_options,
      "jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version(),
      "machine": platform.machine(), "cpu_count": os.cpu_count(),
      "load_average": [[round(x, 2) for x in load_before],
                       [round(x, 2) for x in os.getloadavg()]],
  })
  print(json.dumps(report))


if __name__ == "__main__":
  main()
