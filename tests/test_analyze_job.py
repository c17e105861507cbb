"""The analysis job in-process: model naming, summary, and the uniform-attention reference."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from clmim.analysis import attention_distance, fourier, nmi
from clmim.jobs import analyze, report, verdicts
from clmim.errors import ClmimError
from tiny_checkpoints import save_random_checkpoint
from configs import analyze as all_config
from configs import pretrain_moco_v3, pretrain_simmim


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt") / "step_10"
  save_random_checkpoint(path, pretrain_simmim, steps=10)
  return path


def _manifest_name(path) -> str:
  """The name a checkpoint's manifest gives it (what results show, before any folder tag)."""
  return json.loads((path / "manifest.json").read_text())["name"]


def test_uniform_attention_distance_brute_force():
  grid, patch = 3, 2
  coords = [(r, c) for r in range(grid) for c in range(grid)]
  brute = np.mean([patch * np.hypot(a[0] - b[0], a[1] - b[1]) for a in coords for b in coords])
  assert attention_distance.uniform_attention_distance(grid, patch) == pytest.approx(brute, rel=1e-6)


def test_snapshots_of_one_run_get_distinct_names(checkpoint, tmp_path, capsys):
  other = tmp_path / "step_20"
  shutil.copytree(checkpoint, other)
  config = all_config.get_config("runlocal")
  config.models = f"{checkpoint},{other}"
  config.progress = False
  # The step test_report_findings_and_one_compilation_per_architecture compiles for this
  # architecture (batch 8; the compilation cache has it once), on fewer images: the names do not
  # depend on either.
  config.data.num_images = 16
  config.batch_size = 8
  results = analyze.run(config, str(tmp_path / "out"))
  name = _manifest_name(checkpoint)
  assert set(results["models"]) == {f"{name} [step_10]", f"{name} [step_20]"}
  # Same weights, same images: identical numbers.
  a, b = results["models"].values()
  np.testing.assert_array_equal(a["nmi"], b["nmi"])
  out = capsys.readouterr().out
  assert "NMI (mean over heads, by block" in out and f"{name} [step_20]" in out
  # The summary is a table: a header row with the block numbers, then one row per model.
  header = next(line for line in out.splitlines() if line.strip().startswith("model"))
  assert header.split()[:4] == ["model", "family", "1", "2"]
  config.models = f"{checkpoint},{checkpoint}"
  with pytest.raises(ClmimError, match="same model twice") as error:
    analyze.run(config, str(tmp_path / "out2"))
  assert f"e.g. '{checkpoint}?name={name}_2'" in str(error.value)  # the fix, spelt out


def _names(config) -> list:
  return [model.name for model, _ in analyze.resolve_models(config)]


def test_an_export_beside_the_shipped_model_of_its_name(tmp_path):
  """A runlocal export named like a shipped model (and its untrained copy) is told apart by its
  folder; the shipped one keeps its name."""
  export = tmp_path / "export"
  save_random_checkpoint(export, pretrain_simmim)
  manifest = json.loads((export / "manifest.json").read_text())
  (export / "manifest.json").write_text(json.dumps(dict(manifest, name="simmim_demo")))
  config = all_config.get_config("runlocal")
  config.models = f"simmim_demo,{export}"
  config.include_untrained = True
  assert _names(config) == ["simmim_demo", "simmim_demo [export]", "simmim_demo (untrained)",
                            "simmim_demo [export] (untrained)"]


def test_untrained_copies_are_shared_by_architecture(checkpoint, tmp_path):
  from clmim.checkpoints import registry
  other, moco = tmp_path / "other", tmp_path / "moco"
  save_random_checkpoint(other, pretrain_simmim, seed=3)  # simmim_demo's architecture
  save_random_checkpoint(moco, pretrain_moco_v3)          # another architecture
  config = all_config.get_config("runlocal")
  config.models = f"{checkpoint},{other},{moco}"
  config.include_untrained = True
  jobs = analyze.resolve_models(config)
  simmim, moco_name = _manifest_name(checkpoint), _manifest_name(moco)
  trained = [f"{simmim} [step_10]", f"{simmim} [other]"]
  shared = f"{trained[0]} + {trained[1]} (untrained)"
  assert [m.name for m, _ in jobs] == trained + [moco_name, shared, f"{moco_name} (untrained)"]
  info = {m.name: m.info for m, _ in jobs}
  assert info[shared]["shared_by"] == trained
  assert "shared_by" not in info[f"{moco_name} (untrained)"]
  # Why one copy may stand for both: same fields and seed, the same weights.
  a, b = (registry.untrained_copy(m, config.seed) for m, _ in jobs[:2])
  assert analyze.untrained_key(a) == analyze.untrained_key(b)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  # An explicit random: copy of that architecture stands for the automatic ones.
  config.models = f"{checkpoint},{other},random:{other}?name=baseline"
  jobs = analyze.resolve_models(config)
  assert [m.name for m, _ in jobs] == trained + ["baseline (untrained)"]
  assert jobs[-1][0].info["shared_by"] == trained


def test_report_findings_and_one_compilation_per_architecture(checkpoint, tmp_path):
  moco = tmp_path / "moco"
  save_random_checkpoint(moco, pretrain_moco_v3, seed=1, weight_scale=3.0)
  config = all_config.get_config("runlocal")
  config.models = f"{moco},{checkpoint}"
  config.include_untrained = True  # the untrained copies share their model's compiled step
  config.progress = False
  config.data.num_images = 16
  config.batch_size = 8
  workdir = tmp_path / "out"
  results = analyze.run(config, str(workdir))
  assert results["compilations"] == 2  # two architectures, four models
  assert results["analyses"]["nmi"]["results"]["nmi"]["cl_direction"] == "lower"
  found = {f["key"]: f for f in report.findings(results, [attention_distance, nmi, fourier])}
  assert set(found) == {"attention_distance", "nmi", "fourier"}
  moco_name = _manifest_name(moco)
  moco_nmi = found["nmi"]["values"][moco_name]
  assert moco_nmi == pytest.approx(np.mean(np.mean(results["models"][moco_name]["nmi"],
                                                   axis=1)[1:]))  # later half of 2 blocks
  assert found["nmi"]["verdict"] in verdicts.VERDICTS
  assert found["nmi"]["cl"] == moco_name and found["nmi"]["intervals"][moco_name] is not None
  low, high = results["intervals"]["models"][moco_name]["nmi"]["low"], \
      results["intervals"]["models"][moco_name]["nmi"]["high"]
  curve = np.mean(results["models"][moco_name]["nmi"], axis=1)
  assert np.all(np.asarray(low) <= curve + 1e-9) and np.all(curve <= np.asarray(high) + 1e-9)
  markdown = (workdir / "report.md").read_text()
  assert "## Findings" in markdown and "![nmi.png](nmi.png)" in markdown
  page = (workdir / "report.html").read_text()
  assert page.count("data:image/png;base64,") == len(results["figures"]) == 4
  assert f"{moco_name} (untrained)" in page


def test_unknown_analysis_is_refused_before_compute(checkpoint, tmp_path):
  config = all_config.get_config("runlocal")
  config.models = str(checkpoint)
  with pytest.raises(ClmimError, match="unknown analysis 'nmy'.*attention_distance"):
    config.analyses = "nmi,nmy"
    analyze.run(config, str(tmp_path / "a"))
  assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_cka_between_a_model_and_itself_is_its_own_cka(checkpoint, tmp_path):
  """Two specs of one checkpoint: the between-model matrix must equal the model's own CKA
  matrix (1 on the diagonal), the paired pass running through the same `cka` analysis."""
  config = all_config.get_config("runlocal")
  config.analyses = "cka"
  config.models = f"{checkpoint},{checkpoint}?name=copy"
  config.progress = False
  config.data.num_images = 24
  config.data.max_batches = 2  # the paired pass obeys the same cap as the models' passes
  config.batch_size = 8
  results = analyze.run(config, str(tmp_path / "out"))
  pair = results["cka_between_models"][f"{_manifest_name(checkpoint)} ~ copy"]
  assert pair["num_images"] == results["models"]["copy"]["num_images"] == 16
  own = np.asarray(results["models"]["copy"]["cka_mean_tokens"])
  np.testing.assert_allclose(pair["cka_mean_tokens"], own, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(np.diag(own), 1.0, rtol=1e-6)
  assert pair["stages"] == [3, 3] and "cka_between_models.png" in results["figures"]
  # Mutual k-NN of a model with itself: the same neighbourhoods at every stage (k = 10 of 16).
  assert (pair["mutual_knn_k"], pair["mutual_knn_images"]) == (10, 16)
  np.testing.assert_allclose(np.diag(pair["mutual_knn_mean_tokens"]), 1.0)
  assert np.diag(pair["cka_unbiased_mean_tokens"]) == pytest.approx(1.0, rel=1e-5)
  # one shared per-model step, one paired CKA step, one paired gather step
  assert results["compilations"] == 3
  config.analysis_options.cka.mutual_knn_images = 0  # off
  config.overwrite = True
  pair = analyze.run(config, str(tmp_path / "out"))["cka_between_models"][
      f"{_manifest_name(checkpoint)} ~ copy"]
  assert "mutual_knn_mean_tokens" not in pair and "cka_mean_tokens" in pair


@pytest.mark.slow
def test_cka_between_models_pairs_only_trained_models_seeing_the_same_input(checkpoint,
                                                                            tmp_path):
  from clmim.checkpoints import registry
  from clmim.data.eval_data import EvalImages
  from clmim.analysis import between_models
  config = all_config.get_config("runlocal")
  config.analyses = "cka"
  config.models = f"{checkpoint},random:mu/4?depth=2&image_size=16&name=small"  # depth 2: quick
  config.progress = False
  config.data.num_images = 8
  config.batch_size = 8
  results = analyze.run(config, str(tmp_path / "out"))
  assert results["cka_between_models"] == {}  # untrained models are not paired
  a, b = registry.resolve(str(checkpoint)), registry.resolve("random:mu/4?depth=2&image_size=16")
  why = between_models._same_input(a, EvalImages(config.data, a.preprocessing),
                                   b, EvalImages(config.data, b.preprocessing))
  assert why == "image sizes differ (32 vs 16 px)"
  config.models = f"{checkpoint},{checkpoint}?name=copy"
  config.analysis_options.cka.between_models = False
  assert "cka_between_models" not in analyze.run(config, str(tmp_path / "out2"))


def test_interrupted_writing_leaves_no_partial_outputs(tmp_path, monkeypatch):
  """A Ctrl-C while the outputs are written (figures already there, results.json not yet)
  removes this run's files: a workdir holds a whole run or none; other files stay."""
  config = all_config.get_config("runlocal")
  config.analyses = "nmi"
  config.models = "random:mu/4?depth=1&image_size=32"
  config.progress = False
  config.data.num_images = 8
  config.batch_size = 8
  workdir = tmp_path / "out"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")

  def interrupted(results, modules, folder):
    assert {"nmi.png", "summary.txt"} <= set(os.listdir(folder))  # written before the Ctrl-C
    raise KeyboardInterrupt
  monkeypatch.setattr(report, "write", interrupted)
  with pytest.raises(KeyboardInterrupt):
    analyze.run(config, str(workdir))
  assert os.listdir(workdir) == ["notes.txt"]


@pytest.mark.slow
def test_config_intervals_fields(checkpoint, tmp_path):
  """config.intervals: folds = 0 gives no intervals (every verdict "no bootstrap interval");
  folds, replicates and seed are recorded and change the intervals; a bad value is one error
  naming the field, before any compute."""
  config = all_config.get_config("runlocal")
  config.models = f"{checkpoint}"
  config.analyses = "nmi"
  config.include_untrained = True
  config.progress = False
  config.data.num_images = 16
  config.batch_size = 8
  name = f"{_manifest_name(checkpoint)} (untrained)"

  def run(workdir, **fields):
    for field, value in fields.items():
      config.intervals[field] = value
    return analyze.run(config, str(tmp_path / workdir))

  first = run("a", folds=4, replicates=20, seed=0)
  assert {k: first["intervals"][k] for k in ("folds", "replicates", "seed")} == \
      {"folds": 4, "replicates": 20, "seed": 0}
  band = first["intervals"]["models"][name]["nmi"]
  assert np.all(np.asarray(band["low"]) < np.asarray(band["high"]))
  other_seed = run("b", seed=1)["intervals"]["models"][name]["nmi"]
  assert other_seed != band
  more = run("c", seed=0, replicates=200)["intervals"]["models"][name]["nmi"]
  assert more != band
  none = run("d", folds=0)
  assert none["intervals"]["models"] == {}
  config.intervals.folds = 1
  with pytest.raises(ClmimError, match=r"config\.intervals\.folds"):
    analyze.run(config, str(tmp_path / "e"))
  assert not (tmp_path / "e").exists()
