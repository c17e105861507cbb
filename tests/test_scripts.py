"""The diagnostic scripts in scripts/ run end to end and report what their docstrings promise."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


@pytest.mark.slow
def test_supervised_ceiling_reports_a_held_out_curve(tmp_path):
  out = tmp_path / "ceiling.json"
  # 100 held-out images, not 1000: each check's forward over them was most of the run.
  _run("supervised_ceiling.py", "--steps", "4", "--batch", "8", "--evaluations", "2",
       "--held_out", "100", "--version", "2", "--out", str(out))
  result = json.loads(out.read_text())
  assert [point["step"] for point in result["curve"]] == [2, 4]
  for point in result["curve"]:  # a share of the 100 held-out images: a whole number of them
    assert 0 <= point["held_out_top1"] <= 1
    assert 100 * point["held_out_top1"] == pytest.approx(round(100 * point["held_out_top1"]),
                                                         abs=1e-3)
  assert result["args"]["version"] == 2 and result["args"]["target"] == "shape"


@pytest.mark.slow
def test_diagnose_shortcuts_tells_object_matching_from_background_matching():
  # README demo section: the version 2 MoCo model finds an image by its object, SimMIM (like
  # the version 1 models, docs/miniature.md#diagnosis) by its background.
  stdout = _run("diagnose_shortcuts.py", "--models", "moco_v3_demo,simmim_demo", "--images",
                "64", "--no-untrained")
  report = json.loads(stdout[stdout.index("{"):])
  assert report["images"] == 64 and report["version"] == 3  # the demo models' data by default
  for entry in report["models"]["moco_v3_demo"].values():
    assert entry["object_nearer"] > 0.75
    assert entry["retrieves_same_object"] > 0.5 > entry["retrieves_same_background"]
  for entry in report["models"]["simmim_demo"].values():
    assert entry["object_nearer"] < 0.25
    assert entry["retrieves_same_background"] > 0.5 > entry["retrieves_same_object"]


def test_view_agreement_known_answers():
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  from view_agreement import agreement
  rng = np.random.default_rng(0)
  features = rng.normal(size=(200, 32))
  same = agreement(features, features)
  assert same["top1"] == 1.0 and same["margin"] > 0.95  # 1 + 1/(n-1) after centring
  unrelated = agreement(features, rng.normal(size=(200, 32)))
  assert abs(unrelated["margin"]) < 0.02 and unrelated["top1"] < 0.05
  # Invariant to the order of the pairs and to the batch's mean.
  order = rng.permutation(200)
  assert agreement(features[order], features[order] + 5.0) == same


@pytest.mark.slow
def test_view_agreement_separates_same_image_views_from_redrawn_ones():
  # docs/miniature.md: same-image views share colours and background, which an untrained model
  # (and the raw pixels) already sees; views whose background and colours are redrawn share
  # almost nothing it can see.
  stdout = _run("view_agreement.py", "--models", "random:moco_v3_demo", "--images", "96",
                "--version", "3", "--views", ",redraw:background+colours")
  report = json.loads(stdout[stdout.index("{"):])
  same, redrawn = report["views"]["same image"], report["views"]["redraw:background+colours"]
  assert same["pixels"]["margin"] > 0.05 > redrawn["pixels"]["margin"]
  untrained = "moco_v3_demo (untrained)"
  for kind in ("cls", "mean_tokens"):
    assert same[untrained][kind]["margin"] > 0.05 > redrawn[untrained][kind]["margin"]
