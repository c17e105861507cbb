"""Figures from a small fake results dict: files exist, decode as PNGs, and writes are atomic."""
import json
import os

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
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


def test_bootstrap_intervals_are_drawn_as_bands():
  results = _results()
  curve = np.mean(results["models"]["moco"]["nmi"], axis=1)
  results["intervals"] = {"coverage": 0.95, "models": {"moco": {"nmi": {
      "low": (curve - 0.1).tolist(), "high": (curve + 0.1).tolist()}}}}
  ax = plots.curve_figure(results, nmi.RESULTS[0]).axes[0]
  bands = lambda ax: [c for c in ax.collections if isinstance(c, PolyCollection)
                      and len(c.get_paths()) and c.get_paths()[0].vertices.size]
  (band,) = bands(ax)
  ys = band.get_paths()[0].vertices[:, 1]
  assert ys.min() == pytest.approx(np.nanmin(curve - 0.1))
  assert ys.max() == pytest.approx(np.nanmax(curve + 0.1))
  assert "95% interval over images" in ax.get_legend_handles_labels()[1]
  # No intervals, no band.
  assert not bands(plots.curve_figure(_results(), nmi.RESULTS[0]).axes[0])


def test_bad_results_raise_clmim_error(tmp_path):
  with pytest.raises(ClmimError, match="nmi"):
    plots.curve_figure({"models": {}}, nmi.RESULTS[0])
  with pytest.raises(ClmimError, match=r"\['m'\]\['fourier'\]"):
    fourier.figures({"models": {"m": {"fourier": [[1.0, 2.0], [3.0]]}}}, {})
  assert os.listdir(tmp_path) == []


def test_legend_handles_show_each_curves_line_style():
  from matplotlib import rcParams
  fig = plots.curve_figure(_results(), nmi.RESULTS[0])
  ax = fig.axes[0]
  legend = ax.get_legend()
  handles = dict(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles))
  curves = [line for line in ax.lines if line.get_linestyle() != "None"]
  assert {line.get_linestyle() for line in curves} >= {"-", "--", ":"}
  for line in curves:
    handle = handles[line.get_label()]
    assert (handle.get_linestyle(), handle.get_color()) == (line.get_linestyle(),
                                                          line.get_color())
    # No marker: one in the middle of the handle covered a dashed line's gaps (it read solid).
    assert handle.get_marker() in ("None", "", None)
  # Long enough to show a dashed handle's dashes: at least 2.5 periods of the dashed pattern.
  dashed = handles["random_init"]
  period = sum(rcParams["lines.dashed_pattern"]) * dashed.get_linewidth()
  assert legend.handlelength * legend.prop.get_size_in_points() >= 2.5 * period


def test_head_dots_are_named_in_the_legend():
  fig = plots.curve_figure(_results(), nmi.RESULTS[0])
  legend = fig.axes[0].get_legend()
  labels = [t.get_text() for t in legend.get_texts()]
  dots = legend.legend_handles[labels.index(plots.HEAD_DOTS_LABEL)]
  assert dots.get_marker() == "o" and dots.get_linestyle() == "None"
  assert fig.axes[0].collections  # the dots themselves
  # Per-block values draw no dots, and the legend does not mention any.
  result = core.Result(key="x", label="y", layout="[block]", x="block", series=lambda v: v)
  fig = plots.curve_figure({"models": {"m": {"x": [1.0, 2.0]}}}, result)
  assert plots.HEAD_DOTS_LABEL not in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_snapshot_steps_get_integer_ticks(tmp_path, monkeypatch):
  from clmim.jobs import snapshots
  drawn = []
  monkeypatch.setattr(snapshots, "save_figure_atomic", lambda figure, path: drawn.append(figure))
  values = [[0.1, 0.2, 0.3], [0.2, 0.3, 0.4], [0.3, 0.35, 0.5]]  # stage 0, then 2 blocks
  snapshots.plot({"steps": [1, 2, 3], "nmi": values, "x": {"nmi": "stage"},
                  "labels": {"nmi": "NMI"}}, str(tmp_path / "snapshots.png"), "title")
  [figure] = drawn
  ticks = figure.axes[0].get_xticks()
  assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


def test_thumbnails_pool_whole_pixel_blocks_of_a_patch(monkeypatch):
  assert plots.thumbnail_factor(32, 4) == 1  # the demo models: kept as they are
  assert plots.thumbnail_factor(224, 16) == 8 and plots.thumbnail_factor(384, 16) == 16
  assert plots.thumbnail_factor(224, 14) == 7  # a divisor of the patch, not just any factor
  assert plots.thumbnail_factor(64, 4) == 2 and plots.thumbnail_factor(96, 4) == 4
  assert plots.thumbnail_factor(90, 4) == 2  # 90 px in 4-px patches: only 1 and 2 divide both
  assert plots.thumbnail_factor(33, 4) == 1  # a side the patch does not divide: kept whole
  monkeypatch.setattr(plots, "MAX_THUMBNAIL", 4)
  images = np.arange(2 * 8 * 8 * 3, dtype=np.float64).reshape(2, 8, 8, 3)
  small = plots.thumbnails(images, 4)
  assert small.shape == (2, 4, 4, 3)
  np.testing.assert_allclose(small[1, 2, 3], images[1, 4:6, 6:8].mean(axis=(0, 1)))


def test_display_images_undo_the_recorded_normalisation():
  rgb = np.random.default_rng(1).random((2, 4, 4, 3))
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  results = {"model_info": {"m": {"preprocessing": {"mean": "imagenet", "std": "imagenet"}}}}
  np.testing.assert_allclose(plots.display_images((rgb - mean) / std, results, "m"), rgb)
  # The run's config.data.mean/std win over the model's own, as in the evaluation data.
  results["config"] = {"data": {"mean": "half", "std": "half"}}
  np.testing.assert_allclose(plots.display_images(rgb * 2 - 1, results, "m"), rgb)
  # Without a record each image is stretched to [0, 1].
  shown = plots.display_images(rgb * 3 - 7, {}, "m")
  np.testing.assert_allclose(shown.min(axis=(1, 2, 3)), 0)
  np.testing.assert_allclose(shown.max(axis=(1, 2, 3)), 1)


def test_results_json_keeps_lists_of_numbers_on_one_line(tmp_path):
  from clmim.atomic import write_json_atomic
  payload = {"nmi": [[0.1, 0.2], [0.3, float("nan")]], "names": ["a", "b"], "empty": [],
             "nested": {"x": [{"k": 1}], "y": (1, None, True)}}
  path = write_json_atomic(tmp_path / "results.json", payload)
  text = open(path).read()
  assert ' "names": ["a", "b"],' in text and "  [0.3, NaN]" in text
  assert '"y": [1, null, true]' in text
  reread = json.loads(text)
  assert reread["nmi"][0] == [0.1, 0.2]
  assert reread["nested"] == {"x": [{"k": 1}], "y": [1, None, True]}
