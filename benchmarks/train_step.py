r"""Training speed of every objective on the one trainer: steps/s and images/s after warm-up.

For each objective of --objectives it runs the real trainer (`clmim.jobs.pretrain.run`, the
procedural data rendered by --render_workers, the jitted update, metrics every step, one
checkpoint at the end) for --steps steps in a temporary workdir, and reads the rate between the
metrics record of step --warmup and the last one (`elapsed_s`), so the compilation of the first
step and the final checkpoint and export are not in it.

  python benchmarks/train_step.py                       # the four demo recipes (32 px, mu/4)
  python benchmarks/train_step.py --model B/16 --size 224 --batch 8 --steps 4 --warmup 2
  # the CPU smoke setting of tests/test_benchmarks.py:
  python benchmarks/train_step.py --variant runlocal --objectives simmim --steps 6 --warmup 2

Configs: configs/pretrain_<objective>.py with --variant (MoCo v3's "demo" is its first stage,
demo_stage1, which needs no earlier export). --model / --size / --batch override the model
variant, the image size and the global batch (e.g. ViT-B/16 at 224 px; SimMIM's and the
hybrid's mask blocks become 2x2 patches, 32 px at patch 16, as in the official recipe).

Prints one JSON object: per objective {config, model, image_size, batch, steps, warmup,
steps_per_s, images_per_s, seconds_per_step, final_loss, total_seconds}; backend, device,
device_count, jax, cpu_count, machine, total_seconds.
"""
import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib  # noqa: E402

import jax  # noqa: E402

from clmim import host_memory  # noqa: E402
from clmim.train import trainer  # noqa: E402
from clmim.jobs import pretrain

host_memory.keep_freed_memory()  # as training runs do (clmim/main.py), before JAX starts

OBJECTIVES = ("moco_v3", "simmim", "mae", "hybrid")


def config_for(objective: str, variant: str, steps: int, model: str = "", size: int = 0,
               batch: int = 0, render_workers: int = 1):
  """The objective's pretraining config, shortened to `steps` and logging every step."""
  module = importlib.import_module(f"configs.pretrain_{objective}")
  if objective == "moco_v3" and variant == "demo":
    variant = "demo_stage1"  # stage 2 starts from stage 1's export
  config = module.get_config(variant)
  config.unlock()
  config.total_steps = steps
  config.warmup_steps = min(config.warmup_steps, steps // 2)
  config.log_every = 1
  config.checkpoint_every = steps
  config.keep_checkpoints = 1
  config.data.render_workers = render_workers
  if model:
    config.model.variant = model
    for field in ("width", "depth", "num_heads", "mlp_dim", "patch_size"):
      config.model[field] = None  # the variant's values, not the demo's overrides
    if "simmim" in config:  # mask blocks of 2x2 patches, as the demo's (32 px at patch 16)
      config.simmim.mask_patch = 2 * int(model.split("/")[1])
  if size:
    config.data.image_size = size
  if batch:
    config.batch_size = batch
  return config, f"configs/pretrain_{objective}.py:{variant}"


def steady_rate(records: list, warmup: int) -> float:
  """Steps per second between the record of step `warmup` and the last record."""
  first = next(r for r in records if r["step"] >= warmup)
  last = records[-1]
  if last["step"] <= first["step"] or last["elapsed_s"] <= first["elapsed_s"]:
    raise ValueError(f"too few steps after the warm-up ({warmup}) to time: {len(records)} "
                     f"records; raise --steps")
  return (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])


def measure(objective: str, args) -> dict:
  """Trains `objective` for args.steps steps in a temporary workdir; returns its rates."""
  config, name = config_for(objective, args.variant, args.steps, args.model, args.size,
                            args.batch, args.render_workers)
  started = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix=f"clmim-bench-{objective}-") as workdir:
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
      final = pretrain.run(config, workdir)
    records = trainer.read_metrics(workdir)
  rate = steady_rate(records, args.warmup)
  model = config.model.variant + "".join(
      f" {k}={config.model[k]}" for k in ("width", "depth") if config.model.get(k) is not None)
  return {"config": name, "model": model, "image_size": config.data.image_size,
          "batch": config.batch_size, "steps": args.steps, "warmup": args.warmup,
          "steps_per_s": round(rate, 4), "images_per_s": round(rate * config.batch_size, 2),
          "seconds_per_step": round(1 / rate, 4), "final_loss": final.get("loss"),
          "total_seconds": round(time.perf_counter() - started, 1)}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--objectives", default=",".join(OBJECTIVES))
  parser.add_argument("--variant", default="demo", help="config variant: demo or runlocal")
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--warmup", type=int, default=10,
                      help="steps before the timed span (the first one compiles)")
  parser.add_argument("--model", default="", help="model variant, e.g. B/16 ('' = config's)")
  parser.add_argument("--size", type=int, default=0, help="image size ('' = config's)")
  parser.add_argument("--batch", type=int, default=0, help="global batch (0 = config's)")
  parser.add_argument("--render_workers", type=int, default=1)
  args = parser.parse_args(argv)
  objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
  unknown = sorted(set(objectives) - set(OBJECTIVES))
  if unknown or not objectives:
    parser.error(f"--objectives: expected names from {OBJECTIVES}, got {args.objectives!r}")
  if not 1 <= args.warmup < args.steps:
    parser.error("--warmup must be >= 1 and below --steps")
  started = time.perf_counter()
  report = {"objectives": {o: measure(o, args) for o in objectives},
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__,
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "host_memory": host_memory.status(),
            "total_seconds": round(time.perf_counter() - started, 1)}
  print(json.dumps(report))
  return report


if __name__ == "__main__":
  host_memory.run_with_tcmalloc()  # as `python -m clmim.main` training runs do; may restart
  main()
