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


def test_diagnose_shortcuts_finds_the_documented_background_shortcut():
  # docs/miniature.md#diagnosis: the demo SimMIM model matches images by their background.
  stdout = _run("diagnose_shortcuts.py", "--models", "simmim_demo", "--images", "64",
                "--no-untrained")
  report = json.loads(stdout[stdout.index("{"):])
  assert report["images"] == 64 and report["version"] == 1
  for entry in report["models"]["simmim_demo"].values():
    assert entry["object_nearer"] < 0.25
    assert entry["retrieves_same_background"] > 0.5 > entry["retrieves_same_object"]
