"""The hybrid's λ sweep: trains one model per λ, resumes finished ones, analyses all, checks first."""
import json
import os

import numpy as np
import pytest

from clmim import main
from clmim.analysis import nmi
from clmim.errors import ClmimError
from clmim.jobs import report, sweep
from configs import pretrain_hybrid


def _config(**fields):
  config = pretrain_hybrid.get_config("runlocal")
  config.unlock()
  config.mode = "sweep"
  config.sweep.analyses = "nmi,fourier"  # no probes: a quick run
  for key, value in fields.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


@pytest.mark.slow
def test_sweep_trains_each_lambda_once_and_plots_the_metrics(tmp_path):
  summary = main.run(_config(**{"sweep.num_images": 48}), str(tmp_path))
  assert summary["weights"] == [0.0, 1.0]
  for key in ("nmi", "fourier"):
    assert len(summary[key]) == 2 and np.isfinite(summary[key]).all()
    assert key + "_untrained" in summary
  assert (tmp_path / "sweep.png").exists() and (tmp_path / "analysis" / "results.json").exists()
  assert json.loads((tmp_path / "sweep.json").read_text())["weights"] == [0.0, 1.0]
  analysed = json.loads((tmp_path / "analysis" / "results.json").read_text())
  assert {m["num_images"] for m in analysed["models"].values()} == {48}  # config.sweep.num_images
  for weight in ("0", "1"):
    manifest = json.loads((tmp_path / f"lambda_{weight}" / "export" / "manifest.json").read_text())
    assert manifest["config"]["hybrid"]["weight"] == float(weight)
  # The endpoints are MIM and CL, so the report's findings compare them.
  families = {n: i["family"] for n, i in analysed["model_info"].items()}
  assert families["hybrid_lambda_0"] == "mim" and families["hybrid_lambda_1"] == "cl"
  summary_text = (tmp_path / "analysis" / "summary.txt").read_text()
  assert "needs a CL and a MIM model" not in summary_text
  # λ = 0 trains the MIM branch only, λ = 1 the CL branch only.
  first = json.loads((tmp_path / "lambda_0" / "metrics.jsonl").read_text().splitlines()[0])
  last = json.loads((tmp_path / "lambda_1" / "metrics.jsonl").read_text().splitlines()[0])
  assert "loss_mim" in first and "loss_cl" not in first
  assert "loss_cl" in last and "loss_mim" not in last
  # Run again: finished members are not trained again, the analysis is redone.
  records = (tmp_path / "lambda_0" / "metrics.jsonl").read_text()
  again = main.run(_config(**{"sweep.num_images": 48}), str(tmp_path))
  assert (tmp_path / "lambda_0" / "metrics.jsonl").read_text() == records
  assert again["nmi"] == pytest.approx(summary["nmi"])
  # Two seeds of λ = 1: seed 0 is the finished lambda_1/, seed 1 trains with the next seed.
  records = (tmp_path / "lambda_1" / "metrics.jsonl").read_text()
  seeds = main.run(_config(**{"sweep.num_images": 48, "sweep.weights": (1.0,),
                              "sweep.seeds": 2}), str(tmp_path))
  assert (tmp_path / "lambda_1" / "metrics.jsonl").read_text() == records
  assert seeds["seeds"] == 2 and seeds["nmi_seeds"][0][0] == pytest.approx(summary["nmi"][1])
  assert seeds["nmi_seeds"][0][1] != seeds["nmi_seeds"][0][0]  # another training, another model
  assert seeds["nmi"][0] == pytest.approx(np.mean(seeds["nmi_seeds"][0]))
  manifest = json.loads((tmp_path / "lambda_1_seed1" / "export" / "manifest.json").read_text())
  assert manifest["config"]["seed"] == 1 and manifest["name"] == "hybrid_lambda_1_seed1"


@pytest.mark.parametrize("fields, message", [
    ({"sweep.weights": (0.0, 1.5)}, r"config\.sweep\.weights"),
    ({"sweep.weights": (0.5, 0.5)}, r"config\.sweep\.weights"),
    ({"sweep.analyses": "nmi,no_such"}, "no_such"),
    ({"sweep.num_images": 0}, r"config\.sweep\.num_images"),
    ({"simmim.mask_patch": 6}, r"config\.simmim\.mask_patch"),
])
def test_bad_sweeps_fail_before_anything_trains(tmp_path, fields, message):
  with pytest.raises(ClmimError, match=message):
    main.run(_config(**fields), str(tmp_path / "run"))
  assert not any(n.startswith("lambda_") for n in os.listdir(tmp_path / "run")) \
      if (tmp_path / "run").exists() else True


def test_only_the_hybrid_config_sweeps(tmp_path):
  from configs import pretrain_simmim
  config = pretrain_simmim.get_config("runlocal")
  config.unlock()
  config.mode = "sweep"
  with pytest.raises(ClmimError, match="pretrain_hybrid"):
    main.run(config, str(tmp_path))


def test_summarise_known_answers():
  results = {"models": {
      "a": {"nmi": [[0.1, 0.3], [0.5, 0.7]], "fourier": [[0, -1], [0, -2], [0, -4]],
            "probe_shape_mean_tokens": [0.3, 0.9]},
      "b": {"nmi": [[0.0, 0.0], [0.2, 0.2]], "fourier": [[0, -1], [0, -1], [0, -1]],
            "probe_shape_mean_tokens": [0.4, 0.5]},
      "u": {"nmi": [[0.0, 0.0], [0.0, 0.0]], "fourier": [[0, -3], [0, -3], [0, -3]],
            "probe_shape_mean_tokens": [0.25, 0.25]}}}
  out = sweep.summarise(results, {0.0: "a", 1.0: "b"})
  assert out["weights"] == [0.0, 1.0]
  assert out["probe_shape_mean_tokens"] == [0.9, 0.5]
  assert out["nmi"] == pytest.approx([0.6, 0.2])  # block 2 of 2, mean over heads
  assert out["fourier"] == pytest.approx([-4.0, -1.0])  # stage 2 of blocks 1-2, last entry
  assert out["nmi_untrained"] == 0.0 and out["fourier_untrained"] == -3.0
  assert "probe_texture_mean_tokens" not in out
  assert "probe_evaluation_images" not in out  # no probing details given


def test_summary_records_the_probes_test_set_size():
  details = {"targets": {"shape": {"evaluation_images": 64}}}
  results = {"models": {"a": {"probe_shape_mean_tokens": [0.5], "probing_details": details},
                        "b": {"probe_shape_mean_tokens": [0.7], "probing_details": details}}}
  out = sweep.summarise(results, {0.0: "a", 1.0: "b"})
  assert out["probe_evaluation_images"] == 64
  assert sweep.figure(out).axes[0].containers  # the probe panel has error bars


def test_probe_standard_errors_known_answers():
  assert sweep.probe_standard_errors([0.5, 0.9, 1.0], 100) == pytest.approx([0.05, 0.03, 0.0])


def test_the_endpoints_are_mim_and_cl_so_the_findings_compare_them():
  config = _config()
  assert {w: sweep.member_config(config, w).family for w in (0.0, 0.25, 1.0)} == \
      {0.0: "mim", 0.25: "other", 1.0: "cl"}
  names = {0.0: "hybrid_lambda_0", 0.5: "hybrid_lambda_0.5", 1.0: "hybrid_lambda_1"}
  nmi_of = {0.0: 0.8, 0.5: 0.4, 1.0: 0.2}  # the paper: CL's NMI is lower
  results = {"models": {names[w]: {"nmi": [[v], [v]]} for w, v in nmi_of.items()},
             "model_info": {names[w]: {"family": sweep.member_config(config, w).family}
                            for w in names}}
  finding = report.findings(results, [nmi])[0]
  # Compared (was "needs a CL and a MIM model"): λ = 1 against λ = 0, the paper's way.
  assert (finding["cl"], finding["mim"]) == ("hybrid_lambda_1", "hybrid_lambda_0")
  assert finding["gap"] == pytest.approx(0.6)
  assert finding["verdict"] == "inconclusive"  # no intervals in this hand-made results dict


def test_seeds_give_the_mean_each_seed_and_the_spread():
  results = {"models": {
      "a0": {"probe_shape_mean_tokens": [0.2, 0.6]}, "a1": {"probe_shape_mean_tokens": [0.3, 0.8]},
      "b0": {"probe_shape_mean_tokens": [0.4, 0.5]}, "b1": {"probe_shape_mean_tokens": [0.4, 0.5]},
      "u": {"probe_shape_mean_tokens": [0.25, 0.25]}}}
  out = sweep.summarise(results, {0.0: ["a0", "a1"], 1.0: ["b0", "b1"]})
  assert out["seeds"] == 2
  assert out["probe_shape_mean_tokens"] == pytest.approx([0.7, 0.5])
  assert out["probe_shape_mean_tokens_seeds"] == [[0.6, 0.8], [0.5, 0.5]]
  assert out["probe_shape_mean_tokens_spread"] == pytest.approx([np.sqrt(0.02), 0.0])
  assert out["probe_shape_mean_tokens_untrained"] == 0.25
  # The figure's error bars are the spread over seeds, not the binomial error.
  bars = sweep.figure(out).axes[0].containers[0]
  lengths = [segment[1][1] - segment[0][1] for segment in bars.lines[2][0].get_segments()]
  assert lengths == pytest.approx([2 * np.sqrt(0.02), 0.0])


def test_each_seed_is_its_own_member_with_its_own_folder(tmp_path):
  config = _config(**{"sweep.seeds": 3})
  members = [sweep.member_config(config, 0.5, i) for i in range(3)]
  assert [m.seed for m in members] == [config.seed, config.seed + 1, config.seed + 2]
  # Seed 0 is the one-seed sweep's member: raising config.sweep.seeds reuses a finished sweep.
  assert [m.name for m in members] == ["hybrid_lambda_0.5", "hybrid_lambda_0.5_seed1",
                                       "hybrid_lambda_0.5_seed2"]
  assert sweep.member_folder("w", 0.5, 2) == os.path.join("w", "lambda_0.5_seed2")
  assert sweep.member_folder("w", 0.5, 0) == os.path.join("w", "lambda_0.5")
  for bad in (0, -2):  # (the config's types refuse non-integers already)
    with pytest.raises(ClmimError, match=r"config\.sweep\.seeds="):
      main.run(_config(**{"sweep.seeds": bad}), str(tmp_path / "run"))

