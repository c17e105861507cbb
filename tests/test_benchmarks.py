"""benchmarks/device_check.py, analysis_profile.py, scaling.py, input_pipeline.py and
command_times.py run on CPU (a mu/4 ViT at 32 px, two fake devices; two blocks where the script
takes --depth: what they report does not depend on the depth, their compiles do) and report what
their docstrings promise. No timing thresholds: the CPU is shared."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # benchmarks/ as a namespace package

# Two devices, not conftest's eight: the scripts run as their docstrings show. LLVM at -O0 as in
# conftest: at these sizes compiling is most of a script's time, and what the reports hold does
# not depend on how fast the code XLA emits runs.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"
           " --xla_backend_optimization_level=0")


def _run(script, *args) -> dict:
  result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout)


@pytest.mark.slow
def test_device_check_measures_both_dtypes_and_the_input_pipeline():
  from clmim.analysis import core
  # --batch 0: the auto batch, which on CPU is its cap of 16 per device (one candidate).
  report = _run("device_check.py", "--variant", "mu/4", "--size", "32", "--depth", "2",
                "--batch", "0", "--repeats", "2", "--images", "32")
  assert report["backend"] == "cpu" and report["device_count"] == 2 and report["depth"] == 2
  batch = report["batch"]
  assert batch["mode"] == "auto" and batch["device_batch"] == 16
  assert batch["global_batch"] == 32 and [c["fits"] for c in batch["search"]] == [True]

  # Every analysis is either in the step or excluded with a reason, never both.
  analyses, excluded = set(report["analyses"]), report["excluded"]
  assert analyses | set(excluded) == set(core.available()) and not analyses & set(excluded)
  assert {"attention_distance", "nmi", "fourier", "cka", "svd"} <= analyses
  assert {"decoder", "probing", "robustness", "object_attention", "tsne"} <= set(excluded)
  assert all(reason for reason in excluded.values())
  assert "decoder" in excluded["decoder"]

  for dtype in ("float32", "bfloat16"):
    numbers = report["dtypes"][dtype]
    assert numbers["compilations"] == 1, dtype  # one trace, even after all the timed steps
    assert numbers["compile_s"] > 0
    assert 0 < numbers["forward_share"] <= 1, numbers
    for key in ("step_images_per_s", "forward_images_per_s", "run_images_per_s"):
      assert numbers[key] > 0, (dtype, key)

  compared = report["bf16_vs_f32"]
  assert compared["images"] == 32
  diffs = compared["max_rel_diff"]
  assert {"attention_distance", "nmi", "attention_entropy", "fourier"} <= set(diffs)
  for key, value in diffs.items():
    if key == "rollout_map_pixels":  # the input images the rollout maps are drawn on: no metric
      assert value == 0, value
      continue
    if key in ("high_norm_fraction", "attention_to_high_norm"):
      # A small random ViT has no high-norm outlier tokens: both dtypes count none exactly.
      assert value == 0 or 0 < value < 0.2, (key, value)
      continue
    assert math.isfinite(value) and 0 < value < 0.2, (key, value)
  assert compared["worst"][1] == max(diffs.values())

  pipeline = report["input_pipeline"]
  assert pipeline["images_per_s"] > 0 and pipeline["image_size"] == 224
  assert pipeline["workers"] == os.cpu_count() and pipeline["images"] == 32
  assert "pipeline_over_step" not in pipeline  # only at --size 224
  assert set(report["part_seconds"]) >= {"input_pipeline", "search", "float32", "bfloat16"}
  assert report["total_seconds"] > 0 and report["cpu_count"] == os.cpu_count()


@pytest.mark.slow
def test_analysis_profile_times_each_analysis_and_checks_every_svd_route():
  report = _run("analysis_profile.py", "--variant", "mu/4", "--size", "32", "--depth", "2",
                "--batch", "4", "--repeats", "1", "--only", "svd,nmi", "--svd_check", "2")
  assert report["backend"] == "cpu" and report["device_batch"] == 4 and report["depth"] == 2
  assert set(report["analyses"]) == {"svd", "nmi"} and report["slowest"] in {"svd", "nmi"}
  for entry in report["analyses"].values():
    assert entry["step_s"] > 0 and entry["compile_s"] > 0
    assert math.isclose(entry["extra_s"], entry["step_s"] - report["forward_s"], abs_tol=2e-5)
  assert report["svd"]["tokens"] == [4, 64, 128]  # mu/4 at 32 px: 8 x 8 patches, width 128
  routes = report["svd"]["algorithms"]
  for name in ("default", "qr", "gram_eigvalsh", "gram_eigh_norms"):
    assert routes[name]["seconds"] > 0, routes[name]
  assert routes["default"]["max_rel_err"] < 1e-5 and routes["default"]["erank_rel_err"] < 1e-5
  assert routes["gram_eigh_norms"]["max_rel_err"] < 1e-3
  assert "not implemented on CPU" in routes["polar"]["error"]  # cuSOLVER/TPU only


@pytest.mark.slow
def test_scaling_reports_time_per_image_count_and_a_linear_fit():
  counts = [16, 64, 256]
  report = _run("scaling.py", "--variant", "mu/4", "--size", "32", "--depth", "2", "--batch",
                "8", "--images", ",".join(map(str, counts)))
  assert report["global_batch"] == 16 and report["device_count"] == 2 and report["depth"] == 2
  runs = report["runs"]
  assert [r["images"] for r in runs] == counts
  assert [r["num_images"] for r in runs] == counts
  seconds = [r["seconds"] for r in runs]
  assert seconds == sorted(seconds) and len(set(seconds)) == len(seconds), seconds
  for r in runs:
    assert r["images_per_s"] > 0 and r["compilations"] == 1 and r["peak_rss_mb"] > 0
    assert r["peak_growth_mb"] >= 0
  fit = report["fit"]
  assert fit["b_s_per_image"] > 0 and fit["r2"] <= 1
  ratio = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
  assert report["peak_memory_ratio"] == round(ratio, 4) > 0


def test_relative_differences_known_answers():
  from benchmarks.device_check import relative_differences
  nan = float("nan")
  reference = {"a": [[1.0, -4.0], [2.0, 0.5]], "b": [nan, 2.0], "c": [1.0, nan], "d": [0.0],
               "e": [1, 2], "maps": {"images": [0, 1], "maps": [[2.0, 2.0]]}}
  low = {"a": [[1.0, -3.0], [2.0, 0.5]], "b": [nan, 2.5], "c": [1.0, 1.0], "d": [0.0],
         "e": [1, 2], "maps": {"images": [0, 1], "maps": [[2.0, 1.5]]}}
  diffs, not_compared = relative_differences(low, reference)
  assert diffs == {"a": 0.25, "b": 0.25, "c": math.inf, "d": 0.0, "maps": 0.25}
  assert not_compared == ["e"]  # integers only (e.g. image positions): nothing to compare


def test_linear_fit_known_answers():
  from benchmarks.scaling import linear_fit
  fit = linear_fit([10, 20, 40], [1.5, 2.5, 4.5])
  assert np.isclose(fit["a_s"], 0.5) and np.isclose(fit["b_s_per_image"], 0.1)
  assert fit["r2"] == 1.0 and np.isclose(fit["images_per_s"], 10.0)
  assert linear_fit([10, 20, 40], [1.0, 3.0, 4.0])["r2"] < 1


@pytest.mark.slow
def test_train_step_times_each_objective_after_warm_up():
  # In this process: runlocal SimMIM's update step is the one test_train.py compiles (the
  # session's cache serves it), and the report is main()'s return value.
  import contextlib
  import io
  from benchmarks import train_step
  with contextlib.redirect_stdout(io.StringIO()) as out:
    report = train_step.main(["--variant", "runlocal", "--objectives", "simmim", "--steps", "6",
                              "--warmup", "2"])
  assert json.loads(out.getvalue()) == report
  simmim = report["objectives"]["simmim"]
  assert simmim["steps"] == 6 and simmim["batch"] == 16 and simmim["steps_per_s"] > 0
  assert simmim["images_per_s"] == pytest.approx(16 * simmim["steps_per_s"], rel=1e-3)
  records = [{"step": s, "elapsed_s": 0.5 * s} for s in range(1, 7)]
  assert train_step.steady_rate(records, 2) == pytest.approx(2.0)
  with pytest.raises(ValueError, match="too few steps"):
    train_step.steady_rate(records[:2], 2)


def test_input_pipeline_times_both_sources_and_the_header_check():
  report = _run("input_pipeline.py", "--num_images", "8", "--repeats", "1", "--workers", "1",
                "--jpeg_size", "64x48")
  assert set(report["results"]) == {"image_folder/workers=1", "tfds_array_record/workers=1"}
  assert all(r["images_per_s"] > 0 for r in report["results"].values())
  check = report["header_check"]["workers=1"]
  assert check["images"] == 8 and check["us_per_image"] > 0


@pytest.mark.slow
def test_command_times_runs_a_config_with_a_cold_cache():
  report = _run("command_times.py", "--runs", "nmi:runlocal")
  run = report["runs"]["nmi:runlocal"]
  assert run["exit_status"] == 0 and run["wall_s"] > 0 and run["peak_rss_mb"] > 100
  assert report["compilation_cache"].startswith("cold") and report["tests"] == {}
