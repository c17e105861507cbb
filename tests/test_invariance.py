"""Exactness on a real ViT: the same numbers for any batching, padding and device count."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clmim.analysis import attention_distance, fourier, nmi, runner
from clmim.data.synthetic import ShapesTextures
from clmim.models.vit import build_vit, forward_with_states

ANALYSES = [attention_distance, nmi, fourier]


@pytest.fixture(scope="module")
def setup():
  model = build_vit("mu/4", image_size=16, depth=2, block_style="beit", position_embedding="none",
                    rel_pos_bias="shared", layer_scale_init=0.1)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  # Larger random weights than the init so the attention is far from uniform.
  params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
  images = ShapesTextures(16, "validation", 70).batch(range(70))["image"] * 2 - 1
  forward = functools.partial(forward_with_states, model)
  return forward, params, images


def _run(setup, batch_size, devices=8, device_batch_size=4):
  forward, params, images = setup
  mesh = runner.make_mesh(jax.devices()[:devices])
  analyzer = runner.Analyzer(forward, ANALYSES, 4, mesh=mesh, device_batch_size=device_batch_size)
  batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
  return analyzer.run(params, batches, progress=False)


@pytest.fixture(scope="module")
def reference(setup):
  return _run(setup, 64)


def _assert_same(got, want, rtol=1e-6):
  for key in ("attention_distance", "nmi", "attention_entropy", "fourier", "fourier_all_states"):
    np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=1e-7, err_msg=key)
  assert got["num_images"] == want["num_images"] == 70


@pytest.mark.parametrize("batch_size", [1, 7])
def test_vit_batch_size_invariance(setup, reference, batch_size):
  _assert_same(_run(setup, batch_size), reference)


def test_vit_one_vs_eight_devices(setup, reference):
  _assert_same(_run(setup, 7, devices=1, device_batch_size=4), reference)


def test_attention_is_not_trivial(reference):
  # Guards the invariance tests above against comparing uniform attention with itself.
  entropy = np.asarray(reference["attention_entropy"])
  assert entropy.min() < 0.9
