"""TensorFlow Datasets (TFDS) splits as evaluation images, without TensorFlow by default.

  TfdsImages("imagenet2012", "validation", EvalPreprocess(224, 0.875, "bicubic"))

Any TFDS name works (imagenet2012, imagenette, "imagenette/320px-v2", a dataset you prepared
yourself), in two storage forms:

- array_record (random access; `tfds build ... --file_format=array_record`): read through
  `tfds.data_source`, which needs neither TensorFlow nor grain. Records are read as raw bytes
  and parsed with TFDS's own tf.Example proto, and the image bytes are decoded with PIL, exactly
  as an image file is, so a TFDS split and an image folder of the same JPEGs give the same
  pixels. Where raw records cannot be read (e.g. under `tfds.testing.mock_data`, whose fake
  records need TensorFlow to serialise), TFDS's own numpy decoding is used instead.
- tfrecord (sequential): read with `tfds.builder(...).as_dataset` when TensorFlow is installed
  (an optional extra); the loader streams the split once in file order and decodes only the
  positions this process needs. Without TensorFlow the error says how to convert the data.

Nothing here downloads: a split that is not prepared raises a ClmimError with the exact
command that prepares it. Records keep the order TFDS wrote them in, which is fixed.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Iterator, List, Optional, Sequence

import numpy as np

from clmim.data.loader import PAD
from clmim.data.preprocess import pil_image
from clmim.errors import ClmimError

_LABEL_CHUNK = 1024  # records per read when only the labels are wanted
# The pip requirement named when TFDS is missing (the pin of requirements.txt).
TFDS_REQUIREMENT = "tensorflow-datasets==4.9.10"
NEEDS_PILLOW = "decoding TFDS images (config.data.source='tfds')"


def _import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ClmimError(f"config.data.source='tfds' needs tensorflow-datasets, which is not "
                     f"installed: pip install {TFDS_REQUIREMENT} array_record (TensorFlow is "
                     "not needed).") from e
  return tfds


def _has_tensorflow() -> bool:
  """Whether TensorFlow is installed (without importing it, which takes seconds)."""
  import importlib.util
  try:
    return importlib.util.find_spec("tensorflow") is not None
  except (ImportError, ValueError):  # a broken or blocked install counts as missing
    return False


@contextlib.contextmanager
def _held_logs() -> Iterator[List[logging.LogRecord]]:
  """Holds back what TFDS logs (through absl) while a split is opened.

  Looking for a dataset that is not there, TFDS logs warnings such as "Variant folder ... has
  no dataset_info.json" before it raises; the ClmimError raised then says what is wrong in one
  line, so the held records are dropped. When the split opens, they are logged as usual.
  """
  logger = logging.getLogger("absl")
  held = []

  def hold(record):
    held.append(record)
    return False

  logger.addFilter(hold)
  try:
    yield held
  finally:
    logger.removeFilter(hold)
  for record in held:  # reached only when the block succeeded
    logger.handle(record)


def default_data_dir(data_dir: Optional[str]) -> str:
  """The folder TFDS looks in: `data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  if data_dir:
    return os.path.abspath(os.path.expanduser(data_dir))
  from tensorflow_datasets.core import constants
  return constants.get_default_data_dir()


def build_command(name: str, root: str) -> str:
  """A shell command that prepares TFDS dataset `name` as array_record under `root`.

  It calls the builder from Python rather than the `tfds build` CLI, which in TFDS 4.9 also
  imports apache_beam. Building (not reading) needs TensorFlow, and importlib_resources.
  """
  return ("pip install tensorflow importlib_resources && python -c \"import tensorflow_datasets "
          f"as tfds; tfds.builder('{name}', data_dir='{root}', file_format='array_record')"
          ".download_and_prepare()\"")


def _prepare_command(builder, name: str, root: str) -> str:
  """The exact shell command (and manual step, if any) that prepares `name` in `root`."""
  command = build_command(name, root)
  manual = " ".join((getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) or "").split())
  if manual:
    return (f"put the files it needs in {os.path.join(root, 'downloads', 'manual')} "
            f"({manual}), then run: {command}")
  return f"run: {command}"


def _feature_key(features, kind, preferred: str, name: str, required: bool) -> Optional[str]:
  """The top-level feature holding the image (or label): `preferred` if it is one, else the
  only feature of that kind."""
  keys = [k for k, f in features.items() if isinstance(f, kind)]
  if preferred in keys:
    return preferred
  if len(keys) == 1:
    return keys[0]
  if not required and not keys:
    return None
  what = "an image" if preferred == "image" else "a class label"
  raise ClmimError(f"TFDS dataset {name!r} has {len(keys) or 'no'} {kind.__name__} features "
                   f"{keys or ''}: expected exactly one, or one named {preferred!r}, to use as "
                   f"{what}.")


class TfdsImages:
  """Random access to one TFDS split, preprocessed: `len`, `labels()`, `load(position)`.

  Attributes:
    name, split: the TFDS dataset and split, as given.
    data_dir: the folder the data was read from.
    image_key, label_key: the features used (label_key None when there is no class label).
    image_shape: shape of one preprocessed image.
    route: "array_record" (raw records, PIL decode), "array_record-decoded" (TFDS decodes) or
      "tfrecord" (tf.data, sequential).
  """

  def __init__(self, name: str, split: str, preprocess, data_dir: Optional[str] = None):
    """Opens the split (no decoding yet); every problem with it raises one ClmimError."""
    if not name:
      raise ClmimError("config.data.tfds_name is empty: name a TFDS dataset, e.g. "
                       "'imagenet2012' or 'imagenette'.")
    tfds = _import_tfds()
    pil_image(NEEDS_PILLOW)  # TFDS does not need Pillow, clmim's decoding does: say so now
    self.name, self.split, self.preprocess = name, split, preprocess
    self.data_dir = default_data_dir(data_dir)
    self.image_shape = tuple(getattr(preprocess, "output_shape", ()))
    self._raw = self._decoded = None
    self._labels = None
    where = f"TFDS {name} split {split!r} in {self.data_dir}"
    with _held_logs():  # a split that is not there: the error alone, without TFDS's log lines
      info = self._open(tfds, where)
    features = info.features
    self._features = features
    self.image_key = _feature_key(features, tfds.features.Image, "image", name, True)
    self.label_key = _feature_key(features, tfds.features.ClassLabel, "label", name, False)
    if self._decoded is not None:
      self._raw = self._try_raw_route(tfds)
      self.length = len(self._decoded)
    if not self.length:
      raise ClmimError(f"{where} has no examples: expected a non-empty split.")

  def _open(self, tfds, where: str):
    """Opens the split with `tfds.data_source` (or tf.data); returns its DatasetInfo."""
    name, split = self.name, self.split
    try:
      self._decoded = tfds.data_source(name, split=split, data_dir=self.data_dir, download=False)
      self.route = "array_record-decoded"
      return self._decoded.dataset_info
    except ClmimError:
      raise
    except tfds.core.DatasetNotFoundError as e:
      raise ClmimError(f"TFDS dataset {name!r} is not a dataset TFDS knows and is not prepared "
                       f"in {self.data_dir}: expected a TFDS name such as 'imagenet2012' or "
                       "'imagenette', or the folder holding your prepared dataset as "
                       "config.data.data_dir.") from e
    except ValueError as e:
      if "split" not in str(e).lower():
        raise ClmimError(f"Cannot open {where}: {_one_line(e)}") from e
      raise ClmimError(f"{where}: no such split ({_one_line(e)}).") from e
    except Exception as e:  # noqa: BLE001 (TFDS raises many types for "not there")
      return self._open_unprepared_or_tfrecord(tfds, e, where)

  def _open_unprepared_or_tfrecord(self, tfds, error: Exception, where: str):
    """Explains why `tfds.data_source` failed, or opens a tfrecord split with tf.data."""
    try:
      builder = tfds.builder(self.name, data_dir=self.data_dir)
    except Exception as e:  # noqa: BLE001
      raise ClmimError(f"Cannot open {where}: {_one_line(e)}") from error
    if not builder.is_prepared():
      raise ClmimError(f"TFDS dataset {self.name!r} is not prepared in {self.data_dir}; to "
                       f"prepare it (TensorFlow is needed to build, not to read), "
                       f"{_prepare_command(builder, self.name, self.data_dir)}") from error
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if file_format != "tfrecord":
      raise ClmimError(f"Cannot open {where} ({file_format} files): {_one_line(error)}") \
          from error
    if not _has_tensorflow():
      raise ClmimError(
          f"{where} is stored as tfrecord, which needs TensorFlow to read: pip install "
          "tensorflow (clmim then reads it with tf.data), or rebuild it as array_record in "
          f"another folder: {build_command(self.name, self.data_dir + '_array_record')}"
          f" and set config.data.data_dir={self.data_dir}_array_record.") from error
    try:
      self.length = int(builder.info.splits[self.split].num_examples)
    except (KeyError, ValueError) as e:
      raise ClmimError(f"{where}: no such split; expected one of "
                       f"{sorted(builder.info.splits)}.") from e
    self.route = "tfrecord"
    self._builder = builder
    return builder.info

  def _try_raw_route(self, tfds):
    """The same split as raw records, if TFDS can serve them here; else None."""
    try:
      raw = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False,
                             deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
      if len(raw):
        self._image_bytes(raw[0])
    except Exception:  # noqa: BLE001 (mocked or unusual records: TFDS decodes instead)
      return None
    self.route = "array_record"
    return raw

  @staticmethod
  def _parse(record: bytes):
    from tensorflow_datasets.proto import tf_example_pb2  # TFDS's copy; no TensorFlow
    return tf_example_pb2.Example.FromString(record).features.feature

  def _image_bytes(self, record: bytes) -> bytes:
    values = self._parse(record)[self.image_key].bytes_list.value
    if len(values) != 1:
      raise ValueError(f"feature {self.image_key!r} holds {len(values)} byte strings, not one")
    return values[0]

  def __len__(self) -> int:
    return self.length

  def labels(self) -> np.ndarray:
    """The class label of every example, in order (read once, without decoding images)."""
    if self._labels is not None:
      return self._labels
    if self.label_key is None:
      raise ClmimError(f"TFDS dataset {self.name!r} has no ClassLabel feature, so it cannot be "
                       "subsampled per class: set max_images_per_class and fraction_per_class "
                       "to 0.")
    key = self.label_key
    if self._raw is not None:
      labels = []
      for start in range(0, self.length, _LABEL_CHUNK):
        records = self._raw.__getitems__(list(range(start, min(start + _LABEL_CHUNK,
                                                                 self.length))))
        labels += [self._parse(r)[key].int64_list.value[0] for r in records]
    elif self._decoded is not None:
      labels = [int(self._decoded[i][key]) for i in range(self.length)]
    else:
      labels = [int(ex[key]) for ex in self._tf_examples()]
    self._labels = np.asarray(labels, np.int64)
    return self._labels

  def class_names(self) -> tuple:
    """The names of the label ids (the ClassLabel's names), or their numbers when it has none."""
    feature = self._features[self.label_key]
    names = list(getattr(feature, "names", None) or [])
    return tuple(names) if names else tuple(str(i) for i in range(int(feature.num_classes)))

  def _decode(self, data, position) -> np.ndarray:
    Image = pil_image(NEEDS_PILLOW)  # the module, under its usual name
    try:
      if isinstance(data, np.ndarray):  # TFDS decoded it already (uint8 [H, W, C])
        image = Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data)
        return self.preprocess(image)
      with Image.open(io.BytesIO(data)) as image:
        image.load()
        return self.preprocess(image)
    except ClmimError:
      raise
    except Exception as e:  # noqa: BLE001 (PIL raises OSError, SyntaxError, ValueError, ...)
      raise ClmimError(f"Cannot decode image {position} of TFDS {self.name} split "
                       f"{self.split!r} ({self.data_dir}): {_one_line(e)}") from e

  @property
  def random_access(self) -> bool:
    """False for tfrecord data: use `stream` + `decode_record` instead of `load`."""
    return self.route != "tfrecord"

  def load(self, position: int) -> np.ndarray:
    """Reads, decodes and preprocesses example `position` of the split."""
    if not self.random_access:
      raise ClmimError(f"TFDS {self.name} split {self.split!r} is tfrecord data: it can only be "
                       "streamed in order.")
    try:
      if self._raw is not None:
        data = self._image_bytes(self._raw[position])
      else:
        data = self._decoded[position][self.image_key]
    except (IndexError, KeyError, ValueError, OSError) as e:
      raise ClmimError(f"Cannot read example {position} of TFDS {self.name} split "
                       f"{self.split!r} ({self.data_dir}): {_one_line(e)}") from e
    return self._decode(data, position)

  # tfrecord route (TensorFlow installed): one ordered pass over the split.

  def _tf_examples(self) -> Iterator[dict]:
    tfds = _import_tfds()
    dataset = self._builder.as_dataset(
        split=self.split, shuffle_files=False,
        decoders={self.image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(try_autocache=False))
    return iter(tfds.as_numpy(dataset))

  def stream(self, positions: Sequence[int]) -> Iterator:
    """Yields (position, image bytes) for each position (None for PAD), in one ordered pass;
    real positions must ascend."""
    examples = enumerate(self._tf_examples())
    current = -1
    for position in positions:
      if position == PAD:
        yield None
        continue
      if position <= current:
        raise ClmimError("TFDS tfrecord streams need ascending positions.")
      for current, example in examples:
        if current == position:
          break
      else:
        raise ClmimError(f"TFDS {self.name} split {self.split!r} ended before example "
                         f"{position}.")
      yield position, example[self.image_key]

  def decode_record(self, item) -> np.ndarray:
    """Decodes one item of `stream`."""
    position, data = item
    return self._decode(data, position)

  def __repr__(self):
    return (f"TfdsImages({self.name!r}, split={self.split!r}, {self.length} examples, "
            f"route={self.route!r}, data_dir={self.data_dir!r})")


def _one_line(error: Exception) -> str:
  """The first line of an error message (TFDS messages can list every dataset it knows)."""
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__
