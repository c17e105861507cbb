"""ImageFolder: labels, deterministic order, batching, limits and errors, on files made here."""
import os

import numpy as np
import pytest
from PIL import Image

from clmim.data.image_folder import ImageFolder
from clmim.data.preprocess import EvalPreprocess
from clmim.errors import ClmimError

# Identity normalisation, so each image's constant colour can be read back.
PP = EvalPreprocess(8, crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1))


def _write(path, value, size=(12, 10), fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, (value, value, value)).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
  """Three classes; the file's grey level encodes (class, position) so order can be checked."""
  layout = {"cat": ["b.png", "a.jpg", "c.JPEG"], "ant": ["z.png", "y.bmp"],
            "dog": ["x.png", "sub/w.png"]}
  for cls, names in layout.items():
    for name in names:
      # Value = 40 * class id + 10 * rank of the name within its class (sorted order).
      rank = sorted(names).index(name)
      _write(tmp_path / cls / name, 40 * sorted(layout).index(cls) + 10 * rank)
  (tmp_path / "cat" / "notes.txt").write_text("not an image")
  (tmp_path / ".hidden").mkdir()
  return tmp_path


def test_labels_order_and_items(folder):
  ds = ImageFolder(folder, PP)
  assert ds.classes == ["ant", "cat", "dog"]
  assert len(ds) == 7
  rel = [os.path.relpath(f, folder) for f in ds.files]
  assert rel == ["ant/y.bmp", "ant/z.png", "cat/a.jpg", "cat/b.png", "cat/c.JPEG",
                 "dog/sub/w.png", "dog/x.png"]
  assert ds.labels == [0, 0, 1, 1, 1, 2, 2]
  for i in range(len(ds)):
    img, label = ds[i]
    assert img.shape == (8, 8, 3) and img.dtype == np.float32 and label == ds.labels[i]
    rank = [0, 1, 0, 1, 2, 0, 1][i]
    # JPEG is lossy: allow a couple of grey levels.
    np.testing.assert_allclose(img * 255, 40 * label + 10 * rank, atol=2)
  np.testing.assert_array_equal(ds[-1][0], ds[6][0])
  with pytest.raises(IndexError):
    ds[7]


def test_batches_match_items_and_last_batch_is_smaller(folder):
  ds = ImageFolder(folder, PP, num_workers=3)
  got = list(ds.batches(3))
  assert [b[0].shape[0] for b in got] == [3, 3, 1]
  images = np.concatenate([b[0] for b in got])
  labels = np.concatenate([b[1] for b in got])
  assert images.shape == (7, 8, 8, 3) and labels.dtype == np.int32
  np.testing.assert_array_equal(labels, ds.labels)
  np.testing.assert_array_equal(images, np.stack([ds[i][0] for i in range(7)]))
  assert [b[0].shape[0] for b in ds.batches(2, num_images=5)] == [2, 2, 1]
  assert sum(b[0].shape[0] for b in ds.batches(4, num_images=100)) == 7
  # Stopping early must not hang or leak: the generator cancels the rest.
  it = ds.batches(1, prefetch_batches=4)
  next(it)
  it.close()


def test_max_images_per_class(folder):
  ds = ImageFolder(folder, PP, max_images_per_class=1)
  assert [os.path.relpath(f, folder) for f in ds.files] == ["ant/y.bmp", "cat/a.jpg",
                                                            "dog/sub/w.png"]
  assert ds.labels == [0, 1, 2]
  with pytest.raises(ClmimError, match="max_images_per_class"):
    ImageFolder(folder, PP, max_images_per_class=0)


def test_extensions_filter(folder):
  ds = ImageFolder(folder, PP, extensions=("PNG",))
  assert all(f.endswith(".png") for f in ds.files) and len(ds) == 4


def test_missing_or_empty_folders(tmp_path):
  with pytest.raises(ClmimError, match="does not exist"):
    ImageFolder(tmp_path / "nope", PP)
  with pytest.raises(ClmimError, match=r"no class sub-folders.*\.png") as e:
    ImageFolder(tmp_path, PP)
  assert str(tmp_path) in str(e.value)
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "readme.txt").write_text("x")
  with pytest.raises(ClmimError, match=r"has no images.*\.jpeg") as e:
    ImageFolder(tmp_path, PP)
  assert str(tmp_path / "a") in str(e.value)


def test_corrupt_file_names_the_file(tmp_path):
  _write(tmp_path / "a" / "good.png", 100)
  bad = tmp_path / "a" / "zbad.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
  ds = ImageFolder(tmp_path, PP)
  with pytest.raises(ClmimError, match="zbad.png"):
    ds[1]
  with pytest.raises(ClmimError, match="zbad.png"):
    list(ds.batches(2))
  # A truncated file (valid header, pixel data cut off) also names the file.
  noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
  Image.fromarray(noise).save(bad)
  bad.write_bytes(bad.read_bytes()[:6000])
  with pytest.raises(ClmimError, match="zbad.png"):
    ds[1]


def test_fraction_per_class_takes_the_first_files(folder):
  # int(fraction * class size), in sorted order, as the official notebooks' subsample does.
  ds = ImageFolder(folder, PP, fraction_per_class=0.5)
  assert [os.path.relpath(f, folder) for f in ds.files] == ["ant/y.bmp", "cat/a.jpg",
                                                            "dog/sub/w.png"]
  assert len(ImageFolder(folder, PP, fraction_per_class=0.7)) == 1 + 2 + 1
  with pytest.raises(ClmimError, match="keeps no image"):
    ImageFolder(folder, PP, fraction_per_class=0.2)
  with pytest.raises(ClmimError, match="not both"):
    ImageFolder(folder, PP, max_images_per_class=1, fraction_per_class=0.5)
  with pytest.raises(ClmimError, match=r"fraction_per_class = 1.5"):
    ImageFolder(folder, PP, fraction_per_class=1.5)


def test_unreadable_folders_name_the_folder(folder, monkeypatch):
  # Permissions do not stop root (tests may run as root), so the OS error is simulated.
  real_scandir = os.scandir

  def denied_at(target):
    def scandir(path="."):
      if os.path.abspath(path) == os.path.abspath(target):
        raise PermissionError(13, "Permission denied", str(path))
      return real_scandir(path)
    return scandir

  monkeypatch.setattr(os, "scandir", denied_at(folder))
  with pytest.raises(ClmimError, match=r"Cannot read image folder .*Permission denied") as e:
    ImageFolder(folder, PP)
  assert str(folder) in str(e.value)
  # A class folder that cannot be listed is an error too, not a class that looks empty.
  monkeypatch.setattr(os, "scandir", denied_at(folder / "dog" / "sub"))
  with pytest.raises(ClmimError, match=r"Cannot read image folder .*sub.*Permission denied"):
    ImageFolder(folder, PP)
