r"""Cost of the three analyses on top of a ViT-B/16 forward (batch 16, 224 px, float32).

Times, on one device, (a) the bare forward (jit; final-normed tokens out) and (b) the runner's
sharded step: forward + attention distance + NMI/entropy + Fourier, partial sums and psum.
Prints one JSON object. Run on a quiet machine:

  python benchmarks/analysis_overhead.py [--batch 16] [--repeats 5] [--block timm|beit]
"""
import argparse
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from clmim.analysis import attention_distance, fourier, nmi, runner
from clmim.models.vit import build_vit, forward_with_states


def _time(fn, repeats):
  jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--block", default="timm", choices=["timm", "beit"])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  extra = (dict(block_style="beit", position_embedding="none", rel_pos_bias="shared",
                layer_scale_init=0.1) if args.block == "beit" else {})
  model = build_vit(args.variant, image_size=args.size, **extra)
  images = jax.random.normal(jax.random.PRNGKey(1), (args.batch, args.size, args.size, 3))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])["params"]

  bare = jax.jit(lambda p, x: model.apply({"params": p}, x))
  bare_s, bare_all = _time(lambda: bare(params, images), args.repeats)

  analyses = [attention_distance, nmi, fourier]
  mesh = runner.make_mesh(jax.devices()[:1])
  analyzer = runner.Analyzer(functools.partial(forward_with_states, model), analyses,
                             model.patch_size, mesh=mesh, device_batch_size=args.batch)
  weights = jnp.ones((args.batch,), jnp.float32)
  index = jnp.arange(args.batch, dtype=jnp.int32)
  labels = jnp.full((args.batch, 0), -1, jnp.int32)  # no labels: an empty per-image row
  step = lambda: analyzer._step(params, {}, images, weights, index, labels)
  full_s, full_all = _time(step, args.repeats)

  print(json.dumps({
      "benchmark": "analysis_overhead", "model": f"ViT-{args.variant} ({args.block} blocks)",
      "batch": args.batch, "image_size": args.size, "repeats": args.repeats,
      "bare_forward_s": round(bare_s, 4), "forward_plus_analyses_s": round(full_s, 4),
      "overhead_pct": round(100 * (full_s / bare_s - 1), 2),
      "bare_images_per_s": round(args.batch / bare_s, 2),
      "analysis_images_per_s": round(args.batch / full_s, 2),
      "bare_times_s": [round(t, 4) for t in bare_all],
      "analysis_times_s": [round(t, 4) for t in full_all],
      "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
      "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
  }))


if __name__ == "__main__":
  main()
