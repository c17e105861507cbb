"""TFDS sources without TensorFlow: mocked imagenet2012, a real array_record split, bad input."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from clmim.jobs import analyze  # noqa: E402
from clmim.data import loader  # noqa: E402
from clmim.data.eval_data import EvalImages  # noqa: E402
from clmim.data.preprocess import EvalPreprocess  # noqa: E402
from clmim.data.tfds_source import TfdsImages  # noqa: E402
from clmim.errors import ClmimError  # noqa: E402
from tiny_checkpoints import save_random_checkpoint
from configs import analyze as all_config  # noqa: E402
from configs import pretrain_simmim  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPROCESSING = {"image_size": 16, "crop_pct": 0.875, "interpolation": "bicubic",
                 "mean": "imagenet", "std": "imagenet"}
LABELS = [0, 1, 2, 0, 0, 1, 2, 2, 2, 1, 0, 2]  # validation split: 4, 3 and 5 per class


def _jpeg(index: int) -> bytes:
  """A small photo-like JPEG whose size and content depend on `index`."""
  h, w = 20 + 3 * index, 26 + (index % 4) * 5
  yy, xx = np.mgrid[0:h, 0:w]
  noise = np.random.default_rng(index).integers(0, 60, (h, w, 3))
  pixels = np.stack([xx * 200 / w, yy * 200 / h, np.full((h, w), 20.0 * index)], -1) + noise
  out = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
  return out.getvalue()


class ClmimTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tiny image-classification dataset, written as array_record without TensorFlow."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=3),
        "file_name": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"validation": self._generate_examples(LABELS), "train": self._generate_examples([1])}

  def _generate_examples(self, labels):
    for i, label in enumerate(labels):
      yield i, {"image": io.BytesIO(_jpeg(i)), "label": label, "file_name": f"{i:02d}.jpg"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  ClmimTinyImages(data_dir=str(root), file_format="array_record").download_and_prepare()
  return str(root)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A small random SimMIM-style encoder (depth 2, 32 px)."""
  path = tmp_path_factory.mktemp("ckpt") / "simmim"
  save_random_checkpoint(path, pretrain_simmim)
  return str(path)


def _cfg(**fields):
  config = all_config.get_config("runlocal")
  config.data.source = "tfds"
  config.data.num_images = 0
  for key, value in fields.items():
    setattr(config.data, key, value)
  return config


def test_array_record_split_reads_like_image_files(data_dir, tmp_path):
  pp = EvalPreprocess(16, 0.875, "bicubic")
  source = TfdsImages("clmim_tiny_images", "validation", pp, data_dir)
  assert source.route == "array_record" and len(source) == len(LABELS)
  assert (source.image_key, source.label_key) == ("image", "label")
  # Same JPEG bytes, decoded by PIL from a file: the same pixels, bit for bit.
  decoded = tfds.data_source("clmim_tiny_images", split="validation", data_dir=data_dir)
  names = [decoded[i]["file_name"] for i in range(len(decoded))]
  names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
  for position, name in enumerate(names):
    index = int(name[:2])
    path = tmp_path / name
    path.write_bytes(_jpeg(index))
    with Image.open(path) as image:
      np.testing.assert_array_equal(source.load(position), pp(image))
  np.testing.assert_array_equal(source.labels(), [LABELS[int(n[:2])] for n in names])
  assert "tensorflow" not in sys.modules


def test_subsampling_padding_and_order(data_dir):
  full = EvalImages(_cfg(tfds_name="clmim_tiny_images", data_dir=data_dir).data, PREPROCESSING)
  labels = full.dataset.labels()
  assert len(full) == 12 and "clmim_tiny_images" in full.description
  sub = EvalImages(_cfg(tfds_name="clmim_tiny_images", data_dir=data_dir,
                        max_images_per_class=2).data, PREPROCESSING)
  expected = [i for i in range(12) if list(labels[:i]).count(labels[i]) < 2]
  np.testing.assert_array_equal(sub._positions, expected)
  half = EvalImages(_cfg(tfds_name="clmim_tiny_images", data_dir=data_dir,
                         fraction_per_class=0.5).data, PREPROCESSING)
  assert len(half) == 2 + 1 + 2  # int(4 / 2), int(3 / 2), int(5 / 2)
  # Any sub-list, with padding, in any batch size: the same images as one ordered pass.
  everything = np.concatenate(list(full.batches(5)))
  got = list(full.load_batches([3, loader.PAD, 0, 11], batch_size=3, prefetch_batches=0))
  images = np.concatenate([b[0] for b in got])
  np.testing.assert_array_equal(np.concatenate([b[1] for b in got]), [1, 0, 1, 1])
  np.testing.assert_array_equal(images[[0, 2, 3]], everything[[3, 0, 11]])
  assert not images[1].any()


def test_mock_imagenet2012_validation_end_to_end(checkpoint, tmp_path):
  """The analysis job on tfds.testing.mock_data's imagenet2012: no download, no TensorFlow."""
  run_config = _cfg(tfds_name="imagenet2012", split="validation")
  run_config.models = checkpoint
  run_config.batch_size = 8
  run_config.progress = False
  with tfds.testing.mock_data(num_examples=11):
    images = EvalImages(run_config.data, {"image_size": 32})
    assert len(images) == 11 and images.dataset.route == "array_record-decoded"
    first = np.concatenate(list(images.batches(4)))
    np.testing.assert_array_equal(np.concatenate(list(images.batches(11))), first)
    results = analyze.run(run_config, str(tmp_path / "out"))
  assert results["num_images"] == 11
  (name,) = results["models"]  # the one model, whatever its runlocal export is called
  assert "imagenet2012" in results["model_info"][name]["data"]
  assert np.isfinite(np.asarray(results["models"][name]["nmi"])).all()
  assert os.path.exists(tmp_path / "out" / "results.json")
  assert "tensorflow" not in sys.modules


def test_max_batches_caps_the_images(checkpoint, tmp_path, data_dir):
  run_config = _cfg(tfds_name="clmim_tiny_images", data_dir=data_dir, max_batches=1)
  run_config.models, run_config.batch_size, run_config.progress = checkpoint, 8, False
  results = analyze.run(run_config, str(tmp_path / "out"))
  assert results["num_images"] == 8  # one step of 8 out of 12 images


def test_bad_split_and_names(data_dir, tmp_path):
  pp = EvalPreprocess(16)
  with pytest.raises(ClmimError, match=r"clmim_tiny_images split 'test'.*no such split.*"
                                       r"validation"):
    TfdsImages("clmim_tiny_images", "test", pp, data_dir)
  with pytest.raises(ClmimError, match="'no_such_dataset' is not a dataset TFDS knows"):
    TfdsImages("no_such_dataset", "validation", pp, str(tmp_path))
  with pytest.raises(ClmimError, match="tfds_name is empty"):
    EvalImages(_cfg(tfds_name="").data, PREPROCESSING)
  with pytest.raises(ClmimError, match="not both"):
    EvalImages(_cfg(tfds_name="clmim_tiny_images", data_dir=data_dir, max_images_per_class=1,
                    fraction_per_class=0.5).data, PREPROCESSING)
  with pytest.raises(ClmimError, match="keeps no image"):
    EvalImages(_cfg(tfds_name="clmim_tiny_images", data_dir=data_dir,
                    fraction_per_class=0.1).data, PREPROCESSING)


def test_missing_imagenet_names_the_command(tmp_path):
  """From the command line: one line, naming the data folder and the exact command."""
  empty = tmp_path / "tfds_data"
  empty.mkdir()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      [sys.executable, "-m", "clmim.main", "--config", "configs/nmi.py:runlocal",
       "--config.data.source=tfds", "--config.data.tfds_name=imagenet2012",
       f"--config.data.data_dir={empty}", f"--workdir={tmp_path / 'out'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("clmim: error:")]
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
  message = errors[0]
  # Only the error: not TFDS's "Variant folder ... has no dataset_info.json" log lines before it.
  assert [line for line in result.stderr.splitlines() if line.strip()] == errors, result.stderr
  assert f"'imagenet2012' is not prepared in {empty}" in message
  assert (f"pip install tensorflow importlib_resources && python -c \"import tensorflow_datasets "
          f"as tfds; tfds.builder('imagenet2012', data_dir='{empty}', "
          "file_format='array_record').download_and_prepare()\"" in message)
  assert "ILSVRC2012_img_val.tar" in message and str(empty / "downloads" / "manual") in message
  assert not os.path.exists(tmp_path / "out" / "results.json")


def test_missing_dataset_logs_nothing_before_its_error(tmp_path, caplog):
  """TFDS logs through absl while it looks for a dataset; the ClmimError alone says it."""
  pp = EvalPreprocess(16)
  for name in ("imagenet2012", "imagenette/320px-v2"):
    with caplog.at_level("DEBUG"), pytest.raises(ClmimError, match="is not prepared in"):
      TfdsImages(name, "validation", pp, str(tmp_path))
  assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_held_logs_are_logged_when_the_split_opens(caplog):
  from absl import logging as absl_logging
  from clmim.data import tfds_source
  with caplog.at_level("INFO"):
    with tfds_source._held_logs():
      absl_logging.warning("kept %s", "back")
      assert not caplog.records  # held while the split is being opened
    assert [r.getMessage() for r in caplog.records] == ["kept back"]
    with pytest.raises(ClmimError), tfds_source._held_logs():
      absl_logging.warning("dropped")
      raise ClmimError("the dataset is not there")
  assert [r.getMessage() for r in caplog.records] == ["kept back"]
