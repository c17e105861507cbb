"""Known answers, option errors and batch invariance of the svd and attention_maps analyses."""
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matplotlib.figure import Figure

import analysis_testing

from clmim.analysis import attention_maps, core, svd
from clmim.errors import ClmimError


def _analyse(module, zs=(), attns=(), index=None, **options):
  """partial_sums on one batch (jit, like the runner), then finalize."""
  b = (list(zs) or list(attns))[0].shape[0]
  index = np.arange(b, dtype=np.int32) if index is None else np.asarray(index, np.int32)
  options = core.resolve_options(module, options)
  weights = (index >= 0).astype(np.float32)
  sums = jax.jit(lambda z, a, w, i: core.sums_of(module, core.Batch(z, a, w, i, 4), options))(
      list(zs), list(attns), weights, index)
  return module.finalize(jax.tree.map(lambda x: np.asarray(x, np.float64), sums), options)


def _with_cls(tokens, rng):
  """[B, N, D] patch tokens -> [B, N+1, D] with a random cls token (which must be dropped)."""
  cls = rng.normal(size=(tokens.shape[0], 1, tokens.shape[2])) * 100
  return np.concatenate([cls, tokens], axis=1).astype(np.float32)


# ---------------------------------------------------------------- svd known answers


@pytest.mark.parametrize("r, method", [(1, "exact"), (3, "exact"), (5, "exact"), (3, "gram")])
def test_rank_r_tokens_have_r_singular_values(r, method):
  rng = np.random.default_rng(r)
  n, d = 16, 12
  # Equal singular values: Z = 2 * U_r V_r^T with orthonormal columns.
  u = np.linalg.qr(rng.normal(size=(n, n)))[0][:, :r]
  v = np.linalg.qr(rng.normal(size=(d, d)))[0][:, :r]
  equal = 2 * u @ v.T
  skewed = rng.normal(size=(n, r)) @ rng.normal(size=(r, d))
  zs = [_with_cls(np.stack([equal, skewed]), rng)] * 3  # depth 1: 3 states
  out = _analyse(svd, zs, max_rank=100, method=method, centre=False)  # Z as constructed
  values = np.asarray(out["singular_values"])
  assert values.shape == (3, min(n, d))  # max_rank above min(N, D) keeps the whole spectrum
  np.testing.assert_allclose(values[:, r:], 0, atol=1e-6)
  assert (values[:, :r] > 1e-3).all()
  per_image = jnp.stack([jnp.asarray(equal), jnp.asarray(skewed)])
  p, erank = svd.spectrum(per_image, method=method)
  np.testing.assert_allclose(p[0, :r], 1 / r, rtol=1e-5)
  np.testing.assert_allclose(erank[0], r, rtol=1e-5)  # equal singular values: exactly r
  assert 1 - 1e-5 <= erank[1] <= r + 1e-5
  np.testing.assert_allclose(out["effective_rank"], (r + float(erank[1])) / 2, rtol=1e-5)
  assert len(_analyse(svd, zs, max_rank=2)["singular_values"][0]) == 2


@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
def test_methods_match_float64_svd(shape):
  """Both orientations of the Gram matrix, on a spectrum spanning four decades: the exact SVD
  to float32 round-off; the Gram route to its documented bound, ~sqrt(eps) ~ 3e-4 of the largest
  singular value (the Gram matrix cannot hold eigenvalues below eps * sigma_max^2)."""
  rng = np.random.default_rng(0)
  n, d = shape
  m = min(n, d)
  u = np.linalg.qr(rng.normal(size=(n, n)))[0][:, :m]
  v = np.linalg.qr(rng.normal(size=(d, d)))[0][:, :m]
  s = np.logspace(0, -4, m)
  z = np.stack([(u * s) @ v.T, rng.normal(size=(n, d))]).astype(np.float32)
  reference = np.linalg.svd(z.astype(np.float64), compute_uv=False)
  for method, tolerance in (("exact", 2e-6), ("gram", 1e-4)):
    got = np.asarray(jax.jit(lambda z: svd.singular_values(z, method))(z))
    assert got.shape == (2, m)
    np.testing.assert_allclose(got, reference, atol=tolerance * reference.max(), rtol=0)
  np.testing.assert_allclose(got[0, :6], reference[0, :6], rtol=1e-4)  # >= 1e-2 of the largest


def test_nvidia_gpus_use_the_polar_svd_and_gram_needs_no_svd():
  """What each method lowers to on CUDA (lowered here without a GPU): the exact SVD through
  cuSOLVER's polar-decomposition routine (gesvdp, measured faster and closer to float64 than
  the default Jacobi gesvdj on an H100), the Gram route through a symmetric eigensolver."""
  z = jnp.ones((2, 6, 9), jnp.float32)
  calls = {}
  for method in svd.METHODS:
    text = jax.jit(lambda z: svd.singular_values(z, method)).trace(z).lower(
        lowering_platforms=("cuda",)).as_text()
    calls[method] = " ".join(sorted(set(t.split("(")[0] for t in text.split("custom_call @")[1:])))
  assert "gesvdp" in calls["exact"] and "gesvdj" not in calls["exact"]
  assert "gesvd" not in calls["gram"] and "syev" in calls["gram"]


def test_centring_removes_the_common_token():
  rng = np.random.default_rng(0)
  common = rng.normal(size=(1, 1, 8)) * 10
  tokens = common + rng.normal(size=(2, 16, 1)) * rng.normal(size=(1, 1, 8))  # rank 2
  zs = [_with_cls(tokens, rng)] * 3
  plain = np.asarray(_analyse(svd, zs, centre=False)["singular_values"])
  centred = np.asarray(_analyse(svd, zs)["singular_values"])  # the default: centred
  assert (plain[:, 1] > 1e-3).all() and (plain[:, 2:] < 1e-6).all()
  np.testing.assert_allclose(centred[:, 0], 1, rtol=1e-5)


def _shift_states(rng, displacement):
  before = rng.normal(size=(3, 64, 16))
  return [_with_cls(before, rng), _with_cls(before + displacement, rng), _with_cls(before, rng)]


def test_tokens_moving_together_have_shift_ratio_one():
  rng = np.random.default_rng(1)
  out = _analyse(svd, _shift_states(rng, rng.normal(size=(3, 1, 16))), images=(0, 2))
  np.testing.assert_allclose(out["svd_shift_ratio"], 1, rtol=1e-6)
  np.testing.assert_allclose(out["token_shift_ratio"], [1], rtol=1e-6)


def test_independent_moves_have_small_shift_ratio():
  rng = np.random.default_rng(2)
  out = _analyse(svd, _shift_states(rng, rng.normal(size=(3, 64, 16))), images=(1,))
  # Independent isotropic moves of N tokens: about 1/sqrt(N) = 0.125.
  assert out["svd_shift_ratio"][0] < 0.25 and out["token_shift_ratio"][0] < 0.25


def test_projection_picks_the_chosen_image_and_keeps_its_geometry():
  rng = np.random.default_rng(3)
  b, n, d = 6, 9, 3  # D = 3: the top-3 projection is a rotation of the tokens
  zs = [_with_cls(rng.normal(size=(b, n, d)), rng) for _ in range(5)]  # depth 2
  index = np.array([5, 4, -1, 3, 0, 1])  # stream positions, one padding slot
  out = _analyse(svd, zs, index=index, images=(3, 0), block=2)
  coords = np.asarray(out["svd_projection"])
  assert coords.shape == (2, 2, n, 3)
  for k, position in enumerate((3, 0)):
    row = list(index).index(position)
    tokens = np.concatenate([zs[2][row, 1:], zs[3][row, 1:]]).astype(np.float64)
    got = coords[k].reshape(2 * n, 3)
    dist = lambda x: np.linalg.norm(x[:, None] - x[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(dist(got), dist(tokens), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["svd_shift_ratio"][k],
                               svd.shift_ratio(zs[2][row, 1:], zs[3][row, 1:]), rtol=1e-6)


# ---------------------------------------------------------------- attention_maps known answers


def _one_hot_attns(b, heads, g, depth):
  """Image i, block l, head h, query q attends (mass 0.5; 0.5 on cls) to key (i+l+h+q) % N."""
  n = g * g
  attns = np.zeros((depth, b, heads, n + 1, n + 1), np.float32)
  attns[..., 0] = 0.5
  for i, l, h, q in np.ndindex(b, depth, heads, n):
    attns[l, i, h, 1 + q, 1 + (i + l + h + q) % n] = 0.5
  return list(attns)


def test_one_hot_maps_come_back_at_their_image_query_and_block():
  g, heads, depth = 4, 3, 3
  attns = _one_hot_attns(5, heads, g, depth)
  index = np.array([2, 0, 4, 1, 3])  # stream position of each slot
  out = _analyse(attention_maps, attns=attns, index=index, images=(4, 1), blocks=(3, 1),
                 queries=((2, 1), (0, 3), (3, 3)))["attention_maps"]
  assert out["images"] == [4, 1] and out["blocks"] == [3, 1]
  assert out["queries"] == [[2, 1], [0, 3], [3, 3]]
  maps = np.asarray(out["maps"])
  assert maps.shape == (2, 3, 2, heads, g, g)
  for (k, position), (qi, (x, y)), (bi, block), h in itertools.product(
      enumerate((4, 1)), enumerate(out["queries"]), enumerate((3, 1)), range(heads)):
    slot = list(index).index(position)
    want = np.zeros(g * g)
    want[(slot + block - 1 + h + y * g + x) % (g * g)] = 1.0  # cls mass renormalised away
    np.testing.assert_array_equal(maps[k, qi, bi, h].ravel(), want)


def test_query_attention_figure_has_one_scale_a_colourbar_and_the_input():
  g, x, y, patch = 4, 2, 1, 2
  one_hot = np.zeros((1, 1, g, g))
  one_hot[0, 0, 3, 0] = 1.0
  uniform = np.full((1, 1, g, g), 1 / g**2)
  figure = attention_maps.query_attention_figure(np.zeros((1, g * patch, g * patch, 3)),
                                                 {"trained": one_hot, "untrained": uniform},
                                                 x, y, patch)
  drawn = {axis.get_title(): axis for axis in figure.axes if axis.images}
  assert list(drawn) == ["input, query outlined", "trained", "untrained"]
  # One scale from 0: the uniform map is flat and dark, not stretched to full contrast.
  assert {(axis.images[0].norm.vmin, axis.images[0].norm.vmax)
          for axis in (drawn["trained"], drawn["untrained"])} == {(0.0, 1.0)}
  [bar] = [axis for axis in figure.axes if axis.get_label() == "<colorbar>"]
  assert bar.get_ylabel().startswith("attention probability")
  np.testing.assert_allclose(bar.get_yticks(minor=True), [1 / g**2])  # uniform 1/N marked
  assert "uniform 1/N" in bar.get_yticklabels(minor=True)[0].get_text()
  [outline] = drawn["input, query outlined"].patches  # the query at patch size, in pixels
  assert outline.get_xy() == (x * patch - 0.5, y * patch - 0.5)
  assert outline.get_width() == patch
  # A given top (e.g. shared by several figures of a notebook) is kept.
  figure = attention_maps.query_attention_figure(None, {"a": uniform}, x, y, patch, vmax=0.5)
  [axis] = [axis for axis in figure.axes if axis.images]
  assert (axis.images[0].norm.vmin, axis.images[0].norm.vmax) == (0.0, 0.5)


def test_query_map_similarity_known_answers():
  g, n = 4, 16
  uniform = np.full((2, 2, n + 1, n + 1), 1 / (n + 1), np.float32)
  out = _analyse(attention_maps, attns=[uniform, uniform], images=(0,))
  np.testing.assert_allclose(out["query_map_similarity"], [1, 1], rtol=1e-6)
  # One-hot rows on different keys: orthogonal maps.
  out = _analyse(attention_maps, attns=_one_hot_attns(2, 2, g, 2), images=(0,))
  np.testing.assert_allclose(out["query_map_similarity"], [0, 0], atol=1e-7)
  assert out["attention_maps"]["queries"] == [[2, 2], [1, 1]]  # "centre_corner" on 4 x 4


# ---------------------------------------------------------------- option errors


@pytest.mark.parametrize("option, value", [
    ("max_rank", 0), ("max_rank", True), ("max_rank", 2.0), ("images", ()), ("images", (-1,)),
    ("images", (1, 1)), ("images", "all"), ("block", 0), ("block", 3), ("block", "first"),
    ("centre", "yes"), ("method", "eigh")])
def test_svd_bad_options_raise(option, value):
  zs = [np.zeros((2, 5, 4), np.float32)] * 5  # depth 2, 2x2 grid
  with pytest.raises(ClmimError, match=rf"config\.analysis_options\.svd\.{option}"):
    _analyse(svd, zs, **{option: value})
  with pytest.raises(ClmimError, match=rf"config\.analysis_options\.svd\.{option}"):
    svd.check(types.SimpleNamespace(depth=2), core.resolve_options(svd, {option: value}))


@pytest.mark.parametrize("option, value", [
    ("images", (0, -2)), ("images", None), ("queries", "centre"), ("queries", ((0, 0),)),
    ("queries", ((0, 0), (0, 0))), ("queries", ((4, 0), (0, 0))), ("queries", ((0,), (1, 1))),
    ("blocks", 0), ("blocks", (3,)), ("blocks", "first"), ("blocks", ()), ("heads", "max"),
    ("heads", 3), ("heads", True)])
def test_attention_maps_bad_options_raise(option, value):
  attns = _one_hot_attns(1, 3, 4, 2)
  pattern = rf"config\.analysis_options\.attention_maps\.{option}"
  with pytest.raises(ClmimError, match=pattern):
    _analyse(attention_maps, attns=attns, **{option: value})
  vit = types.SimpleNamespace(depth=2, num_heads=3, image_size=16, patch_size=4)
  with pytest.raises(ClmimError, match=pattern):
    attention_maps.check(vit, core.resolve_options(attention_maps, {option: value}))


@pytest.mark.parametrize("module", [svd, attention_maps])
def test_images_past_the_stream_raise(module):
  zs = [np.ones((3, 17, 4), np.float32)] * 5
  attns = _one_hot_attns(3, 2, 4, 2)
  with pytest.raises(ClmimError, match=rf"analysis_options\.{module.NAME}\.images.* 3 images"):
    _analyse(module, zs, attns, images=(1, 3))


# ---------------------------------------------------------------- through the runner


@pytest.fixture(scope="module")
def setup():
  return analysis_testing.small_vit()


OPTIONS = {"svd": {"images": (69, 0, 33), "block": 1},
           "attention_maps": {"images": (0, 33, 69), "blocks": (1, 2), "heads": "all"}}


def _run(setup, batch_size, devices=8):
  return analysis_testing.run_stream(setup, [svd, attention_maps], batch_size, devices,
                                     options=OPTIONS)


@pytest.fixture(scope="module")
def reference(setup):
  return _run(setup, 64)


@pytest.mark.parametrize("batch_size, devices", [(1, 8), (7, 8), (7, 1)])
def test_runner_results_do_not_depend_on_batching(setup, reference, batch_size, devices):
  got = _run(setup, batch_size, devices)
  # Selected images are copied, never summed with others: bit-identical.
  for key in ("svd_projection", "svd_shift_ratio"):
    np.testing.assert_array_equal(got[key], reference[key], err_msg=key)
  for field in ("maps", "pixels"):
    np.testing.assert_array_equal(got["attention_maps"][field],
                                  reference["attention_maps"][field])
  for key in ("singular_values", "effective_rank", "token_shift_ratio", "query_map_similarity"):
    np.testing.assert_allclose(got[key], reference[key], rtol=1e-6, atol=1e-9, err_msg=key)
  assert got["num_images"] == 70


def test_runner_picks_the_chosen_images(setup, reference):
  forward, params, images = setup
  chosen = reference["attention_maps"]["images"]
  zs, attns = jax.jit(forward)(params, images[np.array(chosen)])  # op by op: ~1.5 s of compiles
  maps = np.asarray(reference["attention_maps"]["maps"])  # [image][query][block][head][g][g]
  assert maps.shape == (3, 2, 2, 4, 4, 4)
  for qi, (x, y) in enumerate(reference["attention_maps"]["queries"]):
    for block in (1, 2):
      want = attention_maps.query_attention_map(attns[block - 1], x, y)
      np.testing.assert_allclose(maps[:, qi, block - 1], want, rtol=1e-4, atol=1e-6)
  assert 0 < min(reference["query_map_similarity"]) < 0.99  # attention is not uniform
  # The inputs the figures show: the chosen images (16 px, patch 4: not pooled), 2 decimals.
  np.testing.assert_allclose(reference["attention_maps"]["pixels"], images[np.array(chosen)],
                             atol=5.01e-3, rtol=0)
  rows = [chosen.index(i) for i in OPTIONS["svd"]["images"]]
  for k, row in enumerate(rows):
    want = svd.projection(np.asarray(zs[0][row, 1:]), np.asarray(zs[1][row, 1:]))
    np.testing.assert_allclose(reference["svd_projection"][k], want, rtol=1e-3, atol=1e-3)


def test_figures(setup, reference, tmp_path):
  results = {"models": {"a": reference, "b": reference},
             "model_info": {"a": {"family": "cl"}, "b": {"family": "random"}}}
  options = {name: core.resolve_options(m, OPTIONS[name])
             for name, m in (("svd", svd), ("attention_maps", attention_maps))}
  svd_figures = svd.figures(results, options["svd"])
  assert set(svd_figures) == {"svd_spectrum.png", "effective_rank.png",
                              "token_shift_ratio.png", "svd_projection.png"}
  map_figures = attention_maps.figures(results, options["attention_maps"])
  assert set(map_figures) == {f"attention_maps_x{x}y{y}_block{b}.png" for x, y in ((2, 2), (1, 1))
                              for b in (1, 2)} | {"query_map_similarity.png"}
  assert all(isinstance(f, Figure) for f in [*svd_figures.values(), *map_figures.values()])
  # The untrained model's dashed curve has a dashed handle, with no marker over its gaps.
  ax = svd_figures["effective_rank.png"].axes[0]
  handles = ax.get_legend().legend_handles
  assert [(h.get_linestyle(), h.get_marker()) for h in handles] == [("-", "None"),
                                                                    ("--", "None")]
  # Every map drawn: 3 images x (the input + 2 models x 4 heads), the query outlined on each,
  # on one colour scale with one colourbar.
  figure = map_figures["attention_maps_x1y1_block2.png"]
  drawn = [a for a in figure.axes if a.images]
  assert len(drawn) == 3 * (1 + 2 * 4) and all(len(a.patches) == 1 for a in drawn)
  inputs, maps = drawn[::9], [a for i, a in enumerate(drawn) if i % 9]
  assert all(a.images[0].get_array().shape == (16, 16, 3) for a in inputs)
  assert inputs[0].patches[0].get_xy() == (1 * 4 - 0.5, 1 * 4 - 0.5)  # query (1, 1), 4 px
  top = np.asarray(reference["attention_maps"]["maps"])[:, 1, 1].max()
  assert {(a.images[0].norm.vmin, a.images[0].norm.vmax) for a in maps} == {(0.0, top)}
  assert [a.get_label() for a in figure.axes if not a.images] == ["<colorbar>"]
  svd_figures["svd_projection.png"].savefig(tmp_path / "projection.png")


def test_image_spectrum_is_the_covariance_of_the_pooled_vectors():
  """Known answer: the eigenvalues of numpy's covariance of the mean patch tokens; images that
  differ along two directions only have effective rank <= 2 and the rest of the spectrum ~0."""
  from clmim.analysis import image_spectrum
  rng = np.random.default_rng(3)
  directions = rng.normal(size=(2, 6))
  pooled = rng.normal(size=(12, 2)) * [3.0, 1.0] @ directions + 5.0  # 12 images, rank 2
  tokens = pooled[:, None, :] + rng.normal(size=(12, 9, 6)) * 0.0  # every token the image's vector
  zs = [_with_cls(tokens, rng)] * 3
  out = image_spectrum.finalize(
      {k: np.asarray(v, np.float64) for k, v in jax.jit(
          lambda z, w, i: core.sums_of(image_spectrum, core.Batch(z, [], w, i, 4),
                                       {"max_rank": 4}))(
          zs, np.ones(12, np.float32), np.arange(12, dtype=np.int32)).items()}, {"max_rank": 4})
  expected = np.sort(np.linalg.eigvalsh(np.cov(pooled.T)))[::-1]
  got = np.exp(np.asarray(out["image_singular_values"])[0])
  np.testing.assert_allclose(got[:2], expected[:2], rtol=1e-4)
  assert np.all(np.nan_to_num(got[2:]) < 1e-3 * expected[0])
  shares = expected[:2] / expected[:2].sum()
  np.testing.assert_allclose(out["image_effective_rank"][0], np.exp(-np.sum(shares * np.log(shares))),
                             rtol=1e-3)
  assert len(out["image_effective_rank"]) == 2  # stages zs[0] and zs[2]
  with pytest.raises(ClmimError, match="max_rank"):
    image_spectrum.check(None, {"max_rank": 0})
