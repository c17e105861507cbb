"""Known answers, float64 references and exactness for homogeneity, rollout and feature_variance."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matplotlib.figure import Figure

import analysis_testing

from clmim.analysis import core, feature_variance, homogeneity, plots, rollout
from clmim.errors import ClmimError

MODULES = [homogeneity, rollout, feature_variance]


def _finalize(module, zs, attns, patch_size=4, options=None, splits=None):
  """finalize(sum of partial_sums over the pieces `splits` of the batch), sums added in float64."""
  options = core.resolve_options(module, options)
  b = (attns or zs)[0].shape[0]
  bounds = [0] + list(splits or []) + [b]
  step = jax.jit(lambda z, a, w, i: core.sums_of(module, core.Batch(z, a, w, i, patch_size),
                                                 options))
  total = None
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    piece = lambda xs: [jnp.asarray(x[lo:hi]) for x in xs]
    sums = step(piece(zs), piece(attns), jnp.ones(hi - lo, jnp.float32),
                jnp.arange(lo, hi, dtype=jnp.int32))
    sums = jax.tree.map(lambda x: np.asarray(x, np.float64), sums)
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  return module.finalize(total, options)


def _random_softmax(rng, b, h, t, scale=3.0):
  logits = rng.normal(size=(b, h, t, t)) * scale
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _states(rng, b, t, d, depth):
  return [rng.normal(size=(b, t, d)).astype(np.float32) for _ in range(2 * depth + 1)]


def _unit_rows64(attn):
  a = attn[..., 1:, 1:].astype(np.float64)
  a = a / a.sum(-1, keepdims=True)
  return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _grid_mean_distance_to_centre(g, patch_size):
  c = (g - 1) / 2
  return patch_size * np.mean([math.hypot(r - c, q - c) for r in range(g) for q in range(g)])


# ------------------------------------------------------------------------------- homogeneity


def test_homogeneity_matches_float64_pairs():
  rng = np.random.default_rng(0)
  attns = [_random_softmax(rng, 3, 4, 10) for _ in range(2)]
  zs = _states(rng, 3, 10, 8, 2)
  got = _finalize(homogeneity, zs, attns)
  for layer, attn in enumerate(attns):
    u = _unit_rows64(attn)  # [B, H, N, N]
    heads = np.mean([np.einsum("bqk,bqk->bq", u[:, h], u[:, j]).mean()
                     for h, j in itertools.combinations(range(4), 2)])
    queries = np.mean([np.einsum("bhk,bhk->bh", u[:, :, q], u[:, :, p]).mean(0)
                       for q, p in itertools.combinations(range(9), 2)], axis=0)
    x, y = zs[2 * layer][:, 1:].astype(np.float64), zs[2 * layer + 2][:, 1:].astype(np.float64)
    depth = np.mean((x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1))
    np.testing.assert_allclose(got["head_similarity"][layer], heads, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["query_similarity"][layer], queries, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["depth_similarity"][layer], depth, rtol=1e-5, atol=1e-6)
    unit = y / np.linalg.norm(y, axis=-1, keepdims=True)
    tokens = np.mean([np.einsum("bd,bd->b", unit[:, k], unit[:, j]).mean()
                      for k, j in itertools.combinations(range(9), 2)])
    np.testing.assert_allclose(got["token_similarity"][layer], tokens, rtol=1e-5, atol=1e-6)


def test_homogeneity_known_answers():
  rng = np.random.default_rng(1)
  n, h = 9, 3
  identical_heads = np.repeat(_random_softmax(rng, 2, 1, n + 1), h, axis=1)
  # One-hot rows on a different key per query (a permutation), with mass on cls to drop.
  one_hot = np.zeros((2, h, n + 1, n + 1), np.float32)
  one_hot[:, :, :, 0] = 0.4
  one_hot[:, :, np.arange(1, n + 1), 1 + rng.permutation(n)] = 0.6
  one_hot[:, :, 0, 0] = 1.0
  same_rows = np.broadcast_to(_random_softmax(rng, 2, h, 1, 1.0), (2, h, n + 1, n + 1)).copy()
  z = rng.normal(size=(2, n + 1, 5)).astype(np.float32)
  zs = [z, 2 * z, 3 * z, -z, -z]  # block 1 keeps every token's direction, block 2 flips it
  got = _finalize(homogeneity, zs, [identical_heads, one_hot])
  np.testing.assert_allclose(got["head_similarity"][0], 1.0, rtol=1e-6)
  np.testing.assert_allclose(got["query_similarity"][1], [0.0] * h, atol=1e-6)
  np.testing.assert_allclose(got["depth_similarity"], [1.0, -1.0], rtol=1e-6)
  # Tokens that all point one way (up to scale) are perfectly similar; a token and its
  # opposite, half each, average to -1/(n-1) over the pairs.
  shared = np.broadcast_to(rng.normal(size=(2, 1, 5)), (2, n + 1, 5)) * \
      rng.uniform(0.5, 2, size=(2, n + 1, 1))
  signs = np.where(np.arange(n + 1) % 2, 1.0, -1.0)[None, :, None]
  zs = [z, z, shared.astype(np.float32), z, (shared * signs).astype(np.float32)]
  got = _finalize(homogeneity, zs, [identical_heads, one_hot])
  opposite = np.mean([signs[0, 1 + k, 0] * signs[0, 1 + j, 0]
                      for k, j in itertools.combinations(range(n), 2)])
  np.testing.assert_allclose(got["token_similarity"], [1.0, opposite], rtol=1e-5, atol=1e-6)
  got = _finalize(homogeneity, zs, [same_rows, same_rows])
  np.testing.assert_allclose(got["query_similarity"], np.ones((2, h)), rtol=1e-6)


def test_homogeneity_one_head_has_no_pairs():
  rng = np.random.default_rng(2)
  got = _finalize(homogeneity, _states(rng, 2, 5, 4, 1), [_random_softmax(rng, 2, 1, 5)])
  assert math.isnan(got["head_similarity"][0])
  assert np.isfinite(got["query_similarity"]).all()


# ----------------------------------------------------------------------------------- rollout


def _ref_rollout(attns):
  """float64 full products: per block, the cls row of R_l without cls, renormalised."""
  b, _, t, _ = attns[0].shape
  r = np.broadcast_to(np.eye(t), (b, t, t))
  out = []
  for attn in attns:
    a = 0.5 * attn.astype(np.float64).mean(1) + 0.5 * np.eye(t)
    r = (a / a.sum(-1, keepdims=True)) @ r
    row = r[:, 0, 1:]
    out.append(row / row.sum(-1, keepdims=True))
  return np.stack(out)  # [depth, B, N]


def _ref_spread_entropy(p, g, patch_size):
  pos = np.stack([np.arange(g * g) // g, np.arange(g * g) % g], -1).astype(np.float64)
  centre = p @ pos
  spread = patch_size * (p * np.linalg.norm(pos - centre[..., None, :], axis=-1)).sum(-1)
  entropy = -(p * np.log(p)).sum(-1) / math.log(g * g)
  return spread.mean(-1), entropy.mean(-1)


def test_rollout_matches_float64_products():
  rng = np.random.default_rng(3)
  attns = [_random_softmax(rng, 5, 3, 17, scale=2.0) for _ in range(3)]
  got = _finalize(rollout, [], attns, patch_size=4, options={"images": (4, 0)}, splits=[2])
  ref = _ref_rollout(attns)
  spread, entropy = _ref_spread_entropy(ref, 4, 4)
  np.testing.assert_allclose(got["rollout_spread"], spread, rtol=1e-5)
  np.testing.assert_allclose(got["rollout_entropy"], entropy, rtol=1e-5)
  np.testing.assert_allclose(got["rollout_map"], ref[-1, [4, 0]].reshape(2, 4, 4), rtol=1e-5,
                             atol=1e-7)
  assert got["rollout_map_images"] == [4, 0]


def test_rollout_map_pixels_need_pixels():
  attns = [_random_softmax(np.random.default_rng(8), 2, 2, 10)]
  assert _finalize(rollout, [], attns)["rollout_map_pixels"] == []  # a batch without images


def test_rollout_of_identity_is_identity():
  # R = I: the cls row is one-hot on cls, so no mass is left for the patches; by definition the
  # map is then uniform (the limit of attention_distance's epsilon), spread is the grid's.
  eye = np.broadcast_to(np.eye(10, dtype=np.float32), (2, 3, 10, 10))
  np.testing.assert_array_equal(rollout.cls_rollout([jnp.asarray(eye)] * 2),
                                np.broadcast_to(np.eye(10)[0], (2, 2, 10)))
  got = _finalize(rollout, [], [eye, eye], patch_size=4)
  np.testing.assert_allclose(got["rollout_spread"], [_grid_mean_distance_to_centre(3, 4)] * 2,
                             rtol=1e-6)
  np.testing.assert_allclose(got["rollout_entropy"], [1.0, 1.0], rtol=1e-6)


def test_rollout_of_uniform_attention_is_uniform():
  # Â = (P + I)/2 with P = J/(N+1) idempotent: Â^l = 2^-l I + (1 - 2^-l) P, uniform on patches.
  uniform = np.full((2, 2, 17, 17), 1 / 17, np.float32)
  got = _finalize(rollout, [], [uniform] * 3, patch_size=8, options={"images": (1,)})
  np.testing.assert_allclose(got["rollout_spread"], [_grid_mean_distance_to_centre(4, 8)] * 3,
                             rtol=1e-5)
  np.testing.assert_allclose(got["rollout_entropy"], [1.0] * 3, rtol=1e-5)
  np.testing.assert_allclose(got["rollout_map"], np.full((1, 4, 4), 1 / 16), rtol=1e-5)


def test_rollout_two_layers_known_order():
  # Patches attend to themselves; cls attends to patch k1 in block 1 and to k2 in block 2.
  # e0ᵀ Â2 Â1 = e0/4 + e_k1/4 + e_k2/2 -> 1/3 on k1 and 2/3 on k2 once cls is dropped.
  n, k1, k2 = 9, 0, 8  # corners of the 3x3 grid, 2·sqrt(2) patches apart
  maps = []
  for k in (k1, k2):
    a = np.eye(n + 1, dtype=np.float32)[None, None].repeat(2, 1)
    a[:, :, 0] = 0
    a[:, :, 0, 1 + k] = 1
    maps.append(a)
  got = _finalize(rollout, [], maps, patch_size=2, options={"images": (0, 3)})
  d = 2 * math.hypot(2, 2)
  np.testing.assert_allclose(got["rollout_spread"], [0.0, 4 / 9 * d], atol=1e-6)
  entropy = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3)) / math.log(n)
  np.testing.assert_allclose(got["rollout_entropy"], [0.0, entropy], atol=1e-6)
  want = np.zeros(n)
  want[[k1, k2]] = [1 / 3, 2 / 3]
  np.testing.assert_allclose(got["rollout_map"], [want.reshape(3, 3)], atol=1e-6)
  assert got["rollout_map_images"] == [0]  # position 3 is past the one-image stream


@pytest.mark.parametrize("images", [(-1,), ("a",), 1.5, (True,)])
def test_rollout_rejects_bad_images_option(images):
  with pytest.raises(ClmimError, match="rollout.images"):
    rollout.check(None, {"images": images})


# -------------------------------------------------------------------------- feature_variance


def test_feature_variance_known_answers():
  rng = np.random.default_rng(4)
  g, d = 4, 6
  checker = np.where((np.arange(g)[:, None] + np.arange(g)[None, :]) % 2, 1.0, -1.0).reshape(-1)
  scale, offset = rng.normal(size=d), rng.normal(size=d)
  pattern = np.zeros((2, g * g + 1, d))
  pattern[:, 0] = 100.0  # cls must not count
  pattern[:, 1:] = checker[:, None] * scale + offset
  constant = np.broadcast_to(rng.normal(size=(1, 1, d)), pattern.shape)
  zs = [np.asarray(z, np.float32) for z in (constant, pattern, pattern)]
  got = _finalize(feature_variance, zs, [])
  np.testing.assert_allclose(got["feature_variance_all_states"],
                             [0.0] + [np.mean(scale ** 2)] * 2, rtol=1e-5, atol=1e-6)
  assert got["feature_variance"] == [got["feature_variance_all_states"][i] for i in (0, 2)]
  got = _finalize(feature_variance, zs, [], options={"normalize": True})
  np.testing.assert_allclose(got["feature_variance"],
                             [0.0, np.mean(scale ** 2) / np.mean(scale ** 2 + offset ** 2)],
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ClmimError, match="normalize"):
    feature_variance.check(None, {"normalize": "yes"})


# ------------------------------------------------------------------------ protocol, figures


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.NAME)
def test_protocol_and_batch_splits(module):
  assert core.load(module.NAME) is module
  rng = np.random.default_rng(5)
  attns = [_random_softmax(rng, 7, 2, 10) for _ in range(2)]
  zs = _states(rng, 7, 10, 6, 2)
  whole = _finalize(module, zs, attns)
  assert set(whole) == set(core.results_of(module))
  for key, result in core.results_of(module).items():
    if result.series is not None:
      assert len(result.series(whole[key])) == (2 if result.x == "block" else 3)
  pieces = _finalize(module, zs, attns, splits=[1, 4])
  for key in whole:
    np.testing.assert_allclose(pieces[key], whole[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_figures_of_two_models():
  rng = np.random.default_rng(6)
  maps = rng.random((2, 3, 3)).tolist()
  info = {"a": {"family": "cl", "image_size": 12, "patch_size": 4},
          "b": {"family": "mim", "image_size": 12, "patch_size": 4}}
  curves = {"rollout_spread": [1.0, 2.0], "rollout_entropy": [0.5, 0.6],
            "head_similarity": [0.5, 0.9], "query_similarity": [[0.1, 0.3], [0.2, 0.4]],
            "depth_similarity": [0.7, 0.8], "feature_variance": [1.0, 2.0, 3.0]}
  uniform = np.full((3, 3), 1 / 9).tolist()  # an untrained-looking map
  pixels = rng.random((2, 12, 12, 3)).tolist()
  results = {"models": {"a": {"rollout_map": maps, "rollout_map_images": [0, 2],
                              "rollout_map_pixels": pixels, **curves},
                        "b": {"rollout_map": [uniform], "rollout_map_images": [0], **curves}},
             "model_info": info}
  figures = plots.analysis_figures(results, rollout, rollout.OPTIONS)
  assert sorted(figures) == ["rollout_entropy.png", "rollout_map.png", "rollout_spread.png"]
  assert all(isinstance(f, Figure) for f in figures.values())
  figure = figures["rollout_map.png"]
  drawn = [a for a in figure.axes if a.images]
  assert [a.get_title() for a in drawn] == ["input", "", "a (CL)", "", "b (MIM)"]
  assert drawn[0].images[0].get_array().shape == (12, 12, 3)
  # One colour scale from 0 for every map: b's uniform map is flat, not full contrast.
  assert {(a.images[0].norm.vmin, a.images[0].norm.vmax) for a in drawn[2:]} == {
      (0.0, np.max(maps))}
  [bar] = [a for a in figure.axes if a.get_label() == "<colorbar>"]
  assert "rolled-out attention" in bar.get_ylabel()
  np.testing.assert_allclose(bar.get_yticks(minor=True), [1 / 9])  # the uniform map, 1/N
  assert rollout.figures({"models": {}}, rollout.OPTIONS) == {}
  spread = core.results_of(rollout)["rollout_spread"]
  assert core.reference_value(spread, results) == pytest.approx(
      _grid_mean_distance_to_centre(3, 4))
  for module in (homogeneity, feature_variance):
    figures = plots.analysis_figures(results, module, module.OPTIONS)
    assert len(figures) == (3 if module is homogeneity else 1)
    assert all(isinstance(f, Figure) for f in figures.values())


# --------------------------------------------------------------------- exactness on a real ViT

@pytest.fixture(scope="module")
def setup():
  return analysis_testing.small_vit()


def _run(setup, batch_size, devices=8):
  return analysis_testing.run_stream(setup, MODULES, batch_size, devices,
                                     options={"rollout": {"images": (3, 69, 70)}})


@pytest.fixture(scope="module")
def reference(setup):
  return _run(setup, 64)


@pytest.mark.parametrize("batch_size,devices", [(1, 8), (7, 8), (7, 1)])
def test_vit_invariance(setup, reference, batch_size, devices):
  got = _run(setup, batch_size, devices)
  assert got["num_images"] == reference["num_images"] == 70
  assert reference["rollout_map_images"] == [3, 69]
  for module in MODULES:
    for key in core.results_of(module):
      np.testing.assert_allclose(got[key], reference[key], rtol=1e-5, atol=1e-7, err_msg=key)
  # Guards against comparing trivial (uniform, all-equal) numbers with themselves.
  assert np.asarray(reference["query_similarity"]).min() < 0.95
  assert np.ptp(reference["feature_variance"]) > 0


def test_rollout_map_pixels_are_the_chosen_inputs(setup, reference):
  _, _, images = setup  # 16 px, patch 4: not pooled; kept to 2 decimals
  np.testing.assert_allclose(reference["rollout_map_pixels"], images[np.array([3, 69])],
                             atol=5.01e-3, rtol=0)
