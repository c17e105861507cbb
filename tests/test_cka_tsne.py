"""Linear CKA and token k-NN / t-SNE: known answers, a float64 reference and exact streaming."""
import importlib.util
import io
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import analysis_testing

from clmim.analysis import cka, plots, tsne
from clmim.errors import ClmimError
from clmim.models.vit import build_vit

FAST_TSNE = {"iterations": 250, "perplexity": 5.0}


@pytest.fixture(autouse=True, scope="module")
def one_openmp_thread():
  """scikit-learn's t-SNE on one OpenMP thread: its threads wait for each other by spinning, and
  with the test workers sharing the cores that costs seconds per embedding (96 points: 0.6-3.4 s
  on two threads, 0.08 s on one); the embedding is the same, bit for bit. scikit-learn loads its
  OpenMP library on import: imported first, so that the limit reaches it."""
  from threadpoolctl import threadpool_limits
  try:
    import sklearn.manifold  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    pass  # the t-SNE tests say what is missing
  with threadpool_limits(1, user_api="openmp"):
    yield


def _ref_cka(x, y):
  """Linear CKA from the definition, float64 (Kornblith et al. 2019, eq. for linear kernels)."""
  x = x - x.mean(0)
  y = y - y.mean(0)
  return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _cka_results(zs, weights=None, options=None):
  b = zs[0].shape[0]
  weights = np.ones(b, np.float32) if weights is None else weights
  sums = jax.jit(lambda z, w: analysis_testing.partial_sums(cka, z, None, w, options=options))(
      [jnp.asarray(z) for z in zs], jnp.asarray(weights))
  return analysis_testing.finalize(cka, sums, options)


def _random_zs(rng, b=40, n=9, d=12, depth=3):
  return [(rng.normal(size=(b, n + 1, d)) + rng.normal(size=d) * 2).astype(np.float32)
          for _ in range(2 * depth + 1)]


def test_cka_self_orthogonal_and_scaling_are_one():
  rng = np.random.default_rng(0)
  zs = _random_zs(rng)
  q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  # Stage 1 = stage 0 rotated, scaled and shifted: every invariance of linear CKA at once.
  zs[2] = (zs[0] @ q * 3.5 + 7.0).astype(np.float32)
  res = _cka_results(zs)
  for key in ("cka_mean_tokens", "cka_cls"):
    m = np.asarray(res[key])
    np.testing.assert_allclose(np.diag(m), 1.0, rtol=1e-6)
    np.testing.assert_allclose(m[0, 1], 1.0, rtol=5e-5)  # float32 sums, |mean| > std
    np.testing.assert_allclose(m, m.T)
    assert m[0, 2] < 0.9  # unrelated random stages are not similar
  assert res["cka_adjacent"][0] == pytest.approx(1.0, rel=5e-5)


def test_cka_matches_float64_reference_with_padding():
  rng = np.random.default_rng(1)
  zs = _random_zs(rng)
  zs[4] = (0.6 * zs[2] + 0.4 * zs[4]).astype(np.float32)  # partly related stages
  weights = np.ones(40, np.float32)
  weights[[3, 17, 39]] = 0
  padded = [z.copy() for z in zs]
  for z in padded:
    z[[3, 17, 39]] = np.nan  # padding must not leak, whatever it holds
  res = _cka_results(padded, weights)
  real = weights > 0
  for key, feature in (("cka_mean_tokens", lambda z: z[:, 1:].mean(1)),
                       ("cka_cls", lambda z: z[:, 0])):
    feats = [feature(z[real].astype(np.float64)) for z in zs[0::2]]
    want = [[_ref_cka(a, b) for b in feats] for a in feats]
    np.testing.assert_allclose(res[key], want, rtol=2e-5, err_msg=key)
  feats = [z[real, 1:].astype(np.float64).mean(1) for z in zs[0::2]]
  np.testing.assert_allclose(res["cka_adjacent"], [_ref_cka(feats[i], feats[i + 1])
                                                   for i in range(3)], rtol=2e-5)


def _ref_unbiased_cka(x, y):
  """Unbiased linear CKA from its definition with explicit n x n Gram matrices (float64)."""
  def hsic(k, l):
    n = len(k)
    k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    ones = np.ones(n)
    return (np.trace(k @ l) + ones @ k @ ones * (ones @ l @ ones) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * ones @ k @ l @ ones) / (n * (n - 3))
  k, l = x @ x.T, y @ y.T
  return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def test_unbiased_cka_matches_its_definition_with_padding():
  rng = np.random.default_rng(4)
  zs = _random_zs(rng)
  zs[4] = (0.6 * zs[2] + 0.4 * zs[4]).astype(np.float32)
  weights = np.ones(40, np.float32)
  weights[[0, 21]] = 0
  padded = [z.copy() for z in zs]
  for z in padded:
    z[[0, 21]] = np.nan
  res = _cka_results(padded, weights)
  feats = [z[weights > 0, 1:].astype(np.float64).mean(1) for z in zs[0::2]]
  want = [[_ref_unbiased_cka(a, b) for b in feats] for a in feats]
  # Float32 sums of uncentred products (the features' mean is ~2x their spread here): ~1e-4.
  np.testing.assert_allclose(res["cka_unbiased_mean_tokens"], want, rtol=0, atol=5e-4)


def test_unbiased_cka_of_independent_features_is_near_zero_where_the_biased_one_is_not():
  """Known answer: for independent features with D comparable to n, plain linear CKA sits far
  above 0 (its floor is ~D/n), the unbiased estimator near 0."""
  rng = np.random.default_rng(5)
  n, d = 200, 64
  zs = [rng.normal(size=(n, 2, d)).astype(np.float32) for _ in range(3)]  # depth 1, 2 stages
  res = _cka_results(zs, options={"features": "mean_tokens"})
  biased = res["cka_mean_tokens"][0][1]
  unbiased = res["cka_unbiased_mean_tokens"][0][1]
  assert biased > 0.2  # seeds 0-3: 0.24-0.25
  assert abs(unbiased) < 0.03  # seeds 0-3: |.| <= 0.008
  np.testing.assert_allclose(np.diag(res["cka_unbiased_mean_tokens"]), 1.0, rtol=1e-5)


def test_mutual_knn_known_answers():
  """Rotated and scaled features keep every neighbourhood (1); independent ones share about
  k/(n-1) by chance; bad options are one error naming both fields."""
  from clmim.analysis.between_models import mutual_knn
  rng = np.random.default_rng(0)
  a = rng.normal(size=(300, 16))
  q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
  assert mutual_knn(a, 3 * a @ q, 10) == 1.0
  assert mutual_knn(a, rng.normal(size=(300, 8)), 10) == pytest.approx(10 / 299, abs=0.02)
  for k, images in ((0, 100), (10, 10), (True, 100), (10, -1)):
    with pytest.raises(ClmimError, match="mutual_knn_k / mutual_knn_images"):
      cka.mutual_knn_settings({"mutual_knn_k": k, "mutual_knn_images": images})
  assert cka.mutual_knn_settings({"mutual_knn_k": 10, "mutual_knn_images": 0}) == (10, 0)


def test_cka_options_stages_features_and_constant_stage():
  rng = np.random.default_rng(2)
  zs = _random_zs(rng)
  zs[0][:, 0] = 1.5  # a cls token that is the same for every image (as at the embedding)
  full = _cka_results(zs)
  assert np.isnan(full["cka_cls"][0]).all() and not np.isnan(full["cka_cls"][1][1:]).any()
  opts = {"features": "mean_tokens", "stages": (1, 3, 2)}
  part = _cka_results(zs, options=opts)
  assert part["cka_cls"] is None
  np.testing.assert_allclose(part["cka_mean_tokens"],
                             np.asarray(full["cka_mean_tokens"])[1:, 1:], rtol=1e-6)
  # The adjacent curve spans every block whatever the chosen stages.
  np.testing.assert_allclose(part["cka_adjacent"], full["cka_adjacent"], rtol=1e-6)
  assert cka.stage_pairs(4, [1, 3], True) == [(0, 0), (0, 1), (1, 1), (1, 2), (1, 3), (2, 2),
                                              (2, 3), (3, 3)]
  vit = build_vit("mu/4", image_size=16, depth=3)
  with pytest.raises(ClmimError, match="stages"):
    cka.check(vit, {**cka.OPTIONS, "stages": (0, 4)})
  with pytest.raises(ClmimError, match="features"):
    cka.check(vit, {**cka.OPTIONS, "features": "patch"})


def _stream_sums(module, zs, batch_size, options, pad_to=None):
  """partial_sums over a stream cut into batches (each padded to `pad_to`), added in float64.
  One jitted step for the whole stream, as the runner has (op by op, the first batch of each
  shape compiles every operation on its own: seconds)."""
  step = jax.jit(lambda z, w, i: analysis_testing.partial_sums(module, z, None, w, index=i,
                                                                options=options))
  total = None
  b = zs[0].shape[0]
  for start in range(0, b, batch_size):
    idx = np.arange(start, min(start + batch_size, b))
    pad = (pad_to or len(idx)) - len(idx)
    index = np.concatenate([idx, np.full(pad, -1)]).astype(np.int32)
    part = [np.concatenate([z[idx], np.full((pad,) + z.shape[1:], np.nan, np.float32)])
            for z in zs]
    weights = (index >= 0).astype(np.float32)
    sums = step([jnp.asarray(z) for z in part], weights, jnp.asarray(index))
    sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
    total = sums if total is None else {k: total[k] + sums[k] for k in total}
  return total


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_tsne_gathers_each_chosen_image_exactly_once(batch_size):
  rng = np.random.default_rng(3)
  zs = _random_zs(rng, b=50, n=16, d=6, depth=2)
  options = {"images": (3, 0, 49, 21, 60), "state": 3, "max_tokens_per_image": 5}
  sums = _stream_sums(tsne, zs, batch_size, options, pad_to=8 if batch_size == 7 else None)
  np.testing.assert_array_equal(sums["found"], [1, 1, 1, 1, 0])  # 60 is past the stream
  keep = tsne.token_indices(16, 5)
  assert keep.tolist() == [0, 4, 8, 11, 15]
  chosen = [3, 0, 49, 21]
  np.testing.assert_array_equal(sums["state_tokens"][:4], zs[3][chosen][:, 1:][:, keep])
  for s, z in enumerate(zs[0::2]):
    np.testing.assert_array_equal(sums["stage_tokens"][s, :4], z[chosen][:, 1:][:, keep])


def test_knn_copies_per_image_give_accuracy_one_and_embedding_shape():
  rng = np.random.default_rng(4)
  vectors = rng.normal(size=(10, 1, 1, 8)).astype(np.float32)
  zs = [np.broadcast_to(vectors * (s + 1), (10, 1, 17, 8)).reshape(10, 17, 8).copy()
        for s in range(5)]
  options = {"images": 6, **FAST_TSNE}
  res = analysis_testing.finalize(tsne, _stream_sums(tsne, zs, 4, options), options)
  assert res["tsne_knn_image_accuracy"] == [1.0, 1.0, 1.0]
  assert res["tsne_knn_image_accuracy_state"] == 1.0
  assert 0.0 <= res["tsne_knn_image_accuracy_2d"] <= 1.0
  assert np.asarray(res["tsne_embedding"]).shape == (6, 16, 2)
  assert res["tsne_images"] == list(range(6))


def test_knn_accuracy_known_answers():
  # Two well separated clusters, one point labelled against its cluster: 1 of 8 is wrong.
  points = np.array([[0, 1], [0, 1.1], [0.1, 1], [0.05, 1.05], [1, 0], [1.1, 0], [1, 0.1],
                     [1, 0.05]])
  labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
  assert tsne.knn_accuracy(points, labels, 3, "euclidean") == pytest.approx(7 / 8)
  # Random labels on random points sit near chance.
  rng = np.random.default_rng(5)
  acc = tsne.knn_accuracy(rng.normal(size=(600, 5)), rng.integers(0, 6, 600), 5, chunk=128)
  assert abs(acc - 1 / 6) < 0.08
  with pytest.raises(ClmimError, match="k-NN"):
    tsne.knn_accuracy(points, labels, 8)


def test_tsne_figure_says_which_colour_is_which_image():
  rng = np.random.default_rng(3)
  results = {"models": {name: {"tsne_embedding": rng.normal(size=(3, 5, 2)).tolist(),
                               "tsne_images": [0, 5, 33]} for name in ("a", "b")}}
  fig = tsne.figures(results, tsne.OPTIONS)["tsne.png"]
  keys = [ax for ax in fig.axes if ax.images]
  assert len(keys) == 1  # one key for the whole figure: the colours mean the same in every panel
  [key] = keys
  assert [t.get_text() for t in key.get_xticklabels()] == ["0", "5", "33"]
  assert "image" in key.get_xlabel()
  # Cell i has the colour of image i's points.
  panel = fig.axes[0]
  for i, points in enumerate(panel.collections):
    np.testing.assert_allclose(key.images[0].get_array()[0, i], points.get_facecolor()[0][:3])


def test_tsne_reports_missing_sklearn_before_compute(monkeypatch):
  vit = build_vit("mu/4", image_size=16, depth=2)
  tsne.check(vit, tsne.OPTIONS)
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "sklearn" else real(name, *a))
  with pytest.raises(ClmimError, match="pip install scikit-learn"):
    tsne.check(vit, tsne.OPTIONS)
  monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
  with pytest.raises(ClmimError, match="pip install scikit-learn"):
    tsne.embed(np.zeros((30, 3)), tsne.OPTIONS)
  monkeypatch.undo()
  assert tsne.state_index({"state": "-2"}, 5) == 3  # a string set from the command line
  # "official": the notebook's zs[10] of 12 blocks, the same relative depth elsewhere.
  assert tsne.state_index({"state": "official"}, 25) == 10
  assert [tsne.state_index({"state": "official"}, 2 * d + 1) for d in (1, 2, 6, 24)] == \
      [2, 2, 6, 20]
  for bad in ({"state": 5}, {"images": (1, 1)}, {"iterations": 100}):
    with pytest.raises(ClmimError):
      tsne.check(vit, {**tsne.OPTIONS, **bad})


# ------------------------------------------------------------- through the runner, a real ViT


@pytest.fixture(scope="module")
def setup():
  return analysis_testing.small_vit()


OPTIONS = {"tsne": {"images": (0, 5, 33, 64, 69, 90), **FAST_TSNE}}


def _run(setup, batch_size, devices=8):
  return analysis_testing.run_stream(setup, [cka, tsne], batch_size, devices, options=OPTIONS)


@pytest.fixture(scope="module")
def reference(setup):
  return _run(setup, 64)


def _assert_same(got, want, rtol):
  for key in ("cka_mean_tokens", "cka_cls", "cka_adjacent", "tsne_embedding"):
    np.testing.assert_allclose(np.asarray(got[key], np.float64),
                               np.asarray(want[key], np.float64), rtol=rtol, atol=1e-6,
                               err_msg=key)
  for key in ("tsne_knn_image_accuracy", "tsne_knn_image_accuracy_state",
              "tsne_knn_image_accuracy_2d", "tsne_images", "num_images"):
    assert got[key] == want[key], key


@pytest.mark.parametrize("batch_size", [1, 7])
def test_runner_batch_size_invariance(setup, reference, batch_size):
  _assert_same(_run(setup, batch_size), reference, rtol=1e-9)


def test_runner_one_vs_eight_devices(setup, reference):
  _assert_same(_run(setup, 7, devices=1), reference, rtol=1e-6)  # measured 3e-9; psum order


def test_runner_values_and_figures(reference):
  assert reference["num_images"] == 70 and reference["tsne_images"] == [0, 5, 33, 64, 69]
  m = np.asarray(reference["cka_mean_tokens"])
  assert m.shape == (3, 3) and np.all((m > 0) & (m <= 1 + 1e-9))
  assert np.isnan(reference["cka_cls"][0]).all()  # the cls token is constant at the embedding
  assert len(reference["cka_adjacent"]) == 2 and len(reference["tsne_knn_image_accuracy"]) == 3
  results = {"models": {"a": reference, "b": reference},
             "model_info": {"a": {"family": "cl"}, "b": {"family": "mim"}}}
  figs = {**plots.analysis_figures(results, cka, cka.OPTIONS),
          **plots.analysis_figures(results, tsne, tsne.OPTIONS)}
  assert sorted(figs) == ["cka.png", "cka_adjacent.png", "tsne.png",
                          "tsne_knn_image_accuracy.png"]
  for fig in figs.values():
    fig.savefig(io.BytesIO(), format="png", dpi=40)
