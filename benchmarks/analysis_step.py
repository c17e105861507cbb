"""Timing one analysis step on whatever device JAX has: the pieces that benchmarks/device_check.py
and analysis_profile.py share.

- `random_params`: variance-preserving random weights for a ViT, without compiling flax's init;
- `select_analyses`: every one-stream analysis whose `check` accepts a bare ViT;
- `ImageCache`: procedural images rendered once by the loader's threads;
- `StepCheck`: one dtype's `Analyzer` at one batch, compiled once, then its step, the bare
  forward and whole runs timed (`timed`: a warm-up call, then as many timed calls as fit);
- `relative_differences`: how far one dtype's results are from another's, per result key.

Needs only JAX, flax, numpy and clmim (the GPU machines have no ml_collections).
"""
import functools
import statistics
import time
import types

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from clmim.analysis import core, runner
from clmim.data.eval_data import EvalImages
from clmim.errors import ClmimError
from clmim.models import vit as vit_lib


class DataConfig(dict):
  """The config.data fields EvalImages reads, as attributes (ml_collections.ConfigDict's
  interface, which time_source also writes `num_workers` through); the GPU machines have no
  ml_collections."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None

  def __setattr__(self, name, value):
    self[name] = value


def synthetic_config(num_images: int, workers: int) -> DataConfig:
  """config.data for `num_images` procedural validation images read by `workers` threads."""
  return DataConfig(source="synthetic", split="validation", num_images=num_images, seed=0,
                     num_workers=workers, mean="", std="")


def repeats_within(repeats: int, seconds_each: float, allowed: float) -> int:
  """`repeats`, cut to what fits in `allowed` seconds at `seconds_each`, at least 1."""
  return max(1, min(int(repeats), int(allowed / max(seconds_each, 1e-6))))


def timed(fn, repeats: int, allowed: float):
  """Calls `fn` once apart (compile or warm-up), then up to `repeats` timed calls: as many as
  fit in `allowed` seconds at the first timed call's pace, at least one.

  Returns (seconds of the call apart, median of the timed calls, all timed calls).
  """
  def once():
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start

  first = once()
  times = [once()]
  for _ in range(repeats_within(repeats, times[0], allowed) - 1):
    times.append(once())
  return first, statistics.median(times), times


def is_out_of_memory(error: Exception) -> bool:
  """True for XLA's out-of-memory errors (raised at compile or run time)."""
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def random_params(model, seed: int = 0):
  """Random params of `model`, drawn with numpy: kernels ~ N(0, 1 / fan_in) (LeCun normal),
  LayerNorm scales 1, biases 0, cls token and position embedding ~ N(0, 0.02).

  Variance-preserving kernels give attention logits of unit scale, so the maps are not all near
  uniform; with timm's N(0, 0.02) kernels they are (a mu/4's attention entropy then agrees
  between bf16 and f32 to ~5e-7, which tests no precision). Not `jax.jit(model.init)`:
  compiling flax's random initialisers takes ~15 s for a mu/4 on a 2-core CPU, about an
  analysis step's compile; only the shapes come from flax.
  """
  x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), np.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "bias":
      return np.zeros(leaf.shape, leaf.dtype)
    if name == "scale":
      return np.ones(leaf.shape, leaf.dtype)
    std = np.prod(leaf.shape[:-1]) ** -0.5 if name == "kernel" else 0.02
    return (std * rng.standard_normal(leaf.shape, np.float32)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def select_analyses(vit, model_name, skip):
  """(modules, {name: why excluded}) over every analysis of clmim/analysis/.

  Kept: one-stream analyses (`partial_sums`) whose `check` accepts the bare ViT `vit` (seen as
  a registry model called `model_name` without a decoder) with default options. Left out:
  multi-pass ones (`measure`: probes fitted on labelled data over several passes, or the
  procedural images' object masks; `Analyzer` does not run them directly), those whose `check`
  refuses (e.g. `decoder`: no decoder; `tsne` without scikit-learn), and those in `skip`.
  """
  model = types.SimpleNamespace(vit=vit, name=model_name, decoder=None)  # what `check`s read
  modules, excluded = [], {}
  for name in core.available():
    try:
      module = core.load(name)
    except (ImportError, ClmimError) as e:  # e.g. a missing optional dependency at import
      excluded[name] = f"cannot be loaded: {e}"
      continue
    if core.is_multi_pass(module):
      summary = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())
      excluded[name] = (f"multi-pass (runs its own passes, not one stream): "
                        f"{summary.split('. ')[0].rstrip('.')}")
    elif name in skip:
      excluded[name] = ("skipped (--skip): its finalize fits a t-SNE on the host with "
                        "scikit-learn; not device work, and its bf16/f32 difference is no "
                        "precision measure" if name == "tsne" else "skipped (--skip)")
    else:
      try:
        if hasattr(module, "check"):
          module.check(model, core.resolve_options(module, None))
        modules.append(module)
      except ClmimError as e:
        excluded[name] = f"its check refuses this model: {e}"
  return modules, excluded


class ImageCache:
  """Procedural images rendered once by the loader's worker threads, extended on demand."""

  def __init__(self, size: int, workers: int):
    self.size, self.workers = size, workers
    self.images = np.zeros((0, size, size, 3), np.float32)

  def first(self, count: int) -> np.ndarray:
    """The first `count` images (ImageNet-normalised float32 [count, S, S, 3])."""
    have = len(self.images)
    if count > have:
      source = EvalImages(synthetic_config(count, self.workers),
                          {"image_size": self.size, "mean": "imagenet", "std": "imagenet"})
      more = [b for b, _ in source.load_batches(range(have, count), 64)]
      self.images = np.concatenate([self.images] + more)
    return self.images[:count]


class StepCheck:
  """One dtype's Analyzer at one batch: compiled by a first `run`, then timed."""

  def __init__(self, model, modules, params, mesh, device_batch, images: ImageCache,
               options=None):
    self.model, self.params, self.mesh = model, params, mesh
    self.analyzer = runner.Analyzer(functools.partial(vit_lib.forward_with_states, model),
                                    modules, model.patch_size, mesh=mesh,
                                    device_batch_size=device_batch, options=options)
    self.images = images.first(self.analyzer.local_batch_size)

  def compile_and_run(self) -> dict:
    """Runs the analyses over one batch (this compiles the step); returns the results."""
    return self.analyzer.run(self.params, [self.images], progress=False)

  def time_step(self, repeats: int, allowed: float):
    """(median s, all s) of the compiled step on a device-resident batch.

    The arrays are made exactly as `run` makes them (`_put`, params replicated), so the jit
    cache hits: `compilations` must stay 1, which the caller reports.
    """
    a, n = self.analyzer, len(self.images)
    placed = a._put(self.images, np.ones(n, np.float32), np.arange(n, dtype=np.int32),
                    np.zeros((n, 0), np.int32))
    params = jax.device_put(self.params, a._replicated)
    context = jax.device_put({}, a._replicated)
    _, median, times = timed(lambda: a._step(params, context, *placed), repeats, allowed)
    return median, times

  def time_forward(self, repeats: int, allowed: float):
    """(compile s, median s, all s) of the bare forward (jit of model.apply) on the same batch,
    sharded over the same mesh (params replicated), so it compares with the step."""
    images = jax.device_put(self.images, NamedSharding(self.mesh, P("data")))
    params = jax.device_put(self.params, NamedSharding(self.mesh, P()))
    forward = jax.jit(lambda p, x: self.model.apply({"params": p}, x))
    return timed(lambda: forward(params, images), repeats, allowed)

  def time_run(self, steps: int):
    """(images/s per step, fixed s per run) of `Analyzer.run` on in-memory batches.

    A run also pays once for what does not scale with its length (each analysis' `finalize`
    on the host, setting up): timing runs of 1 and 1 + `steps` batches separates the two, so
    the rate is the steady streaming rate of a long run.
    """
    def run(count):
      start = time.perf_counter()
      self.analyzer.run(self.params, [self.images] * count, progress=False)
      return time.perf_counter() - start

    one, many = run(1), run(1 + steps)
    per_step = (many - one) / steps
    if per_step <= 0:  # noise larger than the steps themselves: fall back to the plain mean
      per_step = many / (1 + steps)
    return len(self.images) / per_step, max(one - per_step, 0.0)


def _floats(value, out):
  """Appends every float leaf of a nested result (lists, dicts) to `out`, in order."""
  if isinstance(value, dict):
    for key in sorted(value):
      _floats(value[key], out)
  elif isinstance(value, (list, tuple)):
    for item in value:
      _floats(item, out)
  elif isinstance(value, (float, np.floating)):
    out.append(float(value))
  return out


def relative_differences(low: dict, reference: dict):
  """({key: max |low - ref| / max |ref|}, [keys without floats]) over the result keys.

  Entries NaN in both are skipped (e.g. cka of a constant cls token); a NaN in one only, or a
  difference against an all-zero reference, is inf.
  """
  diffs, not_compared = {}, []
  for key in sorted(reference):
    a = np.asarray(_floats(low.get(key), []), np.float64)
    b = np.asarray(_floats(reference[key], []), np.float64)
    if not len(b):
      not_compared.append(key)
      continue
    if a.shape != b.shape:
      diffs[key] = float("inf")
      continue
    both_nan = np.isnan(a) & np.isnan(b)
    a, b = a[~both_nan], b[~both_nan]
    if not len(b):
      not_compared.append(key)
      continue
    if np.isnan(a).any() or np.isnan(b).any():
      diffs[key] = float("inf")
      continue
    scale, gap = np.abs(b).max(), np.abs(a - b).max()
    diffs[key] = float(gap / scale) if scale > 0 else (0.0 if gap == 0 else float("inf"))
  return diffs, not_compared
