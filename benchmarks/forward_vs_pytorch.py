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
      [--repeats 5] [--threads N]

`--threads N` pins the process to N cores before jax and torch start their thread pools (when
run as a script) and sets torch.set_num_threads(N); the default is every core this process may
use. Run it on a quiet machine: the numbers are only as good as the CPU is idle (on a busy one,
torch's OpenMP barriers stall on every op and its times grow tenfold; the JSON records the load
average at start).
"""
import argparse
import functools
import json
import math
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

# The heavy imports come after the pinning above (E402 on purpose).
import einops  # noqa: E402  (the official notebooks' tensor helpers)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from clmim.analysis import attention_distance, fourier, nmi, runner  # noqa: E402
from clmim.models.vit import build_vit, forward_with_states  # noqa: E402


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


# ------------------------------------------------------------------------------------------------
# The PyTorch model (timm 0.5.4 VisionTransformer, as the official models/vit.py uses it)
# ------------------------------------------------------------------------------------------------

class TorchAttention(nn.Module):
  """Softmax self-attention with a fused, biased qkv Linear (timm 0.5.4 layout)."""

  def __init__(self, width, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (width // num_heads) ** -0.5
    self.qkv = nn.Linear(width, 3 * width, bias=True)
    self.proj = nn.Linear(width, width)

  def forward(self, x, official_extras=False):
    """x [B, N, C] -> (output [B, N, C], post-softmax probabilities [B, heads, N, N])."""
    batch, tokens, width = x.shape
    # [B, N, 3, heads, hd] -> [3, B, heads, N, hd]: q, k and v split from one matmul.
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    probs = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    mixed = probs @ v
    if official_extras:
      # The official models/vit.py computes `attn @ v` a second time (its "attn_ft" output); the
      # pipeline forward keeps that matmul so it costs what the official forward costs.
      _ = probs @ v
    out = self.proj(mixed.transpose(1, 2).reshape(batch, tokens, width))
    return out, probs


class TorchMlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2."""

  def __init__(self, width, mlp_dim):
    super().__init__()
    self.fc1 = nn.Linear(width, mlp_dim)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(mlp_dim, width)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class TorchBlock(nn.Module):
  """Pre-norm block; returns the states after the attention and the MLP branch, and the map."""

  def __init__(self, width, num_heads, mlp_dim):
    super().__init__()
    self.norm1 = nn.LayerNorm(width, eps=1e-6)
    self.attn = TorchAttention(width, num_heads)
    self.norm2 = nn.LayerNorm(width, eps=1e-6)
    self.mlp = TorchMlp(width, mlp_dim)

  def forward(self, x, official_extras=False):
    branch, probs = self.attn(self.norm1(x), official_extras)
    after_attention = x + branch
    after_mlp = after_attention + self.mlp(self.norm2(after_attention))
    return after_attention, after_mlp, probs


class TorchViT(nn.Module):
  """Patch-embedding conv, cls token, learned position embedding, pre-norm blocks, final norm.

  `forward(x)` is the bare forward: final-normed tokens [B, N+1, D]. `forward(x, states=True)`
  is the official models/vit.py forward as the notebooks call it: every residual state `zs`
  (embedding, then after-attention and after-MLP of each block) and every attention map. The
  classifier head the official forward also runs (one Linear on the cls token, and the extra
  entry the notebooks slice off with `zs[:-1]`) is left out: clmim's encoder has none either.
  """

  def __init__(self, width, depth, num_heads, mlp_dim, patch_size, image_size):
    super().__init__()
    tokens = (image_size // patch_size) ** 2 + 1
    self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    self.pos_embed = nn.Parameter(torch.zeros(1, tokens, width))
    self.blocks = nn.ModuleList(
        [TorchBlock(width, num_heads, mlp_dim) for _ in range(depth)])
    self.norm = nn.LayerNorm(width, eps=1e-6)

  def forward(self, x, states=False):
    """x: NCHW float images."""
    x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, D, g, g] -> [B, g*g, D], row-major
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    if not states:
      for block in self.blocks:
        x = block(x)[1]
      return self.norm(x)
    zs, attns = [x], []
    for block in self.blocks:
      after_attention, x, probs = block(x, official_extras=True)
      zs += [after_attention, x]
      attns.append(probs)
    self.norm(x)  # the official forward normalises the last state too (for its head)
    return zs, attns


def build_torch_vit(model):
  """An (uninitialised) TorchViT with the architecture of the clmim ViT `model`."""
  if model.block_style != "timm" or model.position_embedding != "learned":
    raise ValueError("forward_vs_pytorch compares timm-style ViTs with a learned position "
                     f"embedding; got block_style={model.block_style!r}, "
                     f"position_embedding={model.position_embedding!r}.")
  return TorchViT(model.width, model.depth, model.num_heads, model.mlp_dim, model.patch_size,
                  model.image_size).eval()


def load_clmim_params(torch_model, params):
  """Copies clmim ViT params (layout at the top of clmim/models/vit.py) into `torch_model`.

  Conv kernel [p, p, 3, D] (HWIO) -> weight [D, 3, p, p] (OIHW); Dense kernel [in, out] ->
  Linear weight [out, in]; LayerNorm scale -> weight. `strict=True`: every tensor is set.
  """
  p = jax.tree.map(np.asarray, jax.device_get(params))
  state = {
      "patch_embed.weight": p["patch_embed"]["kernel"].transpose(3, 2, 0, 1),
      "patch_embed.bias": p["patch_embed"]["bias"],
      "cls_token": p["cls_token"], "pos_embed": p["pos_embed"],
      "norm.weight": p["norm"]["scale"], "norm.bias": p["norm"]["bias"],
  }
  for i in range(len(torch_model.blocks)):
    block = p[f"block_{i}"]
    dense = {"attn.qkv": block["attn"]["qkv"], "attn.proj": block["attn"]["proj"],
             "mlp.fc1": block["mlp"]["fc1"], "mlp.fc2": block["mlp"]["fc2"]}
    for name, leaf in dense.items():
      state[f"blocks.{i}.{name}.weight"] = leaf["kernel"].T
      state[f"blocks.{i}.{name}.bias"] = leaf["bias"]
    for name in ("norm1", "norm2"):
      state[f"blocks.{i}.{name}.weight"] = block[name]["scale"]
      state[f"blocks.{i}.{name}.bias"] = block[name]["bias"]
  torch_model.load_state_dict(
      {k: torch.from_numpy(np.array(v, np.float32, order="C")) for k, v in state.items()},
      strict=True)
  return torch_model


# ------------------------------------------------------------------------------------------------
# The official notebook analyses, reimplemented (by us, for timing only)
# ------------------------------------------------------------------------------------------------
# These are reimplementations of the official naver-ai/cl-vs-mim notebooks' functions
# (self_attention_analysis.ipynb: compute_distance_matrix, calculate_mean_attention_dist,
# calculate_nmi and the per-layer loops of the two analysis cells; representation_analysis.ipynb:
# fourier, shift, get_fourier_latents and the Fourier cell's loop), written for timing only.
# They keep the official algorithmic shape and libraries -- a Python double loop for the distance
# matrix rebuilt on every call, numpy float64 broadcasting for the distances, torch + einops for
# NMI, torch.fft for Fourier, per-layer .cpu()/.numpy() conversions, running means per layer --
# so the timing is that of the official pipeline; clmim's own code is clmim/analysis/.

class AverageMeter:
  """Running mean of tensors (what the notebooks use timm.utils.AverageMeter for)."""

  def __init__(self):
    self.total, self.count, self.avg = 0, 0, 0

  def update(self, value, n=1):
    self.total = self.total + value * n
    self.count += n
    self.avg = self.total / self.count


def official_distance_matrix(patch_size, num_patches, length):
  """[N, N] pixel distances between patches, built element by element as the notebook does."""
  matrix = np.zeros((num_patches, num_patches))
  for i in range(num_patches):
    for j in range(num_patches):
      if i == j:
        continue
      row_i, col_i = int(i / length), i % length
      row_j, col_j = int(j / length), j % length
      matrix[i, j] = patch_size * np.linalg.norm([row_i - row_j, col_i - col_j])
  return matrix


def official_mean_attention_dist(patch_size, attention_weights):
  """numpy [B, heads, N, N] renormalised maps -> torch [B, heads] mean attention distance (px)."""
  num_patches = attention_weights.shape[-1]
  length = int(np.sqrt(num_patches))
  assert length * length == num_patches, "the patch count is not a perfect square"
  distances = official_distance_matrix(patch_size, num_patches, length)
  distances = distances.reshape((1, 1) + distances.shape)
  weighted = np.sum(attention_weights * distances, axis=-1)  # per query: float32 x float64
  return torch.tensor(np.mean(weighted, axis=-1))  # mean over queries


def official_nmi(attn):
  """torch [B, heads, Q, K] renormalised maps -> [B, heads] NMI(query; key), uniform p(q)."""
  b, h, q, k = attn.shape
  p_query = torch.softmax(torch.ones([b, h, q]).to(attn.device), dim=-1)  # uniform 1/Q
  p_query_ext = einops.repeat(p_query, "b h q -> b h q k", k=k)
  p_key = einops.reduce(attn * p_query_ext, "b h q k -> b h k", "sum")
  p_key_ext = einops.repeat(p_key, "b h k -> b h q k", q=q)
  mutual = einops.reduce(attn * p_query_ext * torch.log(attn / p_key_ext), "b h q k -> b h", "sum")
  h_query = -einops.reduce(p_query * torch.log(p_query), "b h q -> b h", "sum")
  h_key = -einops.reduce(p_key * torch.log(p_key), "b h k -> b h", "sum")
  return mutual / torch.sqrt(h_query * h_key)


def _official_log_amplitude(x):
  """log(|fft2(x)| + 1e-6) over the last two axes."""
  return (torch.fft.fft2(x).abs() + 1e-6).log()


def _official_shift(x):
  """Rolls [B, C, H, W] by half the grid so frequency 0 sits at the centre."""
  _, _, height, width = x.shape
  return torch.roll(x, shifts=(int(height / 2), int(width / 2)), dims=(2, 3))


def official_fourier_latents(latents):
  """[B, N, C] patch tokens per state -> per state the ΔlogA half-diagonal (relative to DC)."""
  out = []
  for latent in latents:
    latent = latent.cpu()
    _, n, _ = latent.shape
    side = int(math.sqrt(n))
    latent = einops.rearrange(latent, "b (h w) c -> b c h w", h=side, w=side)
    latent = _official_shift(_official_log_amplitude(latent)).mean(dim=(0, 1))
    latent = latent.diag()[int(side / 2):]
    out.append(latent - latent[0])
  return out


def official_analyses(zs, attns, patch_size, times=None):
  """The three official analysis cells on one batch's states and maps (torch tensors).

  Each cell's per-layer loop as in the notebooks: attention distance (drop cls, + 1e-32,
  renormalise, to numpy, distance, batch mean into a running mean), NMI (drop cls, + 1e-8,
  renormalise, NMI, batch mean) and Fourier (drop cls of every state, ΔlogA). `times`, when a
  dict, receives each cell's wall time under "distance", "nmi" and "fourier".

  Returns:
    {"attention_distance": [layers, heads], "nmi": [layers, heads],
     "fourier_all_states": [states, frequencies]} as float64 numpy arrays.
  """
  times = {} if times is None else times
  attns = [a for a in attns if a is not None]

  start = time.perf_counter()
  distances = [AverageMeter() for _ in attns]
  for i, attn in enumerate(attns):
    attn = attn[:, :, 1:, 1:] + 1e-32
    attn = attn / attn.sum(dim=-1, keepdim=True)
    attn = attn.cpu().float().detach().numpy()
    distances[i].update(torch.mean(official_mean_attention_dist(patch_size, attn), dim=0))
  times["distance"] = time.perf_counter() - start

  start = time.perf_counter()
  nmis = [AverageMeter() for _ in attns]
  for i, attn in enumerate(attns):
    attn = attn[:, :, 1:, 1:] + 1e-8
    attn = attn / attn.sum(dim=-1, keepdim=True)
    attn = attn.cpu().float()
    nmis[i].update(torch.mean(official_nmi(attn), dim=0))
  times["nmi"] = time.perf_counter() - start

  start = time.perf_counter()
  spectra = AverageMeter()
  spectra.update(torch.stack(official_fourier_latents([z[:, 1:, :] for z in zs])))
  times["fourier"] = time.perf_counter() - start

  as_array = lambda meters: np.stack([np.asarray(m.avg, np.float64) for m in meters])
  return {"attention_distance": as_array(distances), "nmi": as_array(nmis),
          "fourier_all_states": np.asarray(spectra.avg, np.float64)}


def official_pipeline(torch_model, images_nchw, patch_size, times=None):
  """One batch through the official pipeline: the states-returning forward, then the three
  cells. One forward serves all three cells here; the notebooks run one per cell (see
  `official_notebook_images_per_s` in the output). `times` also receives "forward"."""
  times = {} if times is None else times
  start = time.perf_counter()
  with torch.no_grad():
    zs, attns = torch_model(images_nchw, states=True)
  times["forward"] = time.perf_counter() - start
  return official_analyses(zs, attns, patch_size, times)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

_PAUSE_S = 0.05


def _time_interleaved(fns, repeats):
  """Times every fn `repeats` times, alternating between them, after one untimed warm-up call
  each (jit compilation, allocator growth). The fns must return only when their work is done.

  A short untimed pause precedes each call: XLA's and OpenMP's worker threads spin for a while
  after their last task, and would otherwise steal cores from the library timed next.

  Returns:
    {name: (median seconds, [seconds of every repeat])}.
  """
  for fn in fns.values():
    fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      time.sleep(_PAUSE_S)
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: (statistics.median(t), t) for name, t in times.items()}


def _cpu_name():
  """The CPU model from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


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
  model = build_vit(args.variant, image_size=args.size)
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
  forwards = _time_interleaved({"clmim": clmim_forward, "torch": torch_forward}, args.repeats)

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
  pipelines = _time_interleaved({"clmim": clmim_pipeline, "official": official}, args.repeats)
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
  matmuls = _time_interleaved({
      "xla": lambda: jax.block_until_ready(xla_dot(lhs_jax, rhs_jax)),
      "torch": lambda: torch.matmul(lhs_torch, rhs_torch)}, args.repeats)
  matmul_flop = 2 * rows * model.width * model.mlp_dim

  flop = args.batch * vit_forward_flops(model.width, model.depth, model.mlp_dim, model.patch_size,
                                        args.size)
  clmim_fwd, torch_fwd = forwards["clmim"][0], forwards["torch"][0]
  clmim_pipe, official_pipe = pipelines["clmim"][0], pipelines["official"][0]
  result = {
      "benchmark": "forward_vs_pytorch", "model": f"ViT-{args.variant} (timm blocks)",
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
      "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
      "jax": jax.__version__, "torch": torch.__version__, "numpy": np.__version__,
      "python": platform.python_version(),
  }
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
