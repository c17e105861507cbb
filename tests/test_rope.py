"""DINOv3's 2-D rotary position embedding: known values, the relative-position property, and
the ViT field that uses it (parity with transformers' DINOv3 is in test_hf_parity.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clmim.errors import ClmimError
from clmim.models import rope
from clmim.models.vit import ViT, forward_with_states


def test_known_angles_on_a_two_by_two_grid():
  # head_dim 4: one frequency, theta^0 = 1; patch centres at -0.5 and +0.5 on each axis.
  cos, sin = rope.patch_rotation(2, 4, 100.0)
  angles = np.pi * np.array([[-1, -1], [-1, 1], [1, -1], [1, 1]], np.float64)  # (y, x) * 2pi/2
  want = np.tile(angles, (1, 2))
  np.testing.assert_allclose(cos, np.cos(want), atol=1e-6)
  np.testing.assert_allclose(sin, np.sin(want), atol=1e-6)


def test_rotation_is_by_halves_and_keeps_prefix_tokens():
  cos, sin = rope.patch_rotation(2, 4, 100.0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1, 5, 4)).astype(np.float32))
  out = np.asarray(rope.rotate(x, cos, sin, prefix=1))
  np.testing.assert_array_equal(out[..., 0, :], np.asarray(x)[..., 0, :])  # the cls token
  v = np.asarray(x)[0, 0, 1:]
  turned = np.concatenate([-v[:, 2:], v[:, :2]], axis=-1)
  np.testing.assert_allclose(out[0, 0, 1:], v * cos + turned * sin, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_logits_depend_only_on_the_displacement():
  """The point of RoPE: with the same query and key content at every patch, q_i . k_j depends
  on the patches' displacement alone."""
  grid, dim = 4, 8
  cos, sin = rope.patch_rotation(grid, dim, 100.0)
  rng = np.random.default_rng(1)
  q = np.broadcast_to(rng.normal(size=dim), (grid * grid, dim)).astype(np.float32)
  k = np.broadcast_to(rng.normal(size=dim), (grid * grid, dim)).astype(np.float32)
  qr, kr = (np.asarray(rope.rotate(jnp.asarray(t), cos, sin, 0)) for t in (q, k))
  logits = qr @ kr.T
  pos = np.stack(np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij"), -1).reshape(-1, 2)
  by_shift = {}
  for i in range(grid * grid):
    for j in range(grid * grid):
      by_shift.setdefault(tuple(pos[i] - pos[j]), []).append(logits[i, j])
  assert max(np.ptp(v) for v in by_shift.values()) < 1e-4
  assert np.ptp([v[0] for v in by_shift.values()]) > 0.1  # and the displacement does matter


@pytest.mark.slow
def test_a_rope_vit_runs_at_any_resolution_and_checks_its_fields():
  vit = ViT(width=32, depth=1, num_heads=4, mlp_dim=64, patch_size=7, image_size=28,
            position_embedding="none", num_registers=2, rope_theta=100.0)
  params = vit.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 3)))["params"]
  assert "pos_embed" not in params
  zs, attns = forward_with_states(vit.clone(image_size=42), params, jnp.ones((1, 42, 42, 3)))
  assert attns[0].shape == (1, 4, 39, 39)
  with pytest.raises(ClmimError, match="divisible by 4"):
    ViT(width=24, num_heads=4, rope_theta=100.0).check_fields()
  with pytest.raises(ClmimError, match="not supported with rope_theta"):
    vit.apply({"params": params}, jnp.zeros((1, 28, 28, 3)), keep=jnp.zeros((1, 4), jnp.int32))
