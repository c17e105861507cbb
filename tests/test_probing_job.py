"""The probing and robustness analyses in the analysis job: procedural data, image folders with a
cue-conflict set, and bad input refused before any compute."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from clmim.data.synthetic import ShapesTextures
from clmim.errors import ClmimError
from clmim.jobs import analyze
from configs import probing as probing_config
from configs import robustness as robustness_config

TINY = "random:mu/4?depth=2&image_size=16"


def _config(module=probing_config, probe=None, **data):
  """The runlocal config on a tiny model; `data` sets config.data fields, `probe`
  config.probe_data fields."""
  config = module.get_config("runlocal")
  config.models = TINY
  config.progress = False
  config.analyses = "probing,robustness"
  config.probe_data.num_images = 96
  config.data.num_images = 40
  for key, value in data.items():
    setattr(config.data, key, value)
  for key, value in (probe or {}).items():
    setattr(config.probe_data, key, value)
  # 16 px images: frequency bins are 0.125π apart, too coarse for the default 0.1π bands.
  config.analysis_options.robustness.bands = (0.25, 0.75)
  config.analysis_options.robustness.band_width = 0.5
  config.analysis_options.robustness.white_rms = (0.1,)
  return config




@pytest.mark.slow
def test_procedural_probes_bias_and_robustness_in_one_run(tmp_path, capsys):
  config = _config()
  config.batch_size = 64
  config.data.max_batches = 1  # caps every pass: 64 of the 96 training images
  results = analyze.run(config, str(tmp_path))
  out = capsys.readouterr().out
  # probing and robustness share the probe fit: one pass over the training images.
  assert out.count("probe fit (independent)") == 1
  values = next(iter(results["models"].values()))
  for key in ("probe_shape_cls", "probe_shape_mean_tokens", "probe_texture_cls",
              "probe_texture_mean_tokens", "shape_bias_cls", "shape_bias_mean_tokens",
              "knn_shape_cls", "knn_texture_mean_tokens"):
    assert len(values[key]) == 2 and all(0 <= v <= 1 for v in values[key]), key
  details = values["probing_details"]
  assert details["targets"]["shape"]["train_images"] == 64
  assert details["targets"]["shape"]["evaluation_images"] == 40
  assert details["cue_conflict"]["images"] == 40
  assert details["knn"] == {"k": 20, "temperature": 0.07, "memory_images": 64,
                            "memory_data": details["targets"]["shape"]["train_data"]}
  assert len(details["cue_conflict"]["decision_top1"]) == 2
  assert len(values["band_noise_drop"]) == 2 and len(values["white_noise_drop"]) == 1
  robust = values["robustness_details"]
  assert robust["block"] == 2 and robust["target"] == "shape"
  assert robust["clean_top1"] - robust["band_top1"][0] == pytest.approx(values["band_noise_drop"][0])
  files = set(os.listdir(tmp_path))
  assert {"robustness.png", "probe_shape_cls.png", "shape_bias_mean_tokens.png"} <= files
  summary = (tmp_path / "summary.txt").read_text()
  assert "top-1 drop under band noise (by band)" in summary and "0.25π" in summary
  recorded = json.loads((tmp_path / "results.json").read_text())
  assert recorded["analyses"]["robustness"]["options"]["bands"] == [0.25, 0.75]


def _save(path, image):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray((image * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """train/ and val/ folders of two classes (disk, square) and a cue-conflict folder named
  `<shape>/<shape><n>-<texture><m>.png`."""
  root = tmp_path_factory.mktemp("folders")
  source = ShapesTextures(24, "train", 400, shapes=("disk", "square"))
  names = ("disk", "square")
  counts = {"train": 0, "val": 0}
  for i in range(400):
    item = source[i]
    split = "train" if i < 300 else "val"
    counts[split] += 1
    _save(root / split / names[item["shape"]] / f"{i:03d}.png", item["image"])
  for i in range(12):
    item = source[i]
    shape = names[item["shape"]]
    _save(root / "cue" / shape / f"{shape}{i}-{names[1 - item['shape']]}{i}.png", item["image"])
  return root


@pytest.mark.slow
def test_image_folders_with_a_cue_conflict_set(folders, tmp_path):
  config = _config(source="image_folder", path=str(folders / "val"), num_images=0,
                   probe=dict(path=str(folders / "train"), num_images=0,
                              cue_conflict_path=str(folders / "cue")))
  config.analyses = "probing"
  results = analyze.run(config, str(tmp_path))
  values = next(iter(results["models"].values()))
  assert set(k for k in values if k.startswith("probe_")) == {"probe_label_cls",
                                                             "probe_label_mean_tokens"}
  details = values["probing_details"]
  assert details["targets"]["label"]["classes"] == ["disk", "square"]
  assert details["targets"]["label"]["train_images"] == 300
  conflict = details["cue_conflict"]
  assert conflict["images"] == 12 and "decision_top1" not in conflict
  # Two classes: every decision names the shape or the texture.
  assert all(share == [1.0, 1.0] for share in conflict["decided_share"])


def test_probing_without_a_training_folder_is_refused(folders, tmp_path, no_compute):
  config = _config(source="image_folder", path=str(folders / "val"), num_images=0)
  with pytest.raises(ClmimError, match="config.probe_data.path is empty"):
    analyze.run(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_a_cue_conflict_file_without_a_texture_class_is_refused(folders, tmp_path, no_compute):
  bad = tmp_path / "cue"
  _save(bad / "disk" / "disk1.png", np.zeros((8, 8, 3)))
  config = _config(source="image_folder", path=str(folders / "val"), num_images=0,
                   probe=dict(path=str(folders / "train"), cue_conflict_path=str(bad)))
  with pytest.raises(ClmimError, match="disk1.png.*'<shape><n>-<texture><m>'"):
    analyze.run(config, str(tmp_path / "out"))


@pytest.mark.parametrize("option, value, message", [
    ("bands", (0.5, 1.2), r"band centre 1.2π is outside \(0, π\)"),
    ("bands", (0.44,), "holds no frequency bin"),  # 16 px: bins 0.125π apart
    ("white_rms", (0.1, -1.0), "not positive"),
    ("block", 7, "expected a block 1 .. 2"),
    ("target", "label", "the data has the targets shape, texture"),
])
def test_bad_robustness_options_are_refused(option, value, message, tmp_path, no_compute):
  config = _config(robustness_config)
  config.analyses = "robustness"
  if option == "bands":
    config.analysis_options.robustness.band_width = 0.05
  setattr(config.analysis_options.robustness, option, value)
  with pytest.raises(ClmimError, match=message):
    analyze.run(config, str(tmp_path))


def _png(value):
  out = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(out, "PNG")
  return io.BytesIO(out.getvalue())


@pytest.mark.slow
def test_a_labelled_tfds_dataset_is_probed_and_too_few_training_images_are_refused(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class ClmimGreys(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Three classes of flat grey images: dark, middle, light."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="png"),
          "label": tfds.features.ClassLabel(names=["dark", "middle", "light"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(30), "validation": self._generate_examples(12)}

    def _generate_examples(self, count):
      for i in range(count):
        yield i, {"image": _png(40 + 80 * (i % 3) + i % 7), "label": i % 3}

  ClmimGreys(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  config = _config(source="tfds", tfds_name="clmim_greys", data_dir=str(tmp_path / "tfds"),
                   num_images=0, probe=dict(num_images=0))
  config.analyses = "probing"
  values = next(iter(analyze.run(config, str(tmp_path / "out"))["models"].values()))
  details = values["probing_details"]["targets"]["label"]
  assert details["classes"] == ["dark", "middle", "light"] and details["train_images"] == 30
  assert values["probe_label_mean_tokens"][-1] == 1.0  # three grey levels: trivially separable
  assert values["knn_label_mean_tokens"][-1] == 1.0
  config.probe_data.num_images = 1  # one image: held out to choose the ridge, none to fit
  with pytest.raises(ClmimError, match="leave 0 to fit"):
    analyze.run(config, str(tmp_path / "again"))


def test_a_dataset_without_labels_is_refused(tmp_path, no_compute):
  tfds = pytest.importorskip("tensorflow_datasets")

  class ClmimUnlabelled(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="png")}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(), "validation": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        out = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(out, "PNG")
        yield i, {"image": io.BytesIO(out.getvalue())}

  ClmimUnlabelled(data_dir=str(tmp_path / "tfds"), file_format="array_record") \
      .download_and_prepare()
  for analyses in ("probing", "robustness"):
    config = _config(source="tfds", tfds_name="clmim_unlabelled", data_dir=str(tmp_path / "tfds"),
                     num_images=0)
    config.analyses = analyses
    with pytest.raises(ClmimError, match="has no class label"):
      analyze.run(config, str(tmp_path / "out"))


def test_data_fields_and_options_reach_the_probes(tmp_path):
  from clmim.analysis import probing, robustness
  from clmim.data.labelled import ProbeData
  config = _config(probe=dict(split="cue_conflict", num_images=10))
  data = ProbeData(config.data, config.probe_data,
                   {"image_size": 16, "mean": "half", "std": "half"})
  assert "split 'cue_conflict'" in data.train().description and len(data.train().images) == 10
  assert probing.feature_kinds({"features": "mean_tokens"}) == ("mean_tokens",)
  with pytest.raises(ClmimError, match="features"):
    probing.feature_kinds({"features": "cls,tokens"})
  conditions = robustness._conditions(32, {**robustness.OPTIONS, "band_rms": 0.3,
                                           "white_rms": (0.05,)})
  assert conditions["rms"].tolist() == pytest.approx([0.3] * 9 + [0.05])
  assert conditions["kind"].tolist() == [0] * 9 + [1]
