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


def _noise(path, size=(64, 64)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), np.uint8)).save(path)


def _no_decode(image):
  raise AssertionError("an image was decoded before the folder was checked")


def test_every_unreadable_file_is_named_in_one_error_before_streaming(tmp_path, monkeypatch):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2x: 2000 pixels, not 95 MP
  for name in ("ok1.png", "ok2.jpg"):
    _write(tmp_path / "a" / name, 100)
  bad = {"a/b_png.png": b"\x89PNG\r\n\x1a\n this is not really a png",
         "a/c_empty.jpg": b"", "b/d_text.jpeg": b"plain text", "b/e_jpg.jpg": b"\xff\xd8\xff junk",
         "b/f_bmp.bmp": b"BM junk"}
  for name, data in bad.items():
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(data)
  _write(tmp_path / "b" / "g_huge.png", 7, size=(50, 50))  # 2500 > 2 x 1000 pixels
  with pytest.raises(ClmimError) as e:
    ImageFolder(tmp_path, _no_decode)
  message = str(e.value)
  assert "\n" not in message and str(tmp_path) in message
  assert "6 of 8 files cannot be read" in message
  for name in list(bad)[:5]:  # the first five by name, then how many more
    assert repr(name) in message, message
  assert "'a/c_empty.jpg' (an empty file)" in message
  assert "and 1 more" in message and "python -m clmim.data.image_check" in message
  # The sixth is named by the command the message suggests, with why PIL refuses it.
  from clmim.data import image_check
  assert image_check.main([str(tmp_path)]) == 1


def test_image_check_lists_every_problem(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  _write(tmp_path / "a" / "ok.png", 1)
  _write(tmp_path / "a" / "huge.png", 7, size=(50, 50))
  (tmp_path / "a" / "empty.png").write_bytes(b"")
  from clmim.data import image_check
  assert image_check.main([str(tmp_path)]) == 1
  lines = capsys.readouterr().out.splitlines()
  assert lines == [f"{tmp_path / 'a' / 'empty.png'}: an empty file",
                   f"{tmp_path / 'a' / 'huge.png'}: 2500 pixels, over twice PIL's "
                   "decompression-bomb limit of 1000 pixels, so PIL refuses to decode it: "
                   "downscale it"]


def test_truncated_file_passes_the_header_check_and_fails_naming_it(tmp_path):
  _write(tmp_path / "a" / "good.png", 100)
  bad = tmp_path / "a" / "zbad.png"
  _noise(bad)
  bad.write_bytes(bad.read_bytes()[:6000])  # valid header, pixel data cut off
  ds = ImageFolder(tmp_path, PP)  # the header check cannot see it
  for attempt in (lambda: ds[1], lambda: list(ds.batches(2))):
    with pytest.raises(ClmimError, match=r"Cannot decode image .*zbad.png.*replace or remove"):
      attempt()


def test_tiff_is_read_and_other_extensions_are_named_once(tmp_path, capsys):
  _write(tmp_path / "a" / "rgb.tif", 50)
  Image.new("L", (12, 10), 90).save(tmp_path / "a" / "grey.TIFF")
  (tmp_path / "b").mkdir()
  Image.fromarray(np.full((10, 12), 65535, np.uint16)).save(tmp_path / "b" / "deep.tif")
  (tmp_path / "b" / "photo.heic").write_bytes(b"not read")
  (tmp_path / "b" / "notes.txt").write_text("not an image")
  (tmp_path / "b" / "README").write_text("no extension")
  ds = ImageFolder(tmp_path, PP)
  assert [os.path.relpath(f, tmp_path) for f in ds.files] == ["a/grey.TIFF", "a/rgb.tif",
                                                              "b/deep.tif"]
  np.testing.assert_allclose(np.stack([ds[i][0] for i in range(3)])[:, 0, 0, 0] * 255,
                             [90, 50, 255], atol=0.01)
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith("clmim: warning: Image folder"), err
  assert "skipped 3 files" in err[0] and str(tmp_path / "b" / "README") in err[0]
  for kind in (".heic (1)", ".txt (1)", "(no extension) (1)", ".tif"):
    assert kind in err[0], err[0]
  ImageFolder(tmp_path, PP)  # the analysis opens a folder once per model: said once
  assert capsys.readouterr().err == ""


def test_class_left_empty_by_unread_extensions_names_it(tmp_path):
  _write(tmp_path / "a" / "ok.png", 1)
  for name in ("x.heic", "y.heic", "z.gif"):
    (tmp_path / "b" / name).parent.mkdir(exist_ok=True)
    (tmp_path / "b" / name).write_bytes(b"?")
  with pytest.raises(ClmimError, match=r"Class folder .*b' has no images: .*\.tiff; it holds 3 "
                                       r"files clmim does not read: \.heic \(2\), \.gif \(1\)"):
    ImageFolder(tmp_path, PP)


def test_pil_warnings_become_one_line_naming_the_file(tmp_path, capsys, recwarn, monkeypatch):
  # PIL warns above MAX_IMAGE_PIXELS (95 MP would do it at the default limit).
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  _write(tmp_path / "a" / "small.png", 1)
  _write(tmp_path / "a" / "large.png", 200, size=(40, 30))  # 1200 pixels: warned, still read
  ds = ImageFolder(tmp_path, PP)
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and "'a/large.png' (1200 pixels)" in err[0], err
  assert "decompression-bomb limit of 1000 pixels are read anyway" in err[0]
  # Decoding it (in the loader's threads, inside the analyses' progress bar) stays quiet.
  images = np.concatenate([b[0] for b in ds.batches(1)])
  np.testing.assert_allclose(images[0, 0, 0, 0] * 255, 200, atol=0.01)
  assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
  assert capsys.readouterr().err == ""


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


# --- The check on every path that reads a folder: once, before the first forward pass -------


@pytest.fixture
def inspected(monkeypatch):
  """The files whose header the check opened, in order."""
  from clmim.data import image_check
  opened, inspect = [], image_check.inspect

  def counting(path):
    opened.append(os.path.basename(path))
    return inspect(path)
  monkeypatch.setattr(image_check, "inspect", counting)
  return opened




def _two_classes(root, count=3, broken=()):
  for cls in ("a", "b"):
    for i in range(count):
      _write(root / cls / f"{i}.png", 30 * i)
  for name in broken:
    (root / name).write_bytes(b"broken")


def _analysis_config(module_name, **data):
  import importlib
  config = importlib.import_module(f"configs.{module_name}").get_config("runlocal")
  config.models, config.progress = "random:mu/4?depth=2&image_size=16", False
  config.data.source, config.data.num_images = "image_folder", 0
  for key, value in data.items():
    setattr(config.data, key, value)
  return config


def test_eval_images_check_what_they_read_once(tmp_path, inspected):
  from clmim.data.eval_data import EvalImages
  _two_classes(tmp_path, broken=["b/9.png"])  # the last file, beyond the cap below
  data = _analysis_config("nmi", path=str(tmp_path), num_images=4).data
  for _ in range(3):  # one stream per model, and one per model's probes: one check
    assert len(EvalImages(data, {"image_size": 8})) == 4
  assert inspected == ["0.png", "1.png", "2.png", "0.png"]
  data.num_images = 0
  with pytest.raises(ClmimError, match=r"1 of 7 files .*'b/9.png'"):
    EvalImages(data, {"image_size": 8})


def test_analysis_names_every_broken_file_before_compute(tmp_path, no_compute):
  from clmim.jobs import analyze
  _two_classes(tmp_path / "data", broken=["a/x.png", "b/y.png"])
  config = _analysis_config("nmi", path=str(tmp_path / "data"))
  with pytest.raises(ClmimError, match=r"2 of 8 files .*'a/x.png'.*'b/y.png'"):
    analyze.run(config, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out" / "results.json")


def test_probe_training_folder_is_checked_before_compute(tmp_path, no_compute):
  from clmim.jobs import analyze
  _two_classes(tmp_path / "val")
  _two_classes(tmp_path / "train", broken=["b/bad.jpg"])
  config = _analysis_config("probing", path=str(tmp_path / "val"))
  config.probe_data.path, config.probe_data.num_images = str(tmp_path / "train"), 0
  config.analyses = "probing"
  with pytest.raises(ClmimError, match=r"probing.*Image folder .*train'.*'b/bad.jpg'"):
    analyze.run(config, str(tmp_path / "out"))


def test_training_images_are_checked_when_opened(tmp_path, inspected):
  from clmim.data import train_data
  from configs import pretrain_simmim
  _two_classes(tmp_path, broken=["a/bad.png"])
  data = pretrain_simmim.get_config("runlocal").data
  data.source, data.path = "image_folder", str(tmp_path)
  with pytest.raises(ClmimError, match=r"1 of 7 files .*'a/bad.png'"):
    train_data.open_images(data)  # what the trainer calls before it compiles anything
  os.remove(tmp_path / "a" / "bad.png")
  images = train_data.open_images(data)
  assert len(images) == 6 and len(inspected) == 7 + 6
  train_data.open_images(data)  # e.g. the next member of a λ sweep: not checked again
  assert len(inspected) == 7 + 6
