"""The ViT: parameter layout, sown states, position tables, variants."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clmim.errors import ClmimError
from clmim.models import vit as vit_lib


def _count(model, size):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_vit_b16_parameter_counts_match_the_official_encoders():
  # docs/checkpoints.md: timm-style ViT-B/16 (pos_embed included, no head) and SimMIM/BEiT-style.
  timm = vit_lib.build_vit("B/16", image_size=224)
  beit = vit_lib.build_vit("B/16", image_size=224, block_style="beit", position_embedding="none",
                           rel_pos_bias="shared", layer_scale_init=0.1)
  assert _count(timm, 224) == 85_798_656
  assert _count(beit, 224) == 85_665_360


def test_variants_and_errors():
  assert vit_lib.parse_variant("S/16") == dict(width=384, depth=12, mlp_dim=1536, num_heads=6,
                                               patch_size=16)
  assert vit_lib.parse_variant("H/14")["width"] == 1280
  for bad in ("X/16", "B", "B/", ""):
    with pytest.raises(ClmimError, match="Unknown ViT variant"):
      vit_lib.parse_variant(bad)
  with pytest.raises(ClmimError, match="Unknown ViT field"):
    vit_lib.build_vit("mu/4", image_size=32, widht=3)


@pytest.mark.parametrize("style", ["timm", "beit"])
def test_sown_states_and_attention(style):
  kwargs = dict(block_style="beit", position_embedding="none", rel_pos_bias="shared",
                layer_scale_init=0.1) if style == "beit" else {}
  model = vit_lib.build_vit("mu/4", image_size=16, depth=3, **kwargs)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(0), images)["params"]
  out, state = model.apply({"params": params}, images, mutable=["intermediates"])
  zs, attns = vit_lib.collect_states(state, model.depth)
  assert len(zs) == 2 * 3 + 1 and len(attns) == 3
  assert all(z.shape == (2, 17, 128) for z in zs)
  assert all(a.shape == (2, 4, 17, 17) for a in attns)
  np.testing.assert_allclose(np.asarray(attns[1]).sum(-1), 1.0, atol=1e-5)
  # zs are before the final norm; the output is the final norm of the last state.
  norm = lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  expected = norm(np.asarray(zs[-1])) * np.asarray(params["norm"]["scale"]) + np.asarray(
      params["norm"]["bias"])
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4)
  if style == "beit":
    assert "qkv" in params["block_0"]["attn"] and "bias" not in params["block_0"]["attn"]["qkv"]
    assert {"q_bias", "v_bias"} <= set(params["block_0"]["attn"])
    assert {"gamma_1", "gamma_2"} <= set(params["block_0"])
    assert params["rel_pos_bias"]["table"].shape == ((2 * 4 - 1) ** 2 + 3, 4)
  else:
    assert params["pos_embed"].shape == (1, 17, 128)


@pytest.mark.parametrize("kwargs", [
    {},
    dict(block_style="beit", position_embedding="none", rel_pos_bias="shared", layer_scale_init=0.1),
    dict(block_style="beit", position_embedding="none", rel_pos_bias="per_block",
         layer_scale_init=0.1),
], ids=["timm", "beit_shared_bias", "beit_per_block_bias"])
def test_cls_only_gives_the_cls_token_of_the_full_forward_and_skips_the_rest(kwargs):
  model = vit_lib.build_vit("mu/4", image_size=16, depth=2, **kwargs)
  images = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))["params"]
  assert jax.tree.structure(jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), images, cls_only=True))["params"]) \
      == jax.tree.structure(shapes)
  # Random values everywhere (numpy: compiling the initialisers costs seconds), so that the
  # biases, layer scales and bias tables, which start at 0 or 1, count too.
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda s: 0.1 * rng.normal(size=s.shape).astype(np.float32), shapes)
  readout = rng.normal(size=(128, 5)).astype(np.float32)

  def loss(p, cls_only):
    out = model.apply({"params": p}, images, cls_only=cls_only)
    return jnp.tanh(out[:, 0] @ readout).sum(), out

  if kwargs:  # the BEiT paths (q/v biases, sliced bias tables): the forward
    full, cls = (jax.jit(loss, static_argnums=1)(params, c)[1] for c in (False, True))
    np.testing.assert_allclose(np.asarray(cls), np.asarray(full[:, :1]), atol=2e-6)
    return
  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, full), full_grads = grad_fn(params, False)
  (_, cls), cls_grads = grad_fn(params, True)
  assert cls.shape == (3, 1, 128)
  np.testing.assert_allclose(np.asarray(cls), np.asarray(full[:, :1]), atol=2e-6)
  for a, b in zip(jax.tree.leaves(full_grads), jax.tree.leaves(cls_grads)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4,
                               atol=1e-5 * float(jnp.max(jnp.abs(a))) + 1e-12)
  # The skipped work is gone from the program: the last block's MLP sees one row per image
  # (3 x 128 -> 256), block 0's every token's (3 * 17 rows); the full forward has no such row.
  hlo = {c: grad_fn.lower(params, c).as_text() for c in (True, False)}
  assert "tensor<3x256xf32>" in hlo[True] and "tensor<51x256xf32>" in hlo[True]
  assert "tensor<3x256xf32>" not in hlo[False]


def test_relative_position_index_known_values():
  index = vit_lib.relative_position_index(14)
  assert index.shape == (197, 197)
  assert (index[0, 1:] == 729).all() and (index[1:, 0] == 730).all() and index[0, 0] == 731
  assert (np.diag(index)[1:] == 364).all() and index.min() == 0 and index.max() == 731
  # Offsets are translation invariant: patch (r, c) -> (r, c+1) has the same index everywhere.
  assert index[1 + 0, 1 + 1] == index[1 + 20, 1 + 21]


def test_sincos_tables():
  row_first = vit_lib.sincos_position_embedding(4, 16)
  col_first = vit_lib.sincos_position_embedding(4, 16, order="col_first")
  assert row_first.shape == (1, 17, 16) and not row_first[0, 0].any()
  np.testing.assert_array_equal(row_first[0, :, :8], col_first[0, :, 8:])
  # Patch 1 is row 0, column 1: the row half is the encoding of 0 (sin 0 = 0, cos 0 = 1).
  np.testing.assert_allclose(row_first[0, 2, :4], 0.0)
  np.testing.assert_allclose(row_first[0, 2, 4:8], 1.0)


def test_mask_token_replaces_masked_patches():
  model = vit_lib.build_vit("mu/4", image_size=8, depth=1, use_mask_token=True,
                            position_embedding="none")
  images = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 3))
  # Random values drawn in numpy at the parameters' shapes, and one jitted forward: run op by
  # op, the initialisers and the forward compile each operation at these shapes (~2 s).
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  mask = jnp.array([[True, False, False, True]])
  _, state = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m, mutable=["intermediates"]))(
      params, images, mask)
  embedding = np.asarray(state["intermediates"]["embedding"][0])
  np.testing.assert_array_equal(embedding[0, 1], params["mask_token"][0, 0])
  np.testing.assert_array_equal(embedding[0, 4], params["mask_token"][0, 0])
  assert not np.allclose(embedding[0, 2], params["mask_token"][0, 0])


def test_wrong_image_size_is_a_clear_error():
  model = vit_lib.build_vit("mu/4", image_size=16, depth=1)
  with pytest.raises(ClmimError, match="16px"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def test_exact_gelu_matches_float64():
  from math import erf
  x = np.linspace(-12, 12, 2001).astype(np.float32)
  reference = np.array([v * 0.5 * (1 + erf(v / np.sqrt(2))) for v in np.float64(x)])
  from clmim.models.mlp import exact_gelu
  np.testing.assert_allclose(exact_gelu(jnp.asarray(x)), reference, rtol=0, atol=2e-6)


def _float64_layer_norm(x, scale, bias, epsilon=1e-6):
  centred = x - x.mean(-1, keepdims=True)
  return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + epsilon) * scale + bias


@functools.partial(jax.jit, static_argnums=0)
def _value_and_pullback(module, params, x, cotangent):
  """module.apply's value and its pullback of `cotangent`, (grad params, grad x), as one jitted
  program (as training runs it; op by op, each operation compiles on its own: ~1 s more)."""
  out, pullback = jax.vjp(module.apply, params, x)
  return out, pullback(cotangent)


def test_layer_norm_value_and_gradient_match_float64_and_flax():
  import flax.linen as nn
  from clmim.models.layer_norm import LayerNorm
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((3, 5, 16)) * 3 + 1).astype(np.float32)
  params = {"params": {"scale": rng.standard_normal(16).astype(np.float32),
                       "bias": rng.standard_normal(16).astype(np.float32)}}
  cotangent = rng.standard_normal(x.shape).astype(np.float32)
  out, (grad_params, grad_x) = _value_and_pullback(LayerNorm(epsilon=1e-6), params, x, cotangent)
  scale, bias = (np.float64(params["params"][k]) for k in ("scale", "bias"))
  np.testing.assert_allclose(out, _float64_layer_norm(np.float64(x), scale, bias), atol=2e-6)
  # The gradient's known answer: central differences of the float64 function, entry by entry.
  loss = lambda args: np.sum(_float64_layer_norm(*args) * cotangent)
  step = 1e-6
  float64_args = [np.float64(x), scale, bias]
  for position, grad in enumerate((grad_x, grad_params["params"]["scale"],
                                   grad_params["params"]["bias"])):
    numeric = np.zeros_like(float64_args[position])
    for index in np.ndindex(numeric.shape):
      up, down = list(float64_args), list(float64_args)
      up[position], down[position] = float64_args[position].copy(), float64_args[position].copy()
      up[position][index] += step
      down[position][index] -= step
      numeric[index] = (loss(up) - loss(down)) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-4)
  # Same function and gradients as flax's LayerNorm (which it replaces), to float32 round-off.
  flax_out, flax_grads = _value_and_pullback(nn.LayerNorm(epsilon=1e-6), params, x, cotangent)
  np.testing.assert_allclose(out, flax_out, atol=5e-6)
  for ours, theirs in zip(jax.tree.leaves((grad_params, grad_x)), jax.tree.leaves(flax_grads)):
    np.testing.assert_allclose(ours, theirs, atol=5e-6)


def test_layer_norm_in_bfloat16_normalises_in_float32_and_keeps_the_dtypes():
  from clmim.models.layer_norm import LayerNorm
  # Drawn in numpy and run jitted, as in training: op by op, each operation would compile on
  # its own (~1 s).
  x = jnp.asarray((np.random.default_rng(0).normal(size=(4, 8)) * 100 + 1000).astype(jnp.bfloat16))
  module = LayerNorm(dtype=jnp.bfloat16)
  params = jax.jit(module.init)(jax.random.PRNGKey(1), x)
  out = jax.jit(module.apply)(params, x)
  assert out.dtype == jnp.bfloat16
  # A large common offset is removed in float32: the rows come out normalised.
  np.testing.assert_allclose(np.float32(out).mean(-1), 0, atol=2e-2)
  np.testing.assert_allclose(np.float32(out).std(-1), 1, atol=2e-2)
  grads = jax.jit(jax.grad(lambda p, x: module.apply(p, x).astype(jnp.float32).sum(), (0, 1)))(
      params, x)
  assert grads[1].dtype == jnp.bfloat16 and grads[0]["params"]["scale"].dtype == jnp.float32
