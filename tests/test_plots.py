"""Figures from a small fake results dict: files exist, decode as PNGs, and writes are atomic."""
import os

import numpy as np
import pytest
from PIL import Image

from clmim.analysis import plots
from clmim.errors import ClmimError


def _results(depth=4, heads=3):
  rng = np.random.default_rng(0)

  def per_layer(scale):
    return (scale * rng.random((depth, heads))).tolist()

  models = {}
  for name in ["moco", "dino", "simmim", "mae", "random_init", "mystery"]:
    models[name] = {
        "attention_distance": per_layer(100.0),
        "nmi": per_layer(1.0),
        "attention_entropy": per_layer(1.0),
        "fourier": (-3 * rng.random((depth + 1, 7))).tolist(),
    }
  models["mystery"].pop("fourier")
  models["dino"]["nmi"][1] = [float("nan")] * heads  # A gap, not a crash.
  info = {"moco": "cl", "dino": "CL", "simmim": "mim", "mae": "mim", "random_init": "random"}
  return {"models": models, "model_info": {n: {"family": f} for n, f in info.items()},
          "reference": {"attention_distance": 57.3}}


def _assert_png(path):
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    im.load()


def test_write_all_figures(tmp_path):
  out = tmp_path / "figs"
  written = plots.write_all_figures(_results(), out)
  names = sorted(os.path.basename(p) for p in written)
  assert names == ["attention_distance.png", "attention_entropy.png", "fourier.png", "nmi.png"]
  for p in written:
    _assert_png(p)
  assert sorted(os.listdir(out)) == names  # No temporary files left behind.


def test_only_figures_with_data(tmp_path):
  results = {"models": {"m": {"nmi": [[0.1, 0.2], [0.3, 0.4]]}}}
  written = plots.write_all_figures(results, tmp_path)
  assert [os.path.basename(p) for p in written] == ["nmi.png"]
  # Per-layer scalars (already averaged over heads) and a per-layer reference also plot.
  p = plots.plot_per_layer({"models": {"m": {"x": [1.0, 2.0, 3.0]}}}, "x", tmp_path / "x.png",
                           "y", "t", reference=[1.5, 1.5, 2.0], reference_label="ref")
  _assert_png(p)


def test_styles_by_family():
  results = _results()
  styles = plots.model_styles(results, list(results["models"]))
  assert styles["moco"]["color"] != styles["dino"]["color"]
  assert styles["random_init"]["linestyle"] == "--"
  assert styles["moco"]["label"] == "moco (CL)" and styles["mystery"]["label"] == "mystery"
  assert plots.family(results, "dino") == "cl" and plots.family(results, "nope") == "other"


def test_no_partial_file_on_error(tmp_path, monkeypatch):
  target = tmp_path / "nmi.png"
  target.write_bytes(b"old")

  def boom(self, *args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(plots.Figure, "savefig", boom)
  with pytest.raises(RuntimeError, match="disk full"):
    plots.plot_per_layer(_results(), "nmi", target, "NMI", "NMI")
  assert os.listdir(tmp_path) == ["nmi.png"] and target.read_bytes() == b"old"


def test_bad_results_raise_clmim_error(tmp_path):
  with pytest.raises(ClmimError, match="nmi"):
    plots.plot_per_layer({"models": {}}, "nmi", tmp_path / "a.png", "NMI", "NMI")
  with pytest.raises(ClmimError, match=r"\['m'\]\['fourier'\]"):
    plots.plot_fourier({"models": {"m": {"fourier": [[1.0, 2.0], [3.0]]}}}, tmp_path / "f.png")
  assert os.listdir(tmp_path) == []
