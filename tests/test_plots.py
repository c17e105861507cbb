"""Figures from a small fake results dict: files exist, decode as PNGs, and writes are atomic."""
import os

import numpy as np
import pytest
from PIL import Image

from clmim.analysis import attention_distance, core, fourier, nmi, plots
from clmim.errors import ClmimError

MODULES = [attention_distance, nmi, fourier]


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
  return {"models": models, "model_info": {n: {"family": f, "uniform_attention_distance": 57.3}
                                           for n, f in info.items()}}


def _assert_png(path):
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    im.load()


def test_write_figures(tmp_path):
  out = tmp_path / "figs"
  written = plots.write_figures(_results(), MODULES, {}, out)
  names = sorted(os.path.basename(p) for p in written)
  assert names == ["attention_distance.png", "attention_entropy.png", "fourier.png", "nmi.png"]
  for p in written:
    _assert_png(p)
  assert sorted(os.listdir(out)) == names  # No temporary files left behind.


def test_only_figures_with_data(tmp_path):
  results = {"models": {"m": {"nmi": [[0.1, 0.2], [0.3, 0.4]]}}}
  written = plots.write_figures(results, [nmi], {}, tmp_path)
  assert [os.path.basename(p) for p in written] == ["nmi.png"]
  # Per-block scalars (no head axis) and a stage axis also plot.
  result = core.Result(key="x", label="y", layout="[stage]", x="stage",
                       series=lambda v: v, reference=1.5, reference_label="ref")
  fig = plots.curve_figure({"models": {"m": {"x": [1.0, 2.0, 3.0]}}}, result)
  line = fig.axes[0].lines[0]
  assert list(line.get_xdata()) == [0, 1, 2] and list(line.get_ydata()) == [1.0, 2.0, 3.0]


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
    plots.write_figures(_results(), [nmi], {}, tmp_path)
  assert os.listdir(tmp_path) == ["nmi.png"] and target.read_bytes() == b"old"


def test_reference_line_comes_from_the_result():
  fig = plots.curve_figure(_results(), attention_distance.RESULTS[0])
  labels = [line.get_label() for line in fig.axes[0].lines]
  assert "uniform attention" in labels


def test_bad_results_raise_clmim_error(tmp_path):
  with pytest.raises(ClmimError, match="nmi"):
    plots.curve_figure({"models": {}}, nmi.RESULTS[0])
  with pytest.raises(ClmimError, match=r"\['m'\]\['fourier'\]"):
    plots.fourier_figure({"models": {"m": {"fourier": [[1.0, 2.0], [3.0]]}}})
  assert os.listdir(tmp_path) == []
