r"""Where an analysis step's time goes on a device: each one-stream analysis alone on top of the
forward, and the singular-value algorithms the `svd` analysis can use, timed side by side.

`device_check.py` times the whole step (forward + every analysis); when the step is far slower
than the forward, this script names the analysis at fault. For each analysis of
`analysis_step.select_analyses` (same model, random LeCun-normal params, procedural images, one
dtype, --batch images per device), its own `Analyzer` step is compiled and timed; `extra_s` is
that step's median minus the bare forward's.

The singular values of one state's patch tokens ([batch, N, D], the svd analysis' input) are
timed with each `jax.lax.linalg.SvdAlgorithm` the backend accepts and with two routes through
the symmetric eigenproblem of the N x N Gram matrix (`gram_eigvalsh`: sqrt of its eigenvalues;
`gram_eigh_norms`: the svd analysis's method="gram", |Z^T v| for its eigenvectors v).
Each is compared with float64 numpy singular values of the same matrices: `max_rel_err` is the
largest |s - s64| / max(s64) and `erank_rel_err` the largest relative error of the effective
rank (the svd analysis' summary) over --svd_check matrices.

  python benchmarks/analysis_profile.py [--variant B/16] [--size 224] [--depth 0] [--batch 16]
      [--dtype float32] [--repeats 3] [--svd_check 4] [--skip tsne] [--only ...]
  # CPU smoke setting (tests/test_benchmarks.py):
  JAX_PLATFORMS=cpu python benchmarks/analysis_profile.py --variant mu/4 --size 32 --depth 2 \
      --batch 4

--depth (0 = the variant's) gives the ViT fewer or more blocks (a quick smoke run with fewer).

Prints one JSON object: model, image_size, depth, dtype, device_batch, forward_s, analyses {name:
{step_s, extra_s, compile_s} or {error}}, slowest, svd {tokens: [batch, N, D], algorithms
{name: {seconds, max_rel_err, erank_rel_err} or {error}}}, device, backend, jax, total_seconds.
"""
import time

_STARTED = time.perf_counter()

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from benchmarks import analysis_step, device_check
from clmim.analysis import runner, svd
from clmim.models import vit as vit_lib


def effective_rank(s):
  """exp(entropy) of singular values normalised to sum 1 (numpy, float64)."""
  p = s / s.sum(-1, keepdims=True)
  return np.exp(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1))


def svd_routes():
  """{name: fn([B, N, D] float32) -> [B, min(N, D)] singular values, descending}."""
  routes = {}
  for algorithm in jax.lax.linalg.SvdAlgorithm:
    routes[algorithm.name.lower()] = (
        lambda z, a=algorithm: jax.lax.linalg.svd(z, full_matrices=False, compute_uv=False,
                                                  algorithm=a))

  def gram_eigvalsh(z):  # the square roots of the smaller Gram matrix's eigenvalues
    rows = z if z.shape[-2] <= z.shape[-1] else jnp.swapaxes(z, -1, -2)
    gram = jnp.einsum("bnd,bmd->bnm", rows, rows, precision="highest")
    return jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(gram)[..., ::-1], 0))

  routes["gram_eigvalsh"] = gram_eigvalsh
  # The svd analysis's own method="gram" (the key is the one earlier JSON files hold).
  routes["gram_eigh_norms"] = lambda z: svd.singular_values(z, "gram")
  return routes


def profile_svd(tokens: np.ndarray, repeats: int, check: int) -> dict:
  """Times and checks every route on `tokens` [B, N, D] (float32)."""
  reference = np.linalg.svd(tokens[:check].astype(np.float64), compute_uv=False)
  reference_rank = effective_rank(reference)
  placed = jax.device_put(tokens)
  out = {}
  for name, route in svd_routes().items():
    try:
      fn = jax.jit(route)
      _, seconds, _ = analysis_step.timed(lambda: fn(placed), repeats, 60.0)
      s = np.asarray(fn(placed), np.float64)[:check]
      scale = reference.max(-1, keepdims=True)
      out[name] = {
          "seconds": round(seconds, 5),
          "max_rel_err": float(f"{np.max(np.abs(s - reference) / scale):.3g}"),
          "erank_rel_err": float(
              f"{np.max(np.abs(effective_rank(s) - reference_rank) / reference_rank):.3g}")}
    except Exception as e:  # an algorithm this backend does not implement
      out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--depth", type=int, default=0, help="ViT blocks (0 = the variant's)")
  parser.add_argument("--batch", type=int, default=16, help="images per device per step")
  parser.add_argument("--dtype", default="float32", choices=vit_lib.DTYPES)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--svd_check", type=int, default=4,
                      help="matrices compared with float64 numpy singular values")
  parser.add_argument("--skip", default=device_check.DEFAULT_SKIP)
  parser.add_argument("--only", default="", help="comma list: profile only these analyses")
  args = parser.parse_args()

  model = vit_lib.build_vit(args.variant, image_size=args.size,
                            depth=args.depth or None).clone(dtype=args.dtype)
  params = analysis_step.random_params(model)
  modules, excluded = analysis_step.select_analyses(
      model, f"ViT-{args.variant} (random init)", {s.strip() for s in args.skip.split(",")})
  if args.only:
    only = {s.strip() for s in args.only.split(",")}
    modules = [m for m in modules if m.NAME in only]
  mesh = runner.make_mesh()
  params = jax.device_put(params, NamedSharding(mesh, P()))
  images = analysis_step.ImageCache(args.size, os.cpu_count() or 1)

  analyses, forward_s = {}, None
  for module in modules:
    try:
      check = analysis_step.StepCheck(model, [module], params, mesh, args.batch, images)
      start = time.perf_counter()
      check.compile_and_run()
      compile_s = time.perf_counter() - start
      if forward_s is None:
        _, forward_s, _ = check.time_forward(args.repeats, 60.0)
      step_s, _ = check.time_step(args.repeats, 60.0)
      analyses[module.NAME] = {"step_s": round(step_s, 5),
                               "extra_s": round(step_s - forward_s, 5),
                               "compile_s": round(compile_s, 2)}
    except Exception as e:
      analyses[module.NAME] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
  timed = {k: v for k, v in analyses.items() if "extra_s" in v}

  # One state's patch tokens, as the svd analysis sees them: the last block's output.
  x = images.first(args.batch)
  zs, _ = jax.jit(lambda p, x: vit_lib.forward_with_states(model, p, x))(params, x)
  tokens = np.asarray(zs[-1][:, 1:], np.float32)
  report = {
      "benchmark": "analysis_profile", "model": f"ViT-{args.variant}", "image_size": args.size,
      "depth": model.depth, "dtype": args.dtype, "device_batch": args.batch,
      "forward_s": round(forward_s or 0, 5),
      "analyses": analyses, "excluded": sorted(excluded),
      "slowest": max(timed, key=lambda k: timed[k]["extra_s"]) if timed else None,
      "svd": {"tokens": list(tokens.shape),
              "algorithms": profile_svd(tokens, args.repeats, min(args.svd_check, len(tokens)))},
      "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
      "device_count": len(jax.devices()), "jax": jax.__version__,
      "total_seconds": round(time.perf_counter() - _STARTED, 2)}
  print(json.dumps(report))


if __name__ == "__main__":
  main()
