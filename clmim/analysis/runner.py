"""Streams image batches through a model and the analyses, exactly, on all devices.

Each step runs `forward_fn` and every analysis' `batch_sums` inside one jit-compiled function,
mapped over a 1-D 'data' mesh with `jax.shard_map` (params replicated, batch split); devices are
combined with `psum`. Every batch is padded to one fixed global batch size (zeros, weight 0), so
there is a single compilation and padding cannot change the result. The host adds the returned
sums in float64 and each analysis divides once, in `finalize`: the result is the exact mean over
the images, independent of batch size and device count, and memory does not grow with the data.

Typical use:

  analyzer = Analyzer(forward_fn, [attention_distance, nmi, fourier], patch_size=16)
  results = analyzer.run(params, batches)   # {"attention_distance": ..., "num_images": ...}
"""
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import tqdm

from clmim.errors import ClmimError

_COUNT = "__num_images__"


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


class Analyzer:
  """Runs several analyses over a stream of image batches in one sharded pass per batch."""

  def __init__(self, forward_fn, analyses, patch_size, mesh=None, device_batch_size=8):
    """Builds (but does not yet compile) the sharded step.

    Args:
      forward_fn: `forward_fn(params, images[B, H, W, 3] float32) -> (zs, attns)`; see
        `clmim.analysis` metric modules for the shapes.
      analyses: metric modules, each with `NAME`, `batch_sums` and `finalize`.
      patch_size: patch side in pixels (attention distances are reported in pixels).
      mesh: a 1-D mesh with axis 'data'; default `make_mesh()` over all devices.
      device_batch_size: images per device per step (the compiled batch); incoming batches of
        any size are re-cut to it. Results do not depend on the incoming batch sizes nor on the
        device count; changing device_batch_size itself changes float32 rounding (~1e-6).
    """
    if device_batch_size < 1:
      raise ClmimError(f"Analyzer: device_batch_size must be >= 1, got {device_batch_size}.")
    self.device_batch_size = int(device_batch_size)
    if not analyses:
      raise ClmimError("Analyzer: no analyses given.")
    names = []
    for a in analyses:
      if not all(hasattr(a, attr) for attr in ("NAME", "batch_sums", "finalize")):
        raise ClmimError(f"Analyzer: {a!r} is not an analysis module (needs NAME, batch_sums, "
                         "finalize).")
      names.append(a.NAME)
    if len(set(names)) != len(names):
      raise ClmimError(f"Analyzer: analysis names must be unique; got {names}.")
    self.analyses = list(analyses)
    self.patch_size = patch_size
    self.mesh = make_mesh() if mesh is None else mesh
    if self.mesh.axis_names != ("data",):
      raise ClmimError(f"Analyzer: the mesh must be 1-D with axis 'data'; got axes "
                       f"{self.mesh.axis_names}.")
    # Each process feeds the devices it owns; the global batch is spread over all of them.
    self._local_devices = sum(d.process_index == jax.process_index()
                              for d in self.mesh.devices.flat)
    self._batch_sharding = NamedSharding(self.mesh, P("data"))
    self._replicated = NamedSharding(self.mesh, P())

    def local_step(params, images, weights):
      zs, attns = forward_fn(params, images)
      sums = {a.NAME: a.batch_sums(zs, attns, weights, patch_size) for a in self.analyses}
      sums[_COUNT] = (weights > 0).sum().astype(np.float32)
      return jax.lax.psum(sums, "data")

    # Built once, so repeated `run` calls (and new params of the same structure) reuse the jit.
    self._step = jax.jit(jax.shard_map(
        local_step, mesh=self.mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()))

  def _chunks(self, batches, num_images):
    """Re-cuts the stream into (images, weights) pieces of exactly the fixed local batch.

    Every device always sees `device_batch_size` images, whatever the incoming batch sizes and
    device count, so each image goes through the same compiled computation: that is what makes
    results independent of batching (a matmul rounds differently for different batch shapes).
    Only the last piece is short; `_put` pads it.
    """
    seen, buffer, buffered = 0, [], 0
    local_batch = self.device_batch_size * self._local_devices
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
      seen += len(images)
      buffer.append((images, weights))
      buffered += len(images)
      while buffered >= local_batch:
        images = np.concatenate([b[0] for b in buffer])
        weights = np.concatenate([b[1] for b in buffer])
        yield images[:local_batch], weights[:local_batch]
        buffer = [(images[local_batch:], weights[local_batch:])]
        buffered -= local_batch
    if buffered:
      yield np.concatenate([b[0] for b in buffer]), np.concatenate([b[1] for b in buffer])

  def _put(self, images, weights):
    """Pads one piece to the fixed local batch (zeros, weight 0) and shards it over the mesh."""
    pad = self.device_batch_size * self._local_devices - len(images)
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      weights = np.concatenate([weights, np.zeros(pad, weights.dtype)])
    put = jax.make_array_from_process_local_data
    return put(self._batch_sharding, images), put(self._batch_sharding, weights)

  def run(self, params, batches, num_images=None, progress=True):
    """Analyses every image of `batches` and returns the merged results.

    Args:
      params: model parameters, passed to `forward_fn` (replicated on every device).
      batches: iterable of float32 numpy images [b, H, W, 3] (sizes may vary; the first sets the
        compiled batch size and larger ones are split) or of `(images, weights)` tuples, where
        weight 0 marks padding that must not count.
      num_images: if given, only the first `num_images` images are used; also the progress total.
      progress: show a tqdm progress bar (images/s) on process 0.

    Returns:
      The union of every analysis' `finalize` dict, plus "num_images" (images with weight > 0,
      over all processes).
    """
    params = jax.device_put(params, self._replicated)
    totals = {a.NAME: None for a in self.analyses}
    totals[_COUNT] = None
    bar = tqdm.tqdm(total=num_images, unit="img", desc="analysis",
                    disable=not progress or jax.process_index() != 0)

    def accumulate(out):
      # float64 on the host: many float32 partial sums are added without drift.
      out = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(out))
      for name, sums in out.items():
        totals[name] = sums if totals[name] is None else jax.tree.map(np.add, totals[name], sums)

    pending = None  # keep one step in flight so the host work overlaps the device work
    try:
      for images, weights in self._chunks(batches, num_images):
        out = self._step(params, *self._put(images, weights))
        if pending is not None:
          accumulate(pending)
        pending = out
        bar.update(int((weights > 0).sum()))
      if pending is not None:
        accumulate(pending)
    finally:
      bar.close()  # an error message then starts on a line of its own
    if totals[_COUNT] is None or totals[_COUNT] <= 0:
      raise ClmimError("Analyzer.run: no images to analyse (empty stream or all weights 0).")
    results = {}
    for a in self.analyses:
      results.update(a.finalize(totals[a.NAME]))
    results["num_images"] = int(round(float(totals[_COUNT])))
    return results
