"""The analysis job in-process: model naming, summary, and the uniform-attention reference."""
import shutil

import numpy as np
import pytest

from clmim.analysis import attention_distance, fourier, nmi
from clmim.jobs import analyze, report
from clmim.errors import ClmimError
from tiny_checkpoints import save_random_checkpoint
from configs import all as all_config
from configs import pretrain_moco_v3, pretrain_simmim


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt") / "step_10"
  save_random_checkpoint(path, pretrain_simmim, steps=10)
  return path


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
  results = analyze.run(config, str(tmp_path / "out"))
  assert set(results["models"]) == {"simmim_demo [step_10]", "simmim_demo [step_20]"}
  # Same weights, same images: identical numbers.
  a, b = results["models"].values()
  np.testing.assert_array_equal(a["nmi"], b["nmi"])
  out = capsys.readouterr().out
  assert "NMI (mean over heads, by block" in out and "simmim_demo [step_20]" in out
  # The summary is a table: a header row with the block numbers, then one row per model.
  header = next(line for line in out.splitlines() if line.strip().startswith("model"))
  assert header.split()[:4] == ["model", "family", "1", "2"]
  config.models = f"{checkpoint},{checkpoint}"
  with pytest.raises(ClmimError, match="same model twice"):
    analyze.run(config, str(tmp_path / "out2"))


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
  moco_nmi = found["nmi"]["values"]["moco_v3_demo"]
  assert moco_nmi == pytest.approx(np.mean(np.mean(results["models"]["moco_v3_demo"]["nmi"],
                                                   axis=1)[1:]))  # later half of 2 blocks
  assert found["nmi"]["verdicts"]["moco_v3_demo"] == "CL-like"
  markdown = (workdir / "report.md").read_text()
  assert "## Findings" in markdown and "![nmi.png](nmi.png)" in markdown
  page = (workdir / "report.html").read_text()
  assert page.count("data:image/png;base64,") == len(results["figures"]) == 4
  assert "moco_v3_demo (untrained)" in page


def test_unknown_analysis_is_refused_before_compute(checkpoint, tmp_path):
  config = all_config.get_config("runlocal")
  config.models = str(checkpoint)
  with pytest.raises(ClmimError, match="unknown analysis 'nmy'.*attention_distance"):
    config.analyses = "nmi,nmy"
    analyze.run(config, str(tmp_path / "a"))
  assert not (tmp_path / "a").exists()


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
  pair = results["cka_between_models"]["simmim_demo ~ copy"]
  assert pair["num_images"] == results["models"]["copy"]["num_images"] == 16
  own = np.asarray(results["models"]["copy"]["cka_mean_tokens"])
  np.testing.assert_allclose(pair["cka_mean_tokens"], own, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(np.diag(own), 1.0, rtol=1e-6)
  assert pair["stages"] == [3, 3] and "cka_between_models.png" in results["figures"]
  assert results["compilations"] == 2  # one shared per-model step, one paired step


def test_cka_between_models_pairs_only_trained_models_seeing_the_same_input(checkpoint,
                                                                            tmp_path):
  from clmim.checkpoints import registry
  from clmim.data.eval_data import EvalImages
  from clmim.jobs import between_models
  config = all_config.get_config("runlocal")
  config.analyses = "cka"
  config.models = f"{checkpoint},random:mu/4?image_size=16&name=small"
  config.progress = False
  config.data.num_images = 8
  config.batch_size = 8
  results = analyze.run(config, str(tmp_path / "out"))
  assert results["cka_between_models"] == {}  # untrained models are not paired
  a, b = registry.resolve(str(checkpoint)), registry.resolve("random:mu/4?image_size=16")
  why = between_models._same_input(a, EvalImages(config.data, a.preprocessing),
                                   b, EvalImages(config.data, b.preprocessing))
  assert why == "image sizes differ (32 vs 16 px)"
  config.models = f"{checkpoint},{checkpoint}?name=copy"
  config.analysis_options.cka.between_models = False
  assert "cka_between_models" not in analyze.run(config, str(tmp_path / "out2"))
