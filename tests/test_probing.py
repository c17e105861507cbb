"""Linear probes and noise robustness: known answers, float64 references, invariance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clmim.analysis import linear_probe as lp
from clmim.analysis import probing, robustness, runner
from clmim.data.eval_data import Labels
from clmim.errors import ClmimError

DEPTH, WIDTH = 2, 8


def _forward(params, images):
  """A stand-in model whose every block outputs the image's first pixel as cls and patch token:
  the probes then see exactly the features the test chose (after the parameter-free norm)."""
  x = images[:, 0, 0, :] * params["scale"]
  z = jnp.stack([x, x, x], axis=1)  # [b, 1 + 2 tokens, D]
  return [z] * (2 * DEPTH + 1), []


PARAMS = {"scale": jnp.ones(())}


def _images(features):
  return np.asarray(features, np.float32)[:, None, None, :]


class _Set:
  """What `ProbeData` hands a probe: images, labels, a description."""

  def __init__(self, features, columns, values, classes):
    self.images = _images(features)
    self.labels = Labels(tuple(columns), np.asarray(values, np.int64).reshape(len(features), -1),
                         {c: tuple(str(i) for i in range(classes)) for c in columns})
    self.description = f"{len(features)} test images"

  def column(self, name):
    return self.labels.values[:, self.labels.columns.index(name)]


class _Data:
  synthetic = False
  targets = ("label",)
  decision = ("independent", "label")

  def __init__(self, train, evaluation):
    self._train, self._evaluation = train, evaluation

  def train(self, pairing="independent"):
    return self._train

  def evaluation(self, pairing="independent"):
    return self._evaluation

  def cue_conflict(self):
    return None


class _Passes:
  """`clmim.analysis.session.Passes` on arrays, with a chosen device count and batch."""

  def __init__(self, devices=8, device_batch_size=4, batch_size=13):
    self.cache, self.devices, self.dbs, self.batch = {}, devices, device_batch_size, batch_size

  def run(self, stage, images, labels, context, desc):
    mesh = runner.make_mesh(jax.devices()[:self.devices])
    analyzer = runner.Analyzer(_forward, [stage], 1, mesh=mesh, device_batch_size=self.dbs,
                               options={stage.NAME: stage.OPTIONS})
    batches = (images[i:i + self.batch] for i in range(0, len(images), self.batch))
    return analyzer.run(PARAMS, batches, progress=False, labels=labels, context=context)


def _blobs(n, classes=4, spread=0.3, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(classes, size=n)
  centres = 3.0 * np.eye(WIDTH)[:classes]
  return centres[labels] + spread * rng.normal(size=(n, WIDTH)), labels


def _measure(train, evaluation, passes=None, **options):
  data = _Data(_Set(train[0], ["label"], train[1], 4),
               _Set(evaluation[0], ["label"], evaluation[1], 4))
  options = {**probing.OPTIONS, "cue_conflict": False, **options}
  return probing.measure(None, data, passes or _Passes(), options)


def test_separable_blobs_are_probed_perfectly():
  out = _measure(_blobs(300), _blobs(200, seed=1))
  for kind in probing.KINDS:
    assert out[f"probe_label_{kind}"] == [1.0] * DEPTH
  details = out["probing_details"]["targets"]["label"]
  assert details["chance"] == 0.25 and details["evaluation_images"] == 200
  only_cls = _measure(_blobs(300), _blobs(200, seed=1), features="cls")
  assert [k for k in only_cls if k.startswith("probe_")] == ["probe_label_cls"]
  assert details["train_images"] == 300 and 20 <= details["holdout_images"] <= 40


def test_labels_independent_of_the_features_give_chance():
  features, _ = _blobs(600, seed=2)
  rng = np.random.default_rng(3)
  evaluation, _ = _blobs(1000, seed=4)
  out = _measure((features, rng.integers(4, size=600)), (evaluation, rng.integers(4, size=1000)))
  for kind in probing.KINDS:
    # 1000 images at p = 0.25: std 0.014; 4.5 std either side.
    assert all(abs(v - 0.25) < 0.065 for v in out[f"probe_label_{kind}"])


def test_ridge_matches_a_float64_reference():
  sklearn = pytest.importorskip("sklearn.linear_model")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6)) + 2.0
  y = np.eye(3)[rng.integers(3, size=50)]
  m = lp.Moments.of(x, y)
  for alpha in (1e-4, 0.1, 3.0):
    w, b = lp.fit(m, alpha)
    cov = np.cov(x.T, bias=True)
    reference = sklearn.Ridge(alpha=alpha * np.trace(cov) / 6 * 50).fit(x, y)
    np.testing.assert_allclose(w, reference.coef_.T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b, reference.intercept_, rtol=1e-8, atol=1e-10)
    direct = ((x @ w + b - y) ** 2).sum()
    assert lp.squared_error(w, b, lp.Moments.of(x[:20], y[:20])) == pytest.approx(
        ((x[:20] @ w + b - y[:20]) ** 2).sum(), rel=1e-9)
    assert lp.squared_error(w, b, m) == pytest.approx(direct, rel=1e-9)


def test_the_ridge_is_chosen_on_the_held_out_error():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(40, 30))  # more features than the fit set can pin down: ridge matters
  y = np.eye(2)[(x[:, 0] > 0).astype(int)]
  fit, held = lp.Moments.of(x[:25], y[:25]), lp.Moments.of(x[25:], y[25:])
  grid = (1e-6, 1e-2, 1.0, 100.0)
  probe = lp.select(fit, held, grid)
  errors = [((x[25:] @ w + b - y[25:]) ** 2).sum() / 15 for w, b in lp.fit_path(fit, grid)]
  np.testing.assert_allclose(probe.holdout_error, errors, rtol=1e-8)
  assert probe.ridge == grid[int(np.argmin(errors))]
  np.testing.assert_allclose(probe.weights, lp.fit(fit + held, probe.ridge)[0])
  with pytest.raises(ClmimError, match="held-out"):
    lp.select(fit, lp.Moments.of(x[:0], y[:0]), grid)


def test_streamed_moments_match_numpy_and_do_not_depend_on_batching_or_devices():
  features, labels = _blobs(37, seed=5)
  rows = np.stack([probing.holdout_rows(37, 0.25), labels], axis=1)
  stage = probing.fit_stage((("label", 4),))
  runs = [_Passes(d, s, b).run(stage, _images(features), rows, None, "")
          for d, s, b in ((8, 4, 13), (1, 5, 37), (2, 3, 7), (8, 1, 1))]
  x = np.asarray(probing.normalised(jnp.asarray(features)), np.float64)
  for p in (0, 1):
    part = rows[:, 0] == p
    reference = lp.Moments.of(x[part], np.eye(4)[labels[part]])
    for sums in runs:
      got = probing._moments(sums, p, "label", 1, 0)
      assert got.n == reference.n
      for name in ("sx", "sxx", "sxy", "sy"):
        np.testing.assert_allclose(getattr(got, name), getattr(reference, name), rtol=2e-5,
                                   atol=2e-5)


def test_robustness_counts_do_not_depend_on_batching_or_devices():
  features, labels = _blobs(29, seed=6)
  images = np.tile(_images(features), (1, 4, 4, 1))[..., :3]  # [29, 4, 4, 3]: noise has room
  conditions = robustness._conditions(4, {**robustness.OPTIONS, "bands": (0.3, 0.8),
                                          "band_width": 0.5, "white_rms": (0.5,)})
  rng = np.random.default_rng(0)
  context = {"weights": rng.normal(size=(3, 4)).astype(np.float32),
             "bias": np.zeros(4, np.float32), "std": np.full(3, 0.5, np.float32), **conditions}
  stage = robustness.noisy_stage(2, "mean_tokens", seed=3)

  def forward(params, x):  # the mean of each image's pixels as its tokens
    z = jnp.repeat(x.reshape(x.shape[0], 1, -1, 3).mean(2), 3, axis=1)
    return [z] * (2 * DEPTH + 1), []

  results = []
  for devices, size, batch in ((8, 2, 5), (1, 7, 29), (4, 3, 11)):
    mesh = runner.make_mesh(jax.devices()[:devices])
    analyzer = runner.Analyzer(forward, [stage], 1, mesh=mesh, device_batch_size=size,
                               options={stage.NAME: {}})
    out = analyzer.run(PARAMS, (images[i:i + batch] for i in range(0, 29, batch)),
                       progress=False, labels=labels, context=context)
    results.append((float(out["clean"]), np.asarray(out["noisy"]).tolist(),
                    float(out["labelled_count"])))
  assert results[0] == results[1] == results[2]
  assert results[0][2] == 29 and len(results[0][1]) == 3


# ---------------------------------------------------------------- the k-NN probe

def _knn_reference(train, evaluation, k=20, temperature=0.07):
  """float64 weighted k-NN top-1 (DINO's vote) on the stand-in's features."""
  def unit(f):
    x = np.asarray(probing.normalised(jnp.asarray(f)), np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
  memory, queries = unit(train[0]), unit(evaluation[0])
  hits = 0
  for q, label in zip(queries, evaluation[1]):
    sims = memory @ q
    top = np.argsort(-sims, kind="stable")[:k]
    votes = np.zeros(4)
    np.add.at(votes, train[1][top], np.exp(sims[top] / temperature))
    hits += int(np.argmax(votes) == label)
  return hits / len(evaluation[1])


def test_knn_separable_clusters_are_found_perfectly_and_noise_gives_chance():
  out = _measure(_blobs(80, seed=11), _blobs(40, seed=12), knn_k=5)
  for kind in probing.KINDS:
    assert out[f"knn_label_{kind}"] == [1.0] * DEPTH
  assert out["probing_details"]["knn"]["memory_images"] == 80
  rng = np.random.default_rng(13)
  noise = lambda n: (rng.normal(size=(n, WIDTH)), rng.integers(4, size=n))
  top1 = _measure(noise(400), noise(400), knn_k=20)["knn_label_cls"]
  assert all(abs(v - 0.25) < 0.08 for v in top1), top1


@pytest.mark.slow
def test_knn_matches_a_float64_reference_for_any_batching_and_device_count():
  train, evaluation = _blobs(60, spread=1.2, seed=14), _blobs(45, spread=1.2, seed=15)
  reference = _knn_reference(train, evaluation, k=7, temperature=0.1)
  assert 0.4 < reference < 1  # the clusters overlap: a non-trivial answer
  results = [_measure(train, evaluation, _Passes(d, s, b), knn_k=7, knn_temperature=0.1,
                      ridge_grid=(1.0,), holdout_fraction=0.0)["knn_label_mean_tokens"]
             for d, s, b in ((8, 4, 13), (1, 5, 45), (2, 3, 7))]
  assert results[0] == results[1] == results[2]
  np.testing.assert_allclose(results[0], [reference] * DEPTH, atol=1e-12)


def test_knn_votes_are_weighted_by_similarity_over_temperature():
  similarity = jnp.asarray([[0.9, 0.5, 0.5, -jnp.inf]])  # one query, a 4-image memory
  labels = jnp.asarray([1, 0, 0, 1])
  sharp = probing.knn_probe.votes(similarity, labels, 3, 0.07, 2)
  flat = probing.knn_probe.votes(similarity, labels, 3, 10.0, 2)
  assert int(jnp.argmax(sharp[0])) == 1  # one close neighbour outweighs two far ones
  assert int(jnp.argmax(flat[0])) == 0  # at a high temperature the majority wins
  np.testing.assert_allclose(sharp[0, 0] / sharp[0, 1], 2 * np.exp(-0.4 / 0.07), rtol=1e-5)
  four = probing.knn_probe.votes(similarity, labels, 4, 0.07, 2)  # -inf: not in the memory
  np.testing.assert_allclose(four, sharp, rtol=1e-6)


def test_knn_memory_cap_and_bad_options_are_refused_before_compute():
  out = _measure(_blobs(50, seed=16), _blobs(20, seed=17), knn_k=3, knn_train_images=10)
  assert out["probing_details"]["knn"]["memory_images"] == 10
  assert "knn_label_cls" not in _measure(_blobs(30, seed=16), _blobs(10, seed=17), knn_k=0)
  for bad, field in (({"knn_k": -1}, "knn_k"), ({"knn_k": 2.5}, "knn_k"),
                     ({"knn_temperature": 0}, "knn_temperature"),
                     ({"knn_train_images": -3}, "knn_train_images")):
    with pytest.raises(ClmimError, match=f"probing.{field}="):
      probing.check_options({**probing.OPTIONS, **bad})
  features, labels = _blobs(12)
  data = _Data(_Set(features, ["label"], labels, 4), None)
  with pytest.raises(ClmimError, match="knn_k=20: the k-NN memory holds 12"):
    probing.check_training_set(data, {**probing.OPTIONS, "ridge_grid": (1.0,),
                                      "holdout_fraction": 0.0})
