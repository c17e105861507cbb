"""Calling an analysis module's `partial_sums` outside the runner, for known-answer tests."""
import jax.numpy as jnp
import numpy as np

from clmim.analysis import core


def partial_sums(module, zs, attns, weights, patch_size=4, index=None, options=None):
  """`module.partial_sums` on one batch: zs/attns may be None (an analysis that does not read
  them); index defaults to 0..b-1 for real images and -1 for weight-0 ones; options default to
  the module's OPTIONS."""
  weights = jnp.asarray(weights, jnp.float32)  # may be a tracer (called under jit)
  if index is None:
    index = jnp.where(weights > 0, jnp.arange(weights.shape[0]), -1).astype(jnp.int32)
  batch = core.Batch(zs or [], attns or [], weights, index, patch_size)
  return module.partial_sums(batch, core.resolve_options(module, options))


def finalize(module, sums, options=None):
  """`module.finalize` with float64 sums and the module's options."""
  sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  return module.finalize(sums, core.resolve_options(module, options))
