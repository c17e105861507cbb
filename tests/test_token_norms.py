"""token_norms: known answers on constructed states, any layout, and batching invariance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analysis_testing import finalize, partial_sums, run_stream, small_vit
from clmim.analysis import core, token_norms
from clmim.errors import ClmimError


def _states(prefix, patches=16, width=8, images=3, long_token=5, scale=10.0):
  """zs [embedding, after-attn, after-mlp]: every token a unit vector but patch `long_token`,
  `scale` long; prefix tokens 2.0 long."""
  rng = np.random.default_rng(0)
  z = rng.normal(size=(images, prefix + patches, width))
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  z[:, :prefix] *= 2.0
  z[:, prefix + long_token] *= scale
  z = jnp.asarray(z, jnp.float32)
  return [z, z, z]


def _uniform_attention(tokens, images=3, heads=2):
  return [jnp.full((images, heads, tokens, tokens), 1.0 / tokens, jnp.float32)]


@pytest.mark.parametrize("layout", [core.TokenLayout(1, True), core.TokenLayout(3, True),
                                    core.TokenLayout(0, False), core.TokenLayout(2, False)])
def test_known_answers_on_every_layout(layout):
  zs = _states(layout.prefix)
  tokens = zs[0].shape[1]
  got = finalize(token_norms, partial_sums(token_norms, zs, _uniform_attention(tokens),
                                           np.ones(3), layout=layout))
  np.testing.assert_allclose(got["token_norm_patches"], [(15 + 10) / 16] * 2, rtol=1e-6)
  np.testing.assert_allclose(got["high_norm_fraction"], [1 / 16] * 2, rtol=1e-6)
  np.testing.assert_allclose(got["high_norm_peak"], [10.0] * 2, rtol=1e-5)
  # Uniform attention: each key gets 1/T of every patch query's mass.
  np.testing.assert_allclose(got["attention_to_high_norm"], [[1 / tokens] * 2], rtol=1e-6)
  if layout.has_cls:
    np.testing.assert_allclose(got["token_norm_cls"], [2.0] * 2, rtol=1e-6)
    np.testing.assert_allclose(got["attention_to_cls"], [[1 / tokens] * 2], rtol=1e-6)
  else:
    assert got["token_norm_cls"] is None and got["attention_to_cls"] is None
  if layout.num_registers:
    np.testing.assert_allclose(got["token_norm_registers"], [2.0] * 2, rtol=1e-6)
    np.testing.assert_allclose(got["attention_to_registers"],
                               [[layout.num_registers / tokens] * 2], rtol=1e-6)
  else:
    assert got["token_norm_registers"] is None and got["attention_to_registers"] is None


def test_the_ratio_decides_what_is_high_norm():
  zs = _states(1, scale=3.0)
  attns = _uniform_attention(zs[0].shape[1])
  low = finalize(token_norms, partial_sums(token_norms, zs, attns, np.ones(3)))
  high = finalize(token_norms, partial_sums(token_norms, zs, attns, np.ones(3),
                                            options={"ratio": 2.0}))
  assert low["high_norm_fraction"] == [0.0, 0.0]
  np.testing.assert_allclose(high["high_norm_fraction"], [1 / 16] * 2, rtol=1e-6)


def test_padding_counts_nothing():
  zs, attns = _states(1), _uniform_attention(17)
  padded = [jnp.concatenate([z, jnp.full_like(z[:1], jnp.nan)]) for z in zs]
  padded_attns = [jnp.concatenate([a, a[:1]]) for a in attns]
  full = finalize(token_norms, partial_sums(token_norms, zs, attns, np.ones(3)))
  with_pad = finalize(token_norms, partial_sums(token_norms, padded, padded_attns,
                                                np.array([1, 1, 1, 0.0])))
  assert full == with_pad


def test_bad_ratio_is_one_clear_error():
  with pytest.raises(ClmimError, match="token_norms.ratio: expected a number > 1"):
    token_norms.check(None, {"ratio": 0.5})


@pytest.mark.slow
def test_same_result_for_any_batching_and_device_count():
  setup = small_vit()
  a = run_stream(setup, [token_norms], batch_size=70, devices=8)
  b = run_stream(setup, [token_norms], batch_size=9, devices=1, device_batch_size=3)
  assert a["high_norm_peak"] is not None and a["token_norm_registers"] is None
  for key, value in a.items():
    if value is None:
      assert b[key] is None
    elif key != "num_images":
      np.testing.assert_allclose(np.asarray(b[key], float), np.asarray(value, float), rtol=2e-5,
                                 atol=1e-7, err_msg=key)
