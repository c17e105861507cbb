r"""The per-layer probing analysis (clmim/analysis/probing.py): time, memory, ImageNet projection.

Three measurements, printed as one JSON object (progress and the job's tables go to stderr):

1. The probing job end to end: `clmim.jobs.analyze.run` with configs/probing.py on both demo
   models (no untrained copies), probes of every block (cls and mean patch token, shape and
   texture targets) fitted on `--train-images` procedural training images and tested on
   `--eval-images` held-out ones (`--cue-conflict` adds the shape-bias passes). Reports wall
   time, seconds per model and per pass, the images streamed per second, compilations and
   their seconds, the peak resident memory of the process, the host time of the ridge solves
   (`linear_probe.select`, timed by a wrapper) and the top-1 curves, so the run checks itself.
2. The memory bound of the streamed moments and of the fitted probes shipped back as the
   evaluation context, from the shapes `_fit_sums` / `_eval_sums` use, for the demo models and
   for ViT-B/16 on ImageNet-1k. It does not depend on the number of images.
3. ViT-B/16 at 224 px: the fit stage's throughput on this machine (an `Analyzer` with
   `forward_with_states` and `probing.fit_stage` for 1000 classes, `--vitb-images` random images
   at device batch `--vitb-batch`; a warm-up run of `--vitb-warmup-batches` steps, the first of
   which compiles, is timed apart from the steady state, a second run over all the images),
   the same forward with a trivial stage (the sum of the last block's output, so the forward
   is not pruned) for the probe's share, one ridge solve at ViT-B/ImageNet size, and the hours
   an ImageNet-1k run (1,281,167 train + 50,000 val images) would take here.

Run on a quiet machine (the default takes about 3.5 minutes on 2 CPU cores; --quick 1 to 2):

  python benchmarks/probing.py [--train-images 10000] [--eval-images 2000] [--batch 64]
      [--cue-conflict] [--vitb-images 96] [--vitb-batch 16] [--vitb-warmup-batches 2] [--quick]
      [--workdir /tmp/probing]
"""
import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/ is not a package of the installed clmim

IMAGENET_TRAIN, IMAGENET_VAL, IMAGENET_CLASSES = 1_281_167, 50_000, 1000
KINDS = 2  # cls token and mean patch token (probing.KINDS)


def _log(*parts):
  print(*parts, file=sys.stderr, flush=True)


def _peak_mb() -> float:
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def moment_bytes(depth: int, width: int, classes) -> dict:
  """Bytes of the fit stage's streamed sums (`probing._fit_sums`) and of the probes the
  evaluation stage receives as its context (`probing.probe_context` / `_eval_sums`).

  Per partition p in (fit, held out): n [], Σx [L, K, D], Σxxᵀ [L, K, D, D], and per target
  Σxyᵀ [L, K, D, C] and Σy [C]; the probes: per target weights [L, K, D, C] and bias [L, K, C].
  `classes`: the class count of each target.
  """
  lk = depth * KINDS
  per_partition = 1 + lk * (width * width + width) + sum(lk * width * c + c for c in classes)
  values = 2 * per_partition
  probe_values = sum(lk * width * c + lk * c for c in classes)
  mib = lambda count, size: round(count * size / 2 ** 20, 2)
  return {
      "depth": depth, "width": width, "classes": list(classes), "feature_kinds": KINDS,
      "moment_values": values,
      "moments_device_mib": mib(values, 4),      # float32: the step's output (per device)
      "moments_host_mib": mib(values, 8),        # float64: the running totals on the host
      "probe_context_values": probe_values,
      "probe_context_device_mib": mib(probe_values, 4),  # float32, replicated on each device
  }


def run_job(args) -> dict:
  """Measurement 1: the probing job on both demo models."""
  from clmim.analysis import linear_probe
  from clmim.checkpoints import registry
  from clmim.analysis import session as analysis_session
  from clmim.jobs import analyze
  from configs import probing as probing_config

  config = probing_config.get_config("demo")
  config.models = "moco_v3_demo,simmim_demo"
  config.include_untrained = False
  config.analyses = "probing"
  config.probe_data.num_images = args.train_images
  config.data.num_images = args.eval_images
  config.analysis_options.probing.cue_conflict = args.cue_conflict
  config.batch_size = args.batch
  config.progress = False
  workdir = args.workdir or tempfile.mkdtemp(prefix="clmim-probing-")
  shutil.rmtree(workdir, ignore_errors=True)

  # Every pass of the job goes through Session.stream: record its images and seconds.
  passes = []
  stream = analysis_session.Session.stream

  def timed_stream(self, analyzer, images, *a, **k):
    started, compiled = time.perf_counter(), analyzer.compile_seconds
    out = stream(self, analyzer, images, *a, **k)
    passes.append({"pass": a[1] if len(a) > 1 else k.get("desc", ""),
                   "images": out["num_images"],
                   "seconds": round(time.perf_counter() - started, 2),
                   "compile_seconds": round(analyzer.compile_seconds - compiled, 2)})
    return out

  # The ridge solves run on the host between the passes: time them.
  solve = {"calls": 0, "seconds": 0.0}
  select = linear_probe.select

  def timed_select(*a, **k):
    started = time.perf_counter()
    try:
      return select(*a, **k)
    finally:
      solve["calls"] += 1
      solve["seconds"] += time.perf_counter() - started

  analysis_session.Session.stream, linear_probe.select = timed_stream, timed_select
  rss_before = _peak_mb()
  started = time.perf_counter()
  try:
    with contextlib.redirect_stdout(sys.stderr):  # the job's tables; stdout is the JSON only
      results = analyze.run(config, workdir)
  finally:
    analysis_session.Session.stream, linear_probe.select = stream, select
  seconds = time.perf_counter() - started
  peak = _peak_mb()

  streamed = sum(p["images"] for p in passes)
  compile_s = float(results["compile_seconds"])
  pass_s = sum(p["seconds"] for p in passes)
  curves, classes, ridge = {}, {}, {}
  for name, values in results["models"].items():
    details = values["probing_details"]
    curves[name] = {key: [round(v, 4) for v in values[key]] for key in sorted(values)
                    if key.startswith(("probe_", "shape_bias_"))}
    classes = {t: len(d["classes"]) for t, d in details["targets"].items()}
    ridge[name] = {t: d["ridge"] for t, d in details["targets"].items()}
  shapes = {}
  for spec in config.models.split(","):  # depth and width of each model, for the memory bound
    vit = registry.resolve(spec).vit
    shapes[spec] = {"depth": vit.depth, "width": vit.width}
  return {
      "models": list(results["models"]), "train_images": args.train_images,
      "eval_images": args.eval_images, "cue_conflict": args.cue_conflict, "batch": args.batch,
      "seconds": round(seconds, 1),
      "seconds_per_model": {n: i["seconds"] for n, i in results["model_info"].items()},
      "passes": passes,
      "images_streamed": streamed,
      "images_per_s": round(streamed / max(seconds - compile_s, 1e-9), 1),
      "images_per_s_how": "images_streamed (every pass of every model: train + eval images per "
                          "model x models, + the cue-conflict passes when on) / (seconds - "
                          "compile_seconds); seconds is the whole analyze.run wall time, so it "
                          "also holds model loading, the ridge solves, figures and the report",
      "images_per_s_in_passes": round(streamed / max(pass_s - compile_s, 1e-9), 1),
      "images_per_s_in_passes_how": "images_streamed / (sum of the passes' seconds - "
                                    "compile_seconds): streaming only (procedural image "
                                    "generation, forward, moments, host float64 sums)",
      "compilations": results["compilations"], "compile_seconds": compile_s,
      "ridge_solves": solve["calls"], "ridge_solve_seconds": round(solve["seconds"], 2),
      "peak_memory_mb": peak, "rss_before_job_mb": rss_before,
      "architectures": shapes, "classes": classes,
      "chosen_ridge": ridge, "top1": curves, "workdir": args.workdir or "a temporary folder",
  }


def host_accumulate_seconds(depth: int, width: int, classes: int, repeats: int = 5) -> tuple:
  """(first, median of the rest) seconds of the runner's per-step host work on the fit stage's
  output (one target): fresh device arrays fetched, made float64 and added to the running totals
  (as `Analyzer.run`'s `accumulate`)."""
  import jax
  import jax.numpy as jnp
  shape = (depth, KINDS)

  @jax.jit
  def step(seed):
    value = lambda *s: jnp.full(s, seed, jnp.float32)
    out = {}
    for p in (0, 1):
      out.update({f"n{p}": value(), f"sx{p}": value(*shape, width),
                  f"sxx{p}": value(*shape, width, width),
                  f"sxy{p}_label": value(*shape, width, classes),
                  f"sy{p}_label": value(classes)})
    return out

  totals, times = None, []
  for i in range(repeats):
    out = jax.block_until_ready(step(float(i)))
    started = time.perf_counter()
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(out))
    totals = out if totals is None else jax.tree.map(np.add, totals, out)
    times.append(time.perf_counter() - started)
  return times[0], float(np.median(times[1:]))


def _batches(images, batch, pulls=None):
  """The images in batches; appends the time of every pull (and of the end) to `pulls`."""
  for i in range(0, len(images), batch):
    if pulls is not None:
      pulls.append(time.perf_counter())
    yield images[i:i + batch]
  if pulls is not None:
    pulls.append(time.perf_counter())


def _timed_runs(analyzer, params, images, labels, batch, warmup_batches):
  """(seconds of a warm-up run of `warmup_batches` steps, the first of which compiles; steady
  seconds of a second run over all `images`; that run's step intervals, compilations).

  The runner dispatches step k, then waits for step k-1 and adds its sums on the host, then
  pulls batch k+1: from the third pull on, the time between pulls is one step's time (forward
  and stage on the device, or the host's addition of the previous step, whichever is longer)."""
  warm = images[:batch * warmup_batches]
  started = time.perf_counter()
  analyzer.run(params, _batches(warm, batch), progress=False, labels=labels[:len(warm)])
  first = time.perf_counter() - started
  pulls = []
  started = time.perf_counter()
  out = analyzer.run(params, _batches(images, batch, pulls), progress=False, labels=labels)
  steady = time.perf_counter() - started
  assert out["num_images"] == len(images), out["num_images"]
  intervals = list(np.diff(pulls[1:]))
  return first, steady, intervals, analyzer.compilations


def run_vitb(args) -> dict:
  """Measurement 3: ViT-B/16 fit-stage throughput and the ImageNet-1k projection."""
  import jax.numpy as jnp
  from clmim.analysis import core, linear_probe, probing, runner
  from clmim.checkpoints import registry
  from clmim.models.vit import forward_with_states

  model = registry.resolve("random:B/16")
  vit, size = model.vit, model.vit.image_size
  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.vitb_images, size, size, 3)).astype(np.float32)
  labels = np.stack([probing.holdout_rows(args.vitb_images, 0.1),
                     rng.integers(0, IMAGENET_CLASSES, args.vitb_images)], 1).astype(np.int32)
  forward = functools.partial(forward_with_states, vit)
  fit = probing.fit_stage((("label", IMAGENET_CLASSES),))
  bare = core.Stage("bare", "bare",
                    lambda batch, options: {"last": (batch.zs[-1].astype(jnp.float32).sum(
                        (1, 2)) * batch.weights).sum()},
                    lambda sums, options: {"last": float(sums["last"])})
  out = {"model": "ViT-B/16 (random init, timm blocks)", "image_size": size,
         "depth": vit.depth, "width": vit.width, "images": args.vitb_images,
         "device_batch": args.vitb_batch}
  for name, stage in (("probe_fit", fit), ("bare", bare)):
    _log(f"ViT-B/16 {name}: {args.vitb_images} images at batch {args.vitb_batch}")
    analyzer = runner.Analyzer(forward, [stage], vit.patch_size,
                               device_batch_size=args.vitb_batch)
    first, steady, intervals, compilations = _timed_runs(analyzer, model.params, images, labels,
                                              args.vitb_batch, args.vitb_warmup_batches)
    out[name] = {"warmup_run_s": round(first, 2), "warmup_batches": args.vitb_warmup_batches,
                 "compile_s": round(analyzer.compile_seconds, 2),
                 "steady_s": round(steady, 2),
                 "steady_s_per_batch": round(steady * args.vitb_batch / args.vitb_images, 3),
                 "images_per_s": round(args.vitb_images / steady, 2),
                 "step_intervals_s": [round(float(t), 2) for t in intervals],
                 "step_intervals_how": "seconds between the timed run's successive batch pulls "
                                       "from the second on: one step each (the last has none); "
                                       "with the probe they alternate long/short, as the host "
                                       "adds one step's float64 sums while the next runs on "
                                       "the same cores, so steady_s_per_batch is the rate",
                 "compilations": compilations}
  rate, bare_rate = out["probe_fit"]["images_per_s"], out["bare"]["images_per_s"]
  out["probe_overhead_pct"] = round(100 * (bare_rate / rate - 1), 1)
  out["peak_memory_mb"] = _peak_mb()

  # One ridge solve (7 α, held-out choice, refit) at ViT-B / ImageNet size, float64 host.
  width = vit.width
  def moments(n):
    x = rng.standard_normal((n, width))
    y = np.eye(IMAGENET_CLASSES)[rng.integers(0, IMAGENET_CLASSES, n)]
    return linear_probe.Moments.of(x, y)
  fit_set, holdout = moments(2048), moments(256)
  started = time.perf_counter()
  linear_probe.select(fit_set, holdout, linear_probe.DEFAULT_RIDGE_GRID)
  solve_s = time.perf_counter() - started
  solves = vit.depth * KINDS
  out["ridge_solve_s_per_probe"] = round(solve_s, 2)
  out["ridge_solves_per_model"] = solves

  cold_s, accumulate_s = host_accumulate_seconds(vit.depth, width, IMAGENET_CLASSES)
  out["host_accumulate_s_per_step"] = round(accumulate_s, 3)
  out["host_accumulate_first_s"] = round(cold_s, 3)
  out["host_accumulate_how"] = (
      "seconds to fetch one step's fit-stage sums (ViT-B/16, 1000 classes, float32, fresh "
      "device arrays), make them float64 and add them to the running totals, as Analyzer.run "
      "does once per step whatever the batch size: the first time, and the median of the next "
      "4. The runner keeps one step in flight, so this overlaps the next forward (on a CPU "
      "backend it competes for the same cores); it bounds the rate at device_batch x devices / "
      "this many seconds")

  images_total = IMAGENET_TRAIN + IMAGENET_VAL
  stream_h = images_total / rate / 3600
  out["imagenet_projection"] = {
      "train_images": IMAGENET_TRAIN, "val_images": IMAGENET_VAL,
      "hours_per_model": round(stream_h + solves * solve_s / 3600, 2),
      "stream_hours_per_model": round(stream_h, 2),
      "solve_hours_per_model": round(solves * solve_s / 3600, 3),
      "how": "(train + val images) / probe_fit images_per_s (the evaluation pass runs the same "
             "forward; its argmax counts are cheaper than the moments) + depth x 2 feature "
             "kinds ridge solves at ridge_solve_s_per_probe; the streaming part is linear in "
             "the number of images (nothing per image is kept), on this machine's "
             f"{os.cpu_count()} CPU cores",
  }
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--train-images", type=int, default=10000)
  parser.add_argument("--eval-images", type=int, default=2000)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--cue-conflict", action="store_true",
                      help="also the shape-bias passes (aligned probe fit, cue-conflict images)")
  # 6 timed steps: fewer overstate the probe's share (its host additions of ~0.5 GB of float64
  # totals alternate with the forward on the same cores, so single steps swing by +-3 s).
  parser.add_argument("--vitb-images", type=int, default=96)
  parser.add_argument("--vitb-batch", type=int, default=16)
  parser.add_argument("--vitb-warmup-batches", type=int, default=2,
                      help="steps of the warm-up run before the timed one (its first compiles)")
  parser.add_argument("--skip-vitb", action="store_true")
  parser.add_argument("--quick", action="store_true",
                      help="500 train + 200 eval images, 16 ViT-B images: checks the script")
  parser.add_argument("--workdir", default="")
  args = parser.parse_args()
  if args.quick:
    args.train_images, args.eval_images, args.vitb_images = 500, 200, 16
    args.vitb_warmup_batches = 1

  import jax

  started = time.perf_counter()
  job = run_job(args)
  demo = next(iter(job["architectures"].values()))
  memory = {
      "demo": moment_bytes(demo["depth"], demo["width"], list(job["classes"].values())),
      "vit_b16_imagenet": moment_bytes(12, 768, [IMAGENET_CLASSES]),
      "note": "per device, whatever the number of images: the features never sit in host "
              "memory, only these sums (float32 per step on device, float64 running totals on "
              "the host) and the probes (float32, sent back as the evaluation context); while "
              "a step is added the host briefly holds the totals, that step's float64 copy and "
              "the new totals (about 3 x moments_host_mib)",
  }
  vitb = None if args.skip_vitb else run_vitb(args)
  print(json.dumps({
      "benchmark": "probing", "quick": args.quick, "probing_job": job,
      "memory_bound": memory, "vit_b16": vitb,
      "total_seconds": round(time.perf_counter() - started, 1),
      "peak_memory_mb": _peak_mb(),
      "backend": jax.default_backend(), "devices": jax.device_count(),
      "cpu_count": os.cpu_count(), "machine": platform.machine(),
      "processor": platform.processor(), "python": platform.python_version(),
      "jax": jax.__version__,
  }))


if __name__ == "__main__":
  main()
