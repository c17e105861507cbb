"""clmim.analysis.bootstrap and clmim.jobs.verdicts: intervals over images that equal a direct
resample of the per-image values, do not depend on batching or devices, are paired across
models, and a verdict per class on constructed inputs."""
import jax
import numpy as np
import pytest

from clmim.analysis import bootstrap, core, nmi, runner
from clmim.analysis.common import weighted_sum
from clmim.errors import ClmimError
from clmim.jobs import verdicts
from tests.analysis_testing import small_vit


class MeanBrightness:
  """A one-number analysis: each image's mean pixel, averaged over the images (known answer)."""
  NAME = "mean_brightness"
  OPTIONS = {}
  RESULTS = (core.Result("brightness", "mean pixel", "[x]", x="block",
                         series=lambda v: v, cl_direction="higher"),)

  @staticmethod
  def partial_sums(batch, options):
    per_image = batch.images.reshape(batch.images.shape[0], -1).mean(axis=1)
    return {"sum": weighted_sum(per_image[:, None], batch.weights)}  # the runner counts

  @staticmethod
  def finalize(sums, options):
    return {"brightness": (np.asarray(sums["sum"]) / float(sums["count"])).tolist()}


def _stream(modules, images, batch_size, devices, device_batch_size, folds=8):
  forward, params, _ = small_vit()
  mesh = runner.make_mesh(jax.devices()[:devices])
  analyzer = runner.Analyzer(forward, modules, 4, mesh=mesh, device_batch_size=device_batch_size,
                             folds=folds)
  batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
  results = analyzer.run(params, batches, progress=False)
  return analyzer, results


def test_fold_weights_partition_the_real_images():
  weights = np.array([1, 1, 1, 1, 1, 0], np.float32)
  index = np.array([0, 1, 2, 3, 9, -1], np.int32)
  folds = np.asarray(bootstrap.fold_weights(weights, index, 3))
  assert folds.shape == (3, 6)
  np.testing.assert_array_equal(folds.sum(axis=0), weights)
  np.testing.assert_array_equal(folds[0], [1, 0, 0, 1, 1, 0])  # 0, 3 and 9 are in fold 0


def test_a_replicate_is_the_mean_of_the_images_its_draw_picks():
  """Known answer: a replicate's brightness is the count-weighted mean of the images' own
  brightness, image i weighted by the draw count of fold i mod G."""
  _, _, images = small_vit()
  analyzer, results = _stream([MeanBrightness], images, 16, devices=4, device_batch_size=4)
  per_image = images.reshape(len(images), -1).mean(axis=1)
  assert results["brightness"][0] == pytest.approx(per_image.mean(), abs=1e-6)
  draws = bootstrap.draws(8, 50, seed=3)
  table = analyzer.replicate_curves(draws)["brightness"][:, 0]
  fold = np.arange(len(images)) % 8
  for counts, value in zip(draws, table):
    w = counts[fold]
    assert value == pytest.approx((w * per_image).sum() / w.sum(), abs=1e-6)
  low, high = bootstrap.percentile_interval(table)
  assert low < per_image.mean() < high


def test_intervals_do_not_depend_on_batches_or_devices():
  _, _, images = small_vit()
  draws = bootstrap.draws(8, 40, seed=0)
  tables = []
  for batch_size, devices in ((7, 1), (32, 8)):
    analyzer, _ = _stream([nmi], images, batch_size, devices=devices, device_batch_size=4)
    tables.append(analyzer.replicate_curves(draws)["nmi"])
  np.testing.assert_allclose(tables[0], tables[1], rtol=1e-5, atol=1e-7)


def test_draws_are_shared_by_a_seed_and_differ_across_seeds():
  a, b = bootstrap.draws(16, 100, 0), bootstrap.draws(16, 100, 0)
  np.testing.assert_array_equal(a, b)
  assert (a.sum(axis=1) == 16).all()
  assert not np.array_equal(a, bootstrap.draws(16, 100, 1))


def test_analyses_that_opt_out_or_are_too_large_are_named():
  _, _, images = small_vit()

  class Chosen(MeanBrightness):
    NAME = "chosen"
    BOOTSTRAP = False

  analyzer, _ = _stream([MeanBrightness, Chosen], images[:8], 8, devices=2, device_batch_size=4)
  assert set(analyzer.fold_sums) == {"mean_brightness"}
  assert "not a mean over the images" in analyzer.unfolded["chosen"]


@pytest.mark.parametrize("folds, replicates, seed, field", [
    (1, 1000, 0, "folds"), (-2, 1000, 0, "folds"), (True, 1000, 0, "folds"),
    (8, 5, 0, "replicates"), (8, 1000, -1, "seed")])
def test_bad_settings_are_one_error_naming_the_field(folds, replicates, seed, field):
  with pytest.raises(ClmimError, match=rf"config\.intervals\.{field}"):
    bootstrap.check_settings(folds, replicates, seed)


# ---------------------------------------------------------------- verdicts, one per class

@pytest.mark.parametrize("gap, gap_interval, untrained_gap, shifts, expected", [
    (0.5, None, 0.0, {}, "inconclusive"),                          # no interval
    (-0.5, (-0.6, -0.4), 0.0, {}, "not reproduced"),              # opposite, beyond interval
    (0.1, (-0.05, 0.25), 0.0, {}, "inconclusive"),                 # gap inside the interval
    (0.5, (0.4, 0.6), None, {}, "inconclusive"),                   # no untrained copies
    (0.5, (0.4, 0.6), 0.3, {"CL": (0.1, 0.2), "MIM": (0.1, 0.2)}, "architectural"),
    (0.5, (0.4, 0.6), 0.1, {"CL": (0.1, 0.3), "MIM": (0.05, 0.2)}, "reproduced"),
    (0.5, (0.4, 0.6), 0.1, {"CL": (-0.3, -0.1), "MIM": (0.5, 0.7)}, "inconclusive"),
])
def test_each_verdict_class(gap, gap_interval, untrained_gap, shifts, expected):
  verdict, reason = verdicts.decide(gap, gap_interval, untrained_gap, shifts)
  assert verdict == expected and reason
  if expected == "inconclusive" and shifts:
    assert "CL" in reason and "MIM" not in reason  # names the model training moved the wrong way


def _results(values, copies=True):
  """A results dict with a CL, a MIM model and (optionally) their untrained copies, each with a
  one-block brightness curve."""
  info = {"cl": {"family": "cl"}, "mim": {"family": "mim"}}
  if copies:
    info["cl (untrained)"] = {"family": "random", "architecture_of": "cl"}
    info["mim (untrained)"] = {"family": "random", "architecture_of": "mim"}
  return {"models": {n: {"brightness": [values[n]]} for n in info}, "model_info": info}


def _replicates(values, spread, seed=0):
  rng = np.random.default_rng(seed)
  noise = rng.normal(size=(200, 1))  # paired: the same draws shift every model alike
  return {n: {"brightness": v + spread * noise + 0.01 * spread * rng.normal(size=(200, 1))}
          for n, v in values.items()}


@pytest.mark.parametrize("values, spread, expected", [
    # CL above MIM, both trained away from copies that sit between them: reproduced.
    ({"cl": 2.0, "mim": 1.0, "cl (untrained)": 1.5, "mim (untrained)": 1.5}, 0.05, "reproduced"),
    # The copies already hold the gap: architectural.
    ({"cl": 2.0, "mim": 1.0, "cl (untrained)": 1.9, "mim (untrained)": 1.0}, 0.05,
     "architectural"),
    # A gap far smaller than the noise (independent noise per model): inconclusive.
    ({"cl": 1.01, "mim": 1.0, "cl (untrained)": 1.0, "mim (untrained)": 1.0}, None,
     "inconclusive"),
    # The opposite of the paper beyond the interval.
    ({"cl": 1.0, "mim": 2.0, "cl (untrained)": 1.5, "mim (untrained)": 1.5}, 0.05,
     "not reproduced"),
])
def test_findings_from_constructed_replicates(values, spread, expected):
  results = _results(values)
  if spread is None:  # unpaired noise of 0.2 per model: the 0.01 gap is lost in it
    rng = np.random.default_rng(1)
    replicates = {n: {"brightness": v + 0.2 * rng.normal(size=(200, 1))}
                  for n, v in values.items()}
  else:
    replicates = _replicates(values, spread)
  (finding,) = verdicts.findings(results, [MeanBrightness], replicates)
  assert finding["verdict"] == expected, finding["reason"]
  assert finding["gap"] == pytest.approx(values["cl"] - values["mim"])
  low, high = finding["gap_interval"]
  assert low <= finding["gap"] <= high


def test_a_run_without_intervals_or_copies_is_inconclusive_and_says_why():
  values = {"cl": 2.0, "mim": 1.0, "cl (untrained)": 1.5, "mim (untrained)": 1.5}
  (finding,) = verdicts.findings(_results(values), [MeanBrightness])
  assert (finding["verdict"], finding["reason"]) == ("inconclusive", "no bootstrap interval")
  results = _results(values, copies=False)
  (finding,) = verdicts.findings(results, [MeanBrightness], _replicates(values, 0.05))
  assert finding["verdict"] == "inconclusive" and "no untrained copies" in finding["reason"]


def test_each_replicate_matches_one_replicate_at_a_time_in_any_chunk():
  rng = np.random.default_rng(3)
  fold_sums = {"a": rng.normal(size=(8, 3, 2)), "b": {"c": rng.normal(size=(8,))}}
  totals = {"a": None, "b": None, "count": 5.0}
  counts = bootstrap.draws(8, 50, 1)
  expected = [bootstrap.replicate_sums(fold_sums, totals, row) for row in counts]
  for chunk in (1, 7, 1 << 24):
    got = list(bootstrap.each_replicate(fold_sums, totals, counts, chunk_numbers=chunk))
    assert len(got) == 50
    for want, have in zip(expected, got):
      assert have["count"] == 5.0
      np.testing.assert_allclose(have["a"], want["a"], rtol=1e-12)
      np.testing.assert_allclose(have["b"]["c"], want["b"]["c"], rtol=1e-12)
