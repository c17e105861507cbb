r"""clmim against the official PyTorch code, side by side in one process on the same CPU.

Two comparisons, on the same random-init weights and the same images (float32):
(a) the bare forward: clmim's jit-compiled ViT (final-normed tokens out) against a
    timm-0.5.4-style PyTorch `VisionTransformer` (the architecture of the official
    naver-ai/cl-vs-mim models/vit.py) loaded with clmim's parameters;
(b) end-to-end analysis throughput, from images in host memory to per-(layer, head) numbers:
    clmim's `Analyzer` (forward + attention distance + NMI + Fourier in one jit-compiled, sharded
    step, then host accumulation and finalize) against the official notebooks' pipeline (the
    PyTorch forward that returns every residual state and attention map, then the notebooks'
    `calculate_mean_attention_dist`, `calculate_nmi` and `get_fourier_latents`, reimplemented
    here for timing with the same libraries and loops).
Before timing it checks that the two forwards agree (final tokens) and that the two pipelines
give the same numbers, and reports both. Each timed call alternates between the contenders, so
background load drifts hit both alike. Prints one JSON object.

  python benchmarks/forward_vs_pytorch.py [--batch 16] [--size 224] [--variant B/16]
      [--depth 0] [--repeats 5] [--threads N]

`--depth` (0 = the variant's) gives the ViT fewer or more blocks (tests/test_forward_vs_pytorch.py
runs two, a quick check that the two sides agree; not a timing of the variant).

`--threads N` pins the process to N cores before jax and torch start their thread pools (when
run as a script) and sets torch.set_num_threads(N); the default is every core this process may
use. Run it on a quiet machine: the numbers are only as good as the CPU is idle (on a busy one,
torch's OpenMP barriers stall on every op and its times grow tenfold; the JSON records the load
average at start).
"""
import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time


def _available_cores():
  """The cores this process may run on (affinity-aware where the OS supports it)."""
  if hasattr(os, "sched_getaffinity"):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def _pin_threads(argv):
  """Pins this process to the first `--threads` cores, if asked for fewer than it has.

  Must run before jax and torch are imported: XLA sizes its CPU thread pool from the cores the
  process may use, and there is no other knob that sets it to an arbitrary N.
  """
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--threads", type=int, default=None)
  threads = pre.parse_known_args(argv)[0].threads
  cores = _available_cores()
  if threads and 0 < threads < len(cores) and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, cores[:threads])


if __name__ == "__main__":
  _pin_threads(sys.argv[1:])
  # The checkout's clmim, also where it is not installed (as `python -m` would find it).
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# benchmarks/torch_reference.py, also when this file is loaded by path (tests/).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The heavy imports come after the pinning above (E402 on purpose).
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from clmim.analysis import attention_distance, fourier, nmi, runner  # noqa: E402
from clmim.models.vit import build_vit, forward_with_states  # noqa: E402
from torch_reference import (  # noqa: E402
    build_torch_vit, cpu_name, load_clmim_params, official_distance_matrix, official_pipeline,
    time_interleaved)


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------

def vit_forward_flops(width, depth, mlp_dim, patch_size, image_size, channels=3):
  """FLOPs of one image's ViT forward, 2 per multiply-add, from the architecture.

  Counts the patch convolution and every matmul (qkv, q k^T and attention x v over all heads,
  proj, fc1, fc2); softmax, LayerNorm, GELU and residual additions (well under 1 % for ViT-B)
  are left out, as is usual. ViT-B/16 at 224 px: 35.1 GFLOP (17.6 G multiply-adds).
  """
  patches = (image_size // patch_size) ** 2
  tokens = patches + 1  # + cls
  embed = patches * (patch_size * patch_size * channels) * width
  per_block = (tokens * width * 3 * width  # fused qkv
               + 2 * tokens * tokens * width  # q k^T and attn @ v (heads x head_dim = width)
               + tokens * width * width  # proj
               + 2 * tokens * width * mlp_dim)  # fc1 and fc2
  return 2 * (embed + depth * per_block)


def _max_abs_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _rounded(times):
  return [round(t, 5) for t in times]


def main(argv=None):
  """Runs the comparison; prints and returns the JSON-able result dict."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--depth", type=int, default=0, help="ViT blocks (0 = the variant's)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=None,
                      help="torch threads and (as a script) cores used; default: every core")
  parser.add_argument("--tolerance", type=float, default=1e-3,
                      help="largest max |clmim - torch| of the final tokens accepted before "
                           "timing (otherwise the two would not be the same model)")
  args = parser.parse_args(argv)
  load_1m = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
  threads = args.threads or len(_available_cores())
  torch.set_num_threads(threads)

  # Same model, same weights, same images on both sides.
  model = build_vit(args.variant, image_size=args.size, depth=args.depth or None)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.batch, args.size, args.size, 3), dtype=np.float32)
  images_jax = jnp.asarray(images)
  images_nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images_jax[:1])["params"]
  torch_model = load_clmim_params(build_torch_vit(model), params)

  # (a) bare forwards; check first that they are the same function.
  bare = jax.jit(lambda p, x: model.apply({"params": p}, x))
  clmim_forward = lambda: jax.block_until_ready(bare(params, images_jax))

  def torch_forward():
    with torch.no_grad():
      return torch_model(images_nchw)

  max_abs_diff = _max_abs_diff(clmim_forward(), torch_forward().numpy())
  if not max_abs_diff <= args.tolerance:
    raise SystemExit(f"forward_vs_pytorch: the forwards disagree (max |diff| of the final tokens "
                     f"{max_abs_diff:.3g} > {args.tolerance:g}); timing them would compare "
                     "different models.")
  with torch.no_grad():
    _, torch_attns = torch_model(images_nchw, states=True)
  _, clmim_attns = jax.jit(functools.partial(forward_with_states, model))(params, images_jax)
  attn_max_abs_diff = max(_max_abs_diff(a, b.numpy()) for a, b in zip(clmim_attns, torch_attns))
  forwards = time_interleaved({"clmim": clmim_forward, "torch": torch_forward}, args.repeats)

  # (b) pipelines: clmim's Analyzer on one device against the official cells.
  mesh = runner.make_mesh(jax.devices()[:1])
  analyzer = runner.Analyzer(functools.partial(forward_with_states, model),
                             [attention_distance, nmi, fourier], model.patch_size, mesh=mesh,
                             device_batch_size=args.batch)
  # Placed once, as `run` would place them, so no repeat pays for copying the weights.
  params_on_mesh = jax.device_put(
      params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  clmim_pipeline = lambda: analyzer.run(params_on_mesh, [images], progress=False)
  part_times = []

  def official():
    part_times.append({})
    return official_pipeline(torch_model, images_nchw, model.patch_size, part_times[-1])

  clmim_results, official_results = clmim_pipeline(), official()
  analysis_diffs = {key: _max_abs_diff(clmim_results[key], official_results[key])
                    for key in ("attention_distance", "nmi", "fourier_all_states")}
  part_times.clear()
  pipelines = time_interleaved({"clmim": clmim_pipeline, "official": official}, args.repeats)
  part_times = part_times[1:]  # the first entry is the warm-up call's
  parts = {name: statistics.median(t[name] for t in part_times)
           for name in ("forward", "distance", "nmi", "fourier")}
  grid = args.size // model.patch_size
  start = time.perf_counter()
  official_distance_matrix(model.patch_size, grid * grid, grid)
  distance_matrix_s = time.perf_counter() - start

  # A plain matmul of the MLP's fc1 shape: what each library's GEMM reaches on this CPU.
  rows = args.batch * (grid * grid + 1)
  lhs = rng.standard_normal((rows, model.width), dtype=np.float32)
  rhs = rng.standard_normal((model.width, model.mlp_dim), dtype=np.float32)
  lhs_jax, rhs_jax = jnp.asarray(lhs), jnp.asarray(rhs)
  lhs_torch, rhs_torch = torch.from_numpy(lhs), torch.from_numpy(rhs)
  xla_dot = jax.jit(jnp.dot)
  matmuls = time_interleaved({
      "xla": lambda: jax.block_until_ready(xla_dot(lhs_jax, rhs_jax)),
      "torch": lambda: torch.matmul(lhs_torch, rhs_torch)}, args.repeats)
  matmul_flop = 2 * rows * model.width * model.mlp_dim

  flop = args.batch * vit_forward_flops(model.width, model.depth, model.mlp_dim, model.patch_size,
                                        args.size)
  clmim_fwd, torch_fwd = forwards["clmim"][0], forwards["torch"][0]
  clmim_pipe, official_pipe = pipelines["clmim"][0], pipelines["official"][0]
  result = {
      "benchmark": "forward_vs_pytorch", "model": f"ViT-{args.variant} (timm blocks)",
      "depth": model.depth,
      "batch": args.batch, "image_size": args.size, "dtype": "float32", "repeats": args.repeats,
      "threads": threads, "torch_threads": torch.get_num_threads(),
      # Busy cores make the timings meaningless (OpenMP barriers stall on oversubscription).
      "load_average_1m_at_start": load_1m,
      "cores_usable": len(_available_cores()),
      # (a) bare forward
      "clmim_forward_s": round(clmim_fwd, 5), "torch_forward_s": round(torch_fwd, 5),
      "forward_speedup": round(torch_fwd / clmim_fwd, 3),
      "clmim_forward_times_s": _rounded(forwards["clmim"][1]),
      "torch_forward_times_s": _rounded(forwards["torch"][1]),
      "forward_gflop_per_image": round(flop / args.batch / 1e9, 3),
      "clmim_forward_gflops": round(flop / clmim_fwd / 1e9, 2),
      "torch_forward_gflops": round(flop / torch_fwd / 1e9, 2),
      "max_abs_diff": max_abs_diff, "attn_max_abs_diff": attn_max_abs_diff,
      # (b) end-to-end analysis pipelines
      "clmim_pipeline_s": round(clmim_pipe, 5),
      "clmim_pipeline_images_per_s": round(args.batch / clmim_pipe, 3),
      "clmim_pipeline_times_s": _rounded(pipelines["clmim"][1]),
      "official_pipeline_s": round(official_pipe, 5),
      "official_pipeline_images_per_s": round(args.batch / official_pipe, 3),
      "official_pipeline_times_s": _rounded(pipelines["official"][1]),
      "pipeline_speedup": round(official_pipe / clmim_pipe, 3),
      "official_parts_s": {name: round(t, 5) for name, t in parts.items()},
      "official_parts_times_s": {name: _rounded([t[name] for t in part_times])
                                 for name in parts},
      # The notebook's distance rebuilds its [N, N] matrix in a Python loop once per layer.
      "official_distance_matrix_build_s": round(distance_matrix_s, 5),
      # As the notebooks run them: one forward per analysis cell (derived from the parts).
      "official_notebook_images_per_s": round(
          args.batch / (3 * parts["forward"] + parts["distance"] + parts["nmi"]
                        + parts["fourier"]), 3),
      "analysis_max_abs_diff": analysis_diffs,
      # plain GEMM [batch*tokens, width] x [width, mlp_dim]
      "matmul_shape": [rows, model.width, model.mlp_dim],
      "xla_matmul_gflops": round(matmul_flop / matmuls["xla"][0] / 1e9, 2),
      "torch_matmul_gflops": round(matmul_flop / matmuls["torch"][0] / 1e9, 2),
      "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
      "cpu": cpu_name(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
      "jax": jax.__version__, "torch": torch.__version__, "numpy": np.__version__,
      "python": platform.python_version(),
  }
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
