"""Small randomly initialised clmim checkpoints for tests (the runlocal pretraining configs:
depth 2, 32 px images)."""
import jax
import jax.numpy as jnp

from clmim.checkpoints import native
from clmim.models.vit import vit_fields
from clmim.train.common import build_encoder


def save_random_checkpoint(path, config_module, seed=0, steps=0, weight_scale=1.0, **kwargs):
  """Writes a random encoder of `config_module.get_config("runlocal")` to `path`; returns params.

  weight_scale > 1 multiplies every matrix, which makes attention far from uniform.
  """
  config = config_module.get_config("runlocal")
  encoder = build_encoder(config)
  params = encoder.init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)))["params"]
  params = jax.tree.map(lambda x: x * weight_scale if x.ndim == 2 else x, params)
  native.save(str(path), config, jax.device_get(params), vit_fields(encoder), steps=steps,
              **kwargs)
  return params
