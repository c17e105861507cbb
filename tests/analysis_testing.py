"""Calling an analysis module's `partial_sums` outside the runner, for known-answer tests."""
import jax.numpy as jnp
import numpy as np

from clmim.analysis import core


def partial_sums(module, zs, attns, weights, patch_size=4, index=None, options=None,
                 layout=core.TokenLayout()):
  """`module.partial_sums` on one batch, with the image count the runner adds
  (`core.sums_of`): zs/attns may be None (an analysis that does not read
  them); index defaults to 0..b-1 for real images and -1 for weight-0 ones; options default to
  the module's OPTIONS; `layout` is the states' token layout (default: cls, then patches)."""
  weights = jnp.asarray(weights, jnp.float32)  # may be a tracer (called under jit)
  if index is None:
    index = jnp.where(weights > 0, jnp.arange(weights.shape[0]), -1).astype(jnp.int32)
  batch = core.Batch(zs or [], attns or [], weights, index, patch_size, layout=layout)
  return core.sums_of(module, batch, core.resolve_options(module, options))


def finalize(module, sums, options=None):
  """`module.finalize` with float64 sums and the module's options."""
  sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  return module.finalize(sums, core.resolve_options(module, options))


def small_vit():
  """(forward, params, images): a depth-2 BEiT-style mu/4 ViT at 16 px whose matrices are scaled
  by 3 (so attention is far from uniform), and 70 held-out procedural images in [-1, 1] — the
  real model the invariance tests stream through the runner."""
  import functools
  import jax
  from clmim.data.synthetic import ShapesTextures
  from clmim.models.vit import build_vit, forward_with_states
  model = build_vit("mu/4", image_size=16, depth=2, block_style="beit", position_embedding="none",
                    rel_pos_bias="shared", layer_scale_init=0.1)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
  images = ShapesTextures(16, "validation", 70).batch(range(70))["image"] * 2 - 1
  return functools.partial(forward_with_states, model), params, images


def run_stream(setup, modules, batch_size, devices=8, device_batch_size=4, options=None):
  """Streams `setup`'s images in batches of `batch_size` through a runner on `devices`."""
  import jax
  from clmim.analysis import runner
  forward, params, images = setup
  mesh = runner.make_mesh(jax.devices()[:devices])
  analyzer = runner.Analyzer(forward, modules, 4, mesh=mesh,
                             device_batch_size=device_batch_size, options=options)
  batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
  return analyzer.run(params, batches, progress=False)
