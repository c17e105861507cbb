"""The diagnostic scripts in scripts/ run end to end and report what their docstrings promise."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


def test_supervised_ceiling_reports_a_held_out_curve(tmp_path):
  out = tmp_path / "ceiling.json"
  _run("supervised_ceiling.py", "--steps", "4", "--batch", "8", "--evaluations", "2",
       "--version", "2", "--out", str(out))
  result = json.loads(out.read_text())
  assert [point["step"] for point in result["curve"]] == [2, 4]
  assert all(0 <= point["held_out_top1"] <= 1 for point in result["curve"])
  assert result["args"]["version"] == 2 and result["args"]["target"] == "shape"


def test_diagnose_shortcuts_compares_object_and_background(tmp_path):
  stdout = _run("diagnose_shortcuts.py", "--models", "moco_v3_demo", "--images", "16",
                "--no-untrained")
  report = json.loads(stdout[stdout.index("{"):])
  entry = report["models"]["moco_v3_demo"]["cls"]
  assert report["images"] == 16 and report["version"] == 1
  # Each image's nearest candidate keeps either its object or its background (or neither).
  assert 0 <= entry["retrieves_same_object"] + entry["retrieves_same_background"] <= 1
  assert 0 <= entry["object_nearer"] <= 1
