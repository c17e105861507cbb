r"""Where a ViT's forward + backward loses to PyTorch on a CPU: its dense layers' matmuls, each of
the three forms a gradient step runs, timed in XLA and in PyTorch side by side in one process.

A training step's ViT work is its forward and backward. For every Dense layer of a block (qkv,
proj, fc1, fc2 on the [B*N, D] rows) that is three matmuls: the forward `x·W`, the input
gradient `dy·Wᵀ` and the weight gradient `xᵀ·dy`, whose contraction runs over all B*N rows.
Each is timed as XLA runs it (jit of the expression; XLA folds the transposes into the dot, as it
does for the transposes `jax.grad` emits) and as PyTorch runs it (`x @ w`, `dy @ w.t()`,
`x.t() @ dy`: what autograd calls for `nn.Linear`), alternating, median of --repeats timed calls
of --inner products each. Beside them, the whole model's forward + backward (the mean of the
final tokens weighted by a fixed random tensor; gradients of every parameter) in clmim and in
the timm-style PyTorch ViT of benchmarks/torch_reference.py loaded with the same weights (their
losses and one gradient compared first), and one block's attention core (q·kᵀ, softmax, ·v and their gradients, from
the qkv rows to the mixed rows), so the report says how much of the model's gap each accounts
for; the rest (LayerNorm, GELU, biases, residuals, the embedding) is what remains.

Runs with the training runs' host-memory setting (clmim/host_memory.py), which both libraries
share in one process. Defaults: the demo ViT (mu/4, 32 px) at the demo recipes' batch 64.

  python benchmarks/vit_matmuls_vs_pytorch.py [--variant mu/4] [--size 32] [--batch 64]
      [--repeats 15] [--inner 20] [--depth 0]

Prints one JSON object: per layer and form, ms per product and GFLOP/s of each library; per
form, the sum over a block's layers times the depth (ms per forward + backward); the attention
core per block and times the depth; the model's forward + backward in each library; and the
model's gap (clmim - PyTorch, ms) split into the dense matmuls', the attention core's and the
rest.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from clmim import host_memory  # noqa: E402

host_memory.keep_freed_memory()  # as training runs do, before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from clmim.models.vit import build_vit  # noqa: E402
from torch_reference import (  # noqa: E402
    build_torch_vit, load_average, load_clmim_params, run_record, time_interleaved)

# form: (XLA expression, PyTorch expression, operands as (rows, fan_in, fan_out) -> shapes)
FORMS = {
    "forward x·W": (lambda x, w: x @ w, lambda x, w: x @ w,
                    lambda r, i, o: ((r, i), (i, o))),
    "input gradient dy·Wᵀ": (lambda dy, w: dy @ w.T, lambda dy, w: dy @ w.t(),
                             lambda r, i, o: ((r, o), (i, o))),
    "weight gradient xᵀ·dy": (lambda x, dy: x.T @ dy, lambda x, dy: x.t() @ dy,
                              lambda r, i, o: ((r, i), (r, o))),
}


def dense_layers(model):
  """{name: (fan_in, fan_out)} of one block's Dense layers."""
  return {"qkv": (model.width, 3 * model.width), "proj": (model.width, model.width),
          "fc1": (model.width, model.mlp_dim), "fc2": (model.mlp_dim, model.width)}


def ms_per_call(xla_call, torch_call, repeats, inner):
  """{"xla": ms, "torch": ms} per call: medians of `repeats` timed calls of `inner` calls each,
  the two libraries alternating (`time_interleaved`)."""
  def xla():
    for _ in range(inner):
      result = xla_call()
    jax.block_until_ready(result)

  def pytorch():
    for _ in range(inner):
      torch_call()

  times = time_interleaved({"xla": xla, "torch": pytorch}, repeats)
  return {name: 1e3 * median / inner for name, (median, _) in times.items()}


def time_matmuls(rows, layers, repeats, inner, rng):
  """{layer: {form: {xla_ms, torch_ms, xla_gflops, torch_gflops}}}, each product timed alone."""
  out = {}
  for layer, (fan_in, fan_out) in layers.items():
    out[layer] = {}
    for form, (xla_expr, torch_expr, shapes) in FORMS.items():
      a, b = (rng.standard_normal(s, dtype=np.float32) for s in shapes(rows, fan_in, fan_out))
      ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
      product = jax.jit(xla_expr)
      got, want = np.asarray(product(ja, jb)), torch_expr(ta, tb).numpy()
      assert np.allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max()), (layer, form)

      times = ms_per_call(lambda: product(ja, jb), lambda: torch_expr(ta, tb), repeats, inner)
      flop = 2.0 * rows * fan_in * fan_out
      entry = {}
      for name, ms in times.items():
        entry[f"{name}_ms"] = round(ms, 3)
        entry[f"{name}_gflops"] = round(flop / ms / 1e6, 1)
      out[layer][form] = entry
  return out


def attention_core(model, batch, repeats, inner, rng):
  """ms of one block's attention core forward + backward in each library: from the qkv rows
  [B*N, 3D] to the mixed rows [B*N, D] (split into heads, q·kᵀ scaled, softmax, ·v, heads
  merged), with the gradient of a fixed random weighting of the output with respect to qkv,
  as clmim's Attention and the reference ViT compute it."""
  tokens = (model.image_size // model.patch_size) ** 2 + 1
  heads, width = model.num_heads, model.width
  hd = width // heads
  qkv = rng.standard_normal((batch * tokens, 3 * width), dtype=np.float32)
  weighting = rng.standard_normal((batch * tokens, width), dtype=np.float32)

  def jax_core(rows):
    q, k, v = jnp.transpose(rows.reshape(batch, tokens, 3, heads, hd), (2, 0, 3, 1, 4))
    probs = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * hd ** -0.5, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
    return out.transpose(0, 2, 1, 3).reshape(batch * tokens, width)

  jax_grad = jax.jit(jax.grad(lambda rows, w: jnp.sum(jax_core(rows) * w)))
  jax_rows, jax_weighting = jnp.asarray(qkv), jnp.asarray(weighting)
  torch_weighting = torch.from_numpy(weighting)

  def torch_grad():
    rows = torch.from_numpy(qkv).requires_grad_()
    q, k, v = rows.reshape(batch, tokens, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    probs = ((q @ k.transpose(-2, -1)) * hd ** -0.5).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch * tokens, width)
    (out * torch_weighting).sum().backward()
    return rows.grad

  got, want = np.asarray(jax_grad(jax_rows, jax_weighting)), torch_grad().numpy()
  assert np.allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())

  times = ms_per_call(lambda: jax_grad(jax_rows, jax_weighting), torch_grad, repeats, inner)
  return {f"{name}_ms": round(ms, 3) for name, ms in times.items()}


def model_forward_backward(model, batch, repeats, rng):
  """Median seconds of one forward + backward in clmim and in PyTorch, and their agreement."""
  images = rng.standard_normal((batch, model.image_size, model.image_size, 3), dtype=np.float32)
  jax_images = jnp.asarray(images)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jax_images[:1])["params"]
  torch_model = load_clmim_params(build_torch_vit(model), params).train()
  torch_images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

  # A fixed random weighting of the final tokens: their mean square would be ~1 whatever the
  # weights (the final LayerNorm), leaving gradients of round-off size.
  tokens = (model.image_size // model.patch_size) ** 2 + 1
  weighting = rng.standard_normal((batch, tokens, model.width), dtype=np.float32)
  jax_weighting, torch_weighting = jnp.asarray(weighting), torch.from_numpy(weighting)

  def loss(p, x):
    return jnp.mean(model.apply({"params": p}, x) * jax_weighting)

  value_and_grad = jax.jit(jax.value_and_grad(loss))

  def clmim_step():
    value, grads = value_and_grad(params, jax_images)
    jax.block_until_ready(grads)
    return value, grads

  def torch_step():
    for p in torch_model.parameters():
      p.grad = None
    value = (torch_model(torch_images) * torch_weighting).mean()
    value.backward()
    return value

  (jax_loss, grads), torch_loss = clmim_step(), torch_step()
  want = torch_model.blocks[0].attn.qkv.weight.grad.numpy().T  # Linear [out, in] -> [in, out]
  got = np.asarray(grads["block_0"]["attn"]["qkv"]["kernel"])
  check = {"loss_abs_diff": abs(float(jax_loss) - torch_loss.item()),
           "qkv_kernel_grad_rel_diff": float(np.abs(got - want).max() / np.abs(want).max())}
  times = time_interleaved({"clmim": clmim_step, "pytorch": torch_step}, repeats)
  return {name: round(median, 4) for name, (median, _) in times.items()}, check


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="mu/4")
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--inner", type=int, default=20, help="products per timed call")
  parser.add_argument("--depth", type=int, default=0, help="ViT blocks (0 = the variant's)")
  args = parser.parse_args(argv)
  started, load_at_start = time.time(), load_average()
  rng = np.random.default_rng(0)
  depth = {"depth": args.depth} if args.depth else {}
  model = build_vit(args.variant, image_size=args.size, **depth)
  rows = args.batch * ((args.size // model.patch_size) ** 2 + 1)
  matmuls = time_matmuls(rows, dense_layers(model), args.repeats, args.inner, rng)
  per_pass = {}
  for form in FORMS:
    for name in ("xla", "torch"):
      total = sum(matmuls[layer][form][f"{name}_ms"] for layer in matmuls) * model.depth
      per_pass.setdefault(form, {})[f"{name}_ms"] = round(total, 2)
  core = attention_core(model, args.batch, args.repeats, args.inner, rng)
  core_per_pass = {k: round(v * model.depth, 2) for k, v in core.items()}
  model_s, check = model_forward_backward(model, args.batch, args.repeats, rng)
  matmul_gap = sum(v["xla_ms"] - v["torch_ms"] for v in per_pass.values())
  core_gap = core_per_pass["xla_ms"] - core_per_pass["torch_ms"]
  model_gap = 1e3 * (model_s["clmim"] - model_s["pytorch"])
  result = {
      "benchmark": "vit_matmuls_vs_pytorch", "variant": args.variant, "image_size": args.size,
      "batch": args.batch, "rows": rows, "depth": model.depth, "repeats": args.repeats,
      "inner": args.inner, "matmuls": matmuls,
      "dense_matmuls_per_forward_backward_ms": per_pass,
      "attention_core_per_block_ms": core, "attention_core_per_forward_backward_ms": core_per_pass,
      "model_forward_backward_s": model_s, "same_model_check": check,
      "dense_matmul_gap_ms": round(matmul_gap, 1), "attention_core_gap_ms": round(core_gap, 1),
      "model_gap_ms": round(model_gap, 1),
      "rest_gap_ms": round(model_gap - matmul_gap - core_gap, 1),
      **run_record(load_at_start, started),
  }
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  host_memory.run_with_tcmalloc()  # as `python -m clmim.main` training runs do; may restart
  main()
