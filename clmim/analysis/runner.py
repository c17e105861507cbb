"""Streams image batches through a model and the analyses, exactly, on all devices.

Each step runs `forward_fn` and every analysis' `partial_sums` (the protocol of
`clmim.analysis.core`) inside one jit-compiled function,
mapped over a 1-D 'data' mesh with `jax.shard_map` (params replicated, batch split); devices are
combined with `psum`. Every batch is padded to one fixed global batch size (zeros, weight 0), so
there is a single compilation and padding cannot change the result. The host adds the returned
sums in float64 and each analysis divides once, in `finalize`: the result is the exact mean over
the images, independent of batch size and device count, and memory does not grow with the data.
Sums too large to bring to the host every step (e.g. cka's cross-moments, 107 M numbers per
ViT-B/16 step) are added on the devices instead, as compensated float32 pairs (`RunningSums`).

Typical use:

  analyzer = Analyzer(forward_fn, [attention_distance, nmi, fourier], patch_size=16)
  results = analyzer.run(params, batches)   # {"attention_distance": ..., "num_images": ...}

Several processes (multi-host): every process must run the same number of steps, each feeding
its own devices. `plan(num_images)` says which images this process feeds at which step: step k
covers images [k*G, (k+1)*G) of the global order (G = device_batch_size x all devices), and
image k*G + j*device_batch_size + r goes to the j-th device of the mesh, whichever process owns
it, so every image meets the same compiled computation on the same mesh position as in a
one-process run. Slots past the last image are padding (weight 0).

  plan = analyzer.plan(len(images))
  batches = images.load_batches(plan.local_indices, analyzer.local_batch_size)
  results = analyzer.run(params, batches, plan=plan)
"""
import dataclasses
import functools
import time

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import tqdm

from clmim.analysis import bootstrap, core
from clmim.errors import ClmimError

_COUNT = "__num_images__"
_FOLDS = "__folds__"
PAD = -1  # a slot of the plan that holds no image (the same value as clmim.data.loader.PAD)
# Sums with at least this many numbers stay on the devices between steps. Bringing cka's
# cross-moments of a ViT-B/16 (2 x 54 M float32) to the host and adding them in float64 took
# ~0.7 s per step, on a CPU and behind an H100 alike: 10x the H100's whole analysis step.
DEVICE_SUM_MIN_SIZE = 1 << 20


@jax.jit
def _start_pair(x):
  return x, jax.numpy.zeros_like(x)


@functools.partial(jax.jit, donate_argnums=(0,))
def _two_sum_add(pair, x):
  """(s, c) + x, elementwise, by Knuth's TwoSum: c collects what each float32 addition rounds
  away, so s + c keeps the running total to ~1e-10 relative over thousands of steps (float32
  alone drops everything below ~6e-8 of the total at every step)."""
  total, compensation = pair
  new_total = total + x
  x_part = new_total - total
  error = (total - (new_total - x_part)) + (x - x_part)
  return new_total, compensation + error


class RunningSums:
  """The sum of every step's output pytree: small leaves in float64 on the host (one transfer
  per step), leaves of >= DEVICE_SUM_MIN_SIZE numbers on the devices (`_two_sum_add`), brought
  to the host once, by `result`."""

  def __init__(self):
    self._treedef, self._large, self._host, self._device = None, None, None, None

  def add(self, out) -> None:
    """Adds one step's outputs (a pytree of jax arrays, the same structure every step)."""
    leaves, treedef = jax.tree.flatten(out)
    if self._treedef is None:
      self._treedef = treedef
      self._large = [x.size >= DEVICE_SUM_MIN_SIZE for x in leaves]
    small = jax.device_get([x for x, large in zip(leaves, self._large) if not large])
    small = [np.asarray(x, np.float64) for x in small]
    large = [x for x, is_large in zip(leaves, self._large) if is_large]
    if self._host is None:
      self._host, self._device = small, [_start_pair(x) for x in large]
    else:
      self._host = [a + b for a, b in zip(self._host, small)]
      self._device = [_two_sum_add(pair, x) for pair, x in zip(self._device, large)]

  def result(self):
    """The float64 totals in the steps' pytree structure (None before the first step)."""
    if self._treedef is None:
      return None
    host = iter(self._host)
    device = iter(np.asarray(s, np.float64) + np.asarray(c, np.float64)
                  for s, c in jax.device_get(self._device))
    return jax.tree.unflatten(self._treedef,
                              [next(device) if large else next(host) for large in self._large])


@dataclasses.dataclass(frozen=True)
class Plan:
  """This process's share of an exact pass over `num_images` images (see the module doc).

  Attributes:
    num_images: images over all processes.
    num_steps: steps every process runs (at least 1).
    global_batch: images per step over all devices.
    local_indices: int64 [num_steps * local batch]: the image each of this process's slots
      holds, step-major, PAD (-1) for padding.
  """
  num_images: int
  num_steps: int
  global_batch: int
  local_indices: np.ndarray

  def images_in_step(self, step: int) -> int:
    """Real images (all processes) in step `step`: the progress bar counts these."""
    return max(0, min(self.global_batch, self.num_images - step * self.global_batch))


def make_mesh(devices=None):
  """A 1-D mesh with axis 'data' over `devices` (default: all devices)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ClmimError("make_mesh: got an empty list of devices.")
  return jax.sharding.Mesh(np.array(devices), ("data",))


def _as_images_and_weights(batch):
  """Accepts `images` or `(images, weights)`; returns float32 numpy arrays [b, H, W, C], [b]."""
  if isinstance(batch, (tuple, list)):
    if len(batch) != 2:
      raise ClmimError(f"a batch must be images or (images, weights); got a {type(batch).__name__}"
                       f" of length {len(batch)}.")
    images, weights = batch
  else:
    images, weights = batch, None
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ClmimError(f"images must be [batch, height, width, channels]; got shape {images.shape}.")
  if weights is None:
    weights = np.ones(images.shape[0], np.float32)
  weights = np.asarray(weights, np.float32)
  if weights.shape != images.shape[:1]:
    raise ClmimError(f"weights must have shape [{images.shape[0]}] to match the images; "
                     f"got {weights.shape}.")
  return images, weights


def _label_table(labels):
  """The `labels` argument of `Analyzer.run` as int32 [n, K] (K = 0 when None)."""
  if labels is None:
    return np.zeros((0, 0), np.int32)
  table = np.asarray(labels)
  if table.ndim == 1:
    table = table[:, None]
  if table.ndim != 2 or not np.issubdtype(table.dtype, np.integer):
    raise ClmimError(f"Analyzer.run: labels must be an integer table [num_images, K]; got "
                     f"{table.dtype} of shape {table.shape}.")
  return table.astype(np.int32)


def _label_rows(table, index):
  """Rows of `table` at the stream positions `index` (-1 rows for padding, index -1)."""
  rows = np.full((len(index), table.shape[1]), PAD, np.int32)
  real = index != PAD
  if table.shape[1] and real.any():
    if index[real].max() >= len(table):
      raise ClmimError(f"Analyzer.run: image {int(index[real].max())} has no row in the labels "
                       f"table of {len(table)} rows.")
    rows[real] = table[index[real]]
  return rows


class Analyzer:
  """Runs several analyses over a stream of image batches in one sharded pass per batch."""

  def __init__(self, forward_fn, analyses, patch_size, mesh=None, device_batch_size=8,
               options=None, model=None, folds=0, layout=None):
    """Builds (but does not yet compile) the sharded step.

    Args:
      forward_fn: `forward_fn(params, images[B, H, W, 3] float32) -> (zs, attns)`, or
        `(zs, attns, decoder_zs, decoder_attns)` for a model run with its decoder; see
        `clmim.analysis.core.Batch` for the shapes.
      analyses: analysis modules (`clmim.analysis.core` protocol).
      patch_size: patch side in pixels (attention distances are reported in pixels).
      mesh: a 1-D mesh with axis 'data'; default `make_mesh()` over all devices.
      device_batch_size: images per device per step (the compiled batch); incoming batches of
        any size are re-cut to it. Results do not depend on the incoming batch sizes nor on the
        device count; changing device_batch_size itself changes float32 rounding (~1e-6).
      options: {analysis name: {option: value}}, merged over each module's OPTIONS.
      model: the model `forward_fn` runs (a registry model or a bare ViT), optional. When given,
        each analysis' own `check` runs on it here with the resolved options (e.g. `decoder`
        refuses a model without a decoder), so a mismatch is one ClmimError before anything
        compiles; without it the checks are the caller's (the analysis jobs run them).
      folds: G >= 2 to also keep every analysis' sums per fold of images (image i in fold
        i mod G; `clmim.analysis.bootstrap`), for bootstrap intervals; 0 = no folds. After a
        run, `fold_sums` and `totals` hold them (`unfolded` names the analyses left out, why).
      layout: the states' `core.TokenLayout` (cls, registers, patches); default: that of
        `model`'s ViT when given, else the paper's (cls at 0, then the patches).

    The step is compiled once per Analyzer (on the first `run`) and reused for every `run`,
    also with other params of the same structure: models of one architecture share it.
    `compilations` counts the traces, `compile_seconds` the wall time of the steps that compiled
    (tracing, compilation and that first step).
    """
    if device_batch_size < 1:
      raise ClmimError(f"Analyzer: device_batch_size must be >= 1, got {device_batch_size}.")
    self.device_batch_size = int(device_batch_size)
    if not analyses:
      raise ClmimError("Analyzer: no analyses given.")
    names = []
    for a in analyses:
      if not all(hasattr(a, attr) for attr in ("NAME", "partial_sums", "finalize")):
        raise ClmimError(f"Analyzer: {a!r} is not an analysis module (needs NAME, partial_sums, "
                         "finalize).")
      names.append(a.NAME)
    if len(set(names)) != len(names):
      raise ClmimError(f"Analyzer: analysis names must be unique; got {names}.")
    self.analyses = list(analyses)
    bootstrap.check_settings(folds, 1000, 0, where="Analyzer")
    self.folds = int(folds)
    self.fold_sums, self.totals, self.unfolded = {}, {}, {}
    self.options = {a.NAME: core.resolve_options(a, (options or {}).get(a.NAME))
                    for a in self.analyses}
    if model is not None:
      for a in self.analyses:
        if hasattr(a, "check"):
          try:
            a.check(model, self.options[a.NAME])
          except ClmimError as e:
            raise ClmimError(f"Analyzer: analysis {a.NAME!r}: {e}") from None
    self.patch_size = patch_size
    if layout is None:
      layout = core.TokenLayout.of(getattr(model, "vit", model)) if model is not None \
          else core.TokenLayout()
    self.layout = layout
    self.compilations = 0
    self.compile_seconds = 0.0  # wall time of the steps that traced and compiled
    self.mesh = make_mesh() if mesh is None else mesh
    if self.mesh.axis_names != ("data",):
      raise ClmimError(f"Analyzer: the mesh must be 1-D with axis 'data'; got axes "
                       f"{self.mesh.axis_names}.")
    # Each process feeds the devices it owns; the global batch is spread over all of them.
    self._local_devices = sum(d.process_index == jax.process_index()
                              for d in self.mesh.devices.flat)
    self._batch_sharding = NamedSharding(self.mesh, P("data"))
    self._replicated = NamedSharding(self.mesh, P())

    def local_step(params, context, images, weights, index, labels):
      self.compilations += 1  # runs when traced, not per step
      # A forward that masks per image (the decoder fed as in pretraining) needs each image's
      # stream position: it says so with `takes_index`.
      takes_index = getattr(forward_fn, "takes_index", False)
      run = (lambda x: forward_fn(params, x, index)) if takes_index else \
          (lambda x: forward_fn(params, x))
      states = tuple(run(images))
      if len(states) not in (2, 4):
        raise ClmimError(f"Analyzer: forward_fn must return (zs, attns) or (zs, attns, "
                         f"decoder_zs, decoder_attns); got {len(states)} values.")
      batch = core.Batch(states[0], states[1], weights, index, patch_size, *states[2:],
                         images=images, labels=labels, context=context,
                         forward=lambda x: tuple(run(x)), layout=layout)
      sums = {a.NAME: core.sums_of(a, batch, self.options[a.NAME]) for a in self.analyses}
      if self.folds:
        sums[_FOLDS] = self._fold_sums(batch, sums)
      sums[_COUNT] = (weights > 0).sum().astype(np.float32)
      return jax.lax.psum(sums, "data")

    # Built once, so repeated `run` calls (and new params of the same structure) reuse the jit.
    self._step = jax.jit(jax.shard_map(
        local_step, mesh=self.mesh,
        in_specs=(P(), P(), P("data"), P("data"), P("data"), P("data")), out_specs=P()))

  def _fold_sums(self, batch, sums) -> dict:
    """{analysis: its sums (less FIXED_SUMS) per fold, [G, ...]}, traced inside the step.

    The analyses apply the weights last (`weighted_sum`), so vmapping `partial_sums` over the
    folds' weight rows batches only those sums: the forward and the per-image work are shared.
    """
    weights = bootstrap.fold_weights(batch.weights, batch.index, self.folds)
    out = {}
    for a in self.analyses:
      fixed = bootstrap.fixed_sums(a)
      size = sum(int(np.prod(x.shape)) for k, v in sums[a.NAME].items() if k not in fixed
                 for x in jax.tree.leaves(v))
      if not bootstrap.resampled(a):
        self.unfolded[a.NAME] = "its statistic is not a mean over the images"
        continue
      if size * self.folds > bootstrap.MAX_FOLDED_NUMBERS:
        self.unfolded[a.NAME] = (f"{size} x {self.folds} fold sums exceed "
                                 f"{bootstrap.MAX_FOLDED_NUMBERS}")
        continue

      def per_fold(w, a=a, fixed=fixed):
        folded = dataclasses.replace(batch, weights=w)
        return {k: v for k, v in core.sums_of(a, folded, self.options[a.NAME]).items()
                if k not in fixed}
      out[a.NAME] = jax.vmap(per_fold)(weights)
    return out

  def replicate_curves(self, draws) -> dict:
    """{result key: [R, positions]} of the last run's curves in each bootstrap replicate (one
    row of `draws`, fold counts), for the analyses that were resampled. A replicate whose
    finalize fails (e.g. no image of a class drawn) is a row of NaN."""
    out = {}
    for a in self.analyses:
      if a.NAME not in self.fold_sums:
        continue
      outputs = []
      for sums in bootstrap.each_replicate(self.fold_sums[a.NAME], self.totals[a.NAME], draws):
        try:
          outputs.append(a.finalize(sums, self.options[a.NAME]))
        except (ClmimError, ArithmeticError, ValueError):
          outputs.append({})
      out.update(bootstrap.curves(a, outputs))
    return out

  @property
  def local_batch_size(self) -> int:
    """Images this process feeds per step (device_batch_size x its devices in the mesh)."""
    return self.device_batch_size * self._local_devices

  @property
  def global_batch_size(self) -> int:
    """Images per step over all devices."""
    return self.device_batch_size * self.mesh.devices.size

  def plan(self, num_images: int) -> Plan:
    """Which of `num_images` images (in their global order) this process feeds at each step."""
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) \
        or num_images < 1:
      raise ClmimError(f"Analyzer.plan: expected a positive number of images, got "
                       f"{num_images!r}.")
    devices = list(self.mesh.devices.flat)
    size, global_batch = self.device_batch_size, self.global_batch_size
    steps = -(-int(num_images) // global_batch)
    mine = np.array([j for j, d in enumerate(devices) if d.process_index == jax.process_index()])
    if not len(mine):
      raise ClmimError(f"Analyzer.plan: process {jax.process_index()} owns no device of the "
                       "mesh; every process must feed at least one device.")
    slots = (np.arange(steps)[:, None, None] * global_batch + mine[None, :, None] * size
             + np.arange(size)[None, None, :]).reshape(-1)
    local = np.where(slots < num_images, slots, PAD).astype(np.int64)
    return Plan(int(num_images), steps, global_batch, local)

  def _chunks(self, batches, num_images, plan=None, labels=None):
    """Re-cuts the stream into (images, weights, index, labels) pieces of exactly the fixed local
    batch.

    Every device always sees `device_batch_size` images, whatever the incoming batch sizes and
    device count, so each image goes through the same compiled computation: that is what makes
    results independent of batching (a matmul rounds differently for different batch shapes).
    `index` is each image's position in the stream (the plan's slots, or the count of real
    images so far), -1 for padding; `labels` [piece, K] are the rows of the `labels` table at
    those positions (-1 for padding). Only the last piece is short; `_put` pads it.
    """
    seen, real_seen, slots, buffer, buffered = 0, 0, 0, [], 0
    local_batch = self.local_batch_size
    self._image_shape = None
    for batch in batches:
      images, weights = _as_images_and_weights(batch)
      if num_images is not None:
        keep = max(0, min(len(images), num_images - seen))
        images, weights = images[:keep], weights[:keep]
      if not len(images):
        if num_images is not None and seen >= num_images:
          break
        continue
      if self._image_shape is None:
        self._image_shape = images.shape[1:]
      if images.shape[1:] != self._image_shape:
        raise ClmimError(f"all images must have shape {self._image_shape}; got a batch of "
                         f"{images.shape[1:]}.")
      if plan is not None:
        index = plan.local_indices[slots:slots + len(images)].astype(np.int32)
        if len(index) < len(images):
          raise ClmimError(f"Analyzer.run: the batches hold more images than the plan's "
                           f"{len(plan.local_indices)} slots.")
        index = np.where(weights > 0, index, PAD).astype(np.int32)
      else:
        real = weights > 0
        index = np.where(real, real_seen + np.cumsum(real) - 1, PAD).astype(np.int32)
        real_seen += int(real.sum())
      seen += len(images)
      slots += len(images)
      buffer.append((images, weights, index, _label_rows(labels, index)))
      buffered += len(images)
      while buffered >= local_batch:
        parts = [np.concatenate([b[i] for b in buffer]) for i in range(4)]
        yield tuple(p[:local_batch] for p in parts)
        buffer = [tuple(p[local_batch:] for p in parts)]
        buffered -= local_batch
    if buffered:
      yield tuple(np.concatenate([b[i] for b in buffer]) for i in range(4))

  def _put(self, images, weights, index, labels):
    """Pads one piece to the fixed local batch (zeros, weight 0, index and labels -1) and
    shards it."""
    pad = self.local_batch_size - len(images)
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      weights = np.concatenate([weights, np.zeros(pad, weights.dtype)])
      index = np.concatenate([index, np.full(pad, PAD, np.int32)])
      labels = np.concatenate([labels, np.full((pad,) + labels.shape[1:], PAD, np.int32)])
    put = jax.make_array_from_process_local_data
    return tuple(put(self._batch_sharding, x) for x in (images, weights, index, labels))

  def run(self, params, batches, num_images=None, progress=True, plan=None, desc="analysis",
          labels=None, context=None):
    """Analyses every image of `batches` and returns the merged results.

    Args:
      params: model parameters, passed to `forward_fn` (replicated on every device).
      batches: iterable of float32 numpy images [b, H, W, 3] (sizes may vary; the first sets the
        compiled batch size and larger ones are split) or of `(images, weights)` tuples, where
        weight 0 marks padding that must not count. With `plan`: this process's images, exactly
        those of `plan.local_indices`, in that order.
      num_images: if given, only the first `num_images` images are used; also the progress total.
        Not used with `plan` (the plan knows the total).
      progress: show a tqdm progress bar (images/s, over all processes) on process 0.
      plan: from `self.plan(...)`; required when there are several processes, so that every
        process runs the same number of steps.
      desc: the progress bar's label (the model's name in the analysis job).
      labels: optional int table [num_images, K] (or [num_images]) indexed by the image's
        position in the stream (the plan's global order): each image's row reaches the analyses
        as `Batch.labels` (-1 = no label; padding gets -1). Default: K = 0 columns.
      context: optional pytree of arrays, replicated on every device, that the analyses read as
        `Batch.context` (e.g. a fitted probe's weights). Its shapes are part of the compiled
        step: a new shape compiles again, new values of the same shape do not.

    Returns:
      The union of every analysis' `finalize` dict, plus "num_images" (images with weight > 0,
      over all processes).
    """
    if plan is None and jax.process_count() > 1:
      raise ClmimError("Analyzer.run: with several processes, pass plan=analyzer.plan(n) and "
                       "feed each process the images of plan.local_indices.")
    if plan is not None:
      num_images = None
    # Works across processes too: every process holds the same params (same file, same seed).
    params = jax.device_put(params, self._replicated)
    context = jax.device_put({} if context is None else context, self._replicated)
    labels = _label_table(labels)
    sums = RunningSums()
    bar = tqdm.tqdm(total=plan.num_images if plan is not None else num_images, unit="img",
                    desc=desc, disable=not progress or jax.process_index() != 0)

    pending = None  # keep one step in flight so the host work overlaps the device work
    steps = 0
    try:
      for images, weights, index, rows in self._chunks(batches, num_images, plan, labels):
        if plan is not None and steps == plan.num_steps:
          raise ClmimError(f"Analyzer.run: the batches hold more than the plan's "
                           f"{plan.num_steps} steps.")
        traced = self.compilations
        started = time.perf_counter()
        out = self._step(params, context, *self._put(images, weights, index, rows))
        if self.compilations > traced:  # this call compiled: time it to the end of its step
          jax.block_until_ready(out)
          self.compile_seconds += time.perf_counter() - started
        if pending is not None:
          sums.add(pending)
        pending = out
        bar.update(plan.images_in_step(steps) if plan is not None else int((weights > 0).sum()))
        steps += 1
      if pending is not None:
        sums.add(pending)
    finally:
      bar.close()  # an error message then starts on a line of its own
    if plan is not None and steps != plan.num_steps:
      # The other processes would wait for this one forever in the next collective.
      raise ClmimError(f"Analyzer.run: the batches ended after {steps} of the plan's "
                       f"{plan.num_steps} steps.")
    totals = sums.result()
    if totals is None or totals[_COUNT] <= 0:
      raise ClmimError("Analyzer.run: no images to analyse (empty stream or all weights 0).")
    self.totals = {a.NAME: totals[a.NAME] for a in self.analyses}
    self.fold_sums = totals.get(_FOLDS, {})
    results = {}
    for a in self.analyses:
      results.update(a.finalize(totals[a.NAME], self.options[a.NAME]))
    results["num_images"] = int(round(float(totals[_COUNT])))
    return results
