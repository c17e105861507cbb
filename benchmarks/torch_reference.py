"""The official PyTorch code that clmim's CPU benchmarks run against, reimplemented by us for
timing and parity checks only (benchmarks/forward_vs_pytorch.py, moco_step_vs_pytorch.py).

- A timm-0.5.4-style `VisionTransformer` (the architecture of the official naver-ai/cl-vs-mim
  models), loadable with a clmim ViT's parameters (`load_clmim_params`).
- The official notebooks' analysis functions (attention distance, NMI, Fourier latents) with
  their algorithmic shape and libraries, so that their timing is the official pipeline's.
- Side-by-side timing: `time_interleaved` alternates the contenders, `paired_speedup`
  compares two of them repeat by repeat, and `cpu_name` (from machine_info.py).

Never imported by clmim itself; torch and einops are test/benchmark dependencies.
"""
import math
import os
import platform
import statistics
import sys
import time

import einops
import jax
import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling, also from tests/
from machine_info import cpu_name  # noqa: E402  (re-exported: the benchmarks import it from here)

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

  def forward(self, x, official_extras=False, cls_only=False):
    """x [B, N, C] -> (output [B, N, C], post-softmax probabilities [B, heads, N, N]); with
    cls_only, of the cls token's query alone (every token's key and value): [B, 1, C] and
    [B, heads, 1, N], as clmim's ViT(cls_only=True)."""
    batch, tokens, width = x.shape
    heads = lambda t: t.reshape(batch, t.shape[1], -1, self.num_heads,
                                width // self.num_heads).permute(2, 0, 3, 1, 4)
    if cls_only:
      weight, bias = self.qkv.weight, self.qkv.bias
      q = heads(nn.functional.linear(x[:, :1], weight[:width], bias[:width]))[0]
      k, v = heads(nn.functional.linear(x, weight[width:], bias[width:])).unbind(0)
    else:  # [B, N, 3, heads, hd] -> [3, B, heads, N, hd]: q, k and v split from one matmul.
      q, k, v = heads(self.qkv(x)).unbind(0)
    probs = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    mixed = probs @ v
    if official_extras:
      # The official models/vit.py computes `attn @ v` a second time (its "attn_ft" output); the
      # pipeline forward keeps that matmul so it costs what the official forward costs.
      _ = probs @ v
    out = self.proj(mixed.transpose(1, 2).reshape(batch, q.shape[2], width))
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

  def forward(self, x, official_extras=False, cls_only=False):
    """cls_only: the states of the cls token alone, [B, 1, C] (clmim's ViT(cls_only=True))."""
    branch, probs = self.attn(self.norm1(x), official_extras, cls_only)
    after_attention = (x[:, :1] if cls_only else x) + branch
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

  def forward(self, x, states=False, cls_only=False):
    """x: NCHW float images. cls_only: the final-normed cls token alone [B, 1, D], with the last
    block computing only its row (as clmim's ViT(cls_only=True))."""
    x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, D, g, g] -> [B, g*g, D], row-major
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    if not states:
      for index, block in enumerate(self.blocks):
        x = block(x, cls_only=cls_only and index == len(self.blocks) - 1)[1]
      return self.norm(x[:, :1] if cls_only else x)
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
    raise ValueError("The PyTorch reference is a timm-style ViT with a learned position "
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
# Timing side by side
# ------------------------------------------------------------------------------------------------

_PAUSE_S = 0.05


def time_interleaved(fns, repeats):
  """Times every fn `repeats` times, alternating between them, after one untimed warm-up call
  each (jit compilation, allocator growth). The fns must return only when their work is done.

  A short untimed pause precedes each call: XLA's and OpenMP's worker threads spin for a while
  after their last task, and would otherwise steal cores from the library timed next. Every
  other repeat runs the contenders in reverse order, so that none always follows the same one.

  Returns:
    {name: (median seconds, [seconds of every repeat])}.
  """
  for fn in fns.values():
    fn()
  times = {name: [] for name in fns}
  for repeat in range(repeats):
    order = list(fns.items())
    for name, fn in (order if repeat % 2 == 0 else order[::-1]):
      time.sleep(_PAUSE_S)
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: (statistics.median(t), t) for name, t in times.items()}


def paired_speedup(ours, theirs, resamples=4000, seed=0):
  """How much faster `ours` ran than `theirs`, repeat by repeat: the two lists are the seconds of
  the same repeats of `time_interleaved`, so each ratio theirs[r] / ours[r] compares calls made
  moments apart and the VM's slow drifts cancel. Returns the median ratio, a bootstrap 95 %
  interval of that median (the repeats resampled with replacement, `resamples` times, seeded),
  and the share of repeats in which ours was the faster."""
  if len(ours) != len(theirs) or not ours:
    raise ValueError(f"paired_speedup needs two equal-length lists of seconds, got {len(ours)} "
                     f"and {len(theirs)}")
  ratios = np.asarray(theirs, np.float64) / np.asarray(ours, np.float64)
  picks = np.random.default_rng(seed).integers(0, ratios.size, (resamples, ratios.size))
  medians = np.median(ratios[picks], axis=1)
  return {"median": round(float(np.median(ratios)), 3),
          "ci95": [round(float(np.percentile(medians, 2.5)), 3),
                   round(float(np.percentile(medians, 97.5)), 3)],
          "faster_in": f"{int(np.sum(ratios > 1))}/{ratios.size}"}


def load_average():
  """The 1-minute load average (None where the OS has none): read it before a run starts."""
  return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run_record(load_at_start, started):
  """What a side-by-side benchmark records about where and how it ran: library versions, torch's
  threads, the host-memory setting, the CPU, the load average read at its start (`load_average()`
  before the work) and its wall seconds since `started` (time.time())."""
  from clmim import host_memory
  return {"jax": jax.__version__, "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(), "host_memory": host_memory.status(),
          "cpu": cpu_name(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
          "load_average_at_start": load_at_start,
          "total_seconds": round(time.time() - started, 1)}
