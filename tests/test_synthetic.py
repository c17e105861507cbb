"""The procedural shapes x textures dataset: determinism, splits, labels, errors."""
import numpy as np
import pytest

from clmim.data.synthetic import SHAPES, TEXTURES, ShapesTextures, training_stream
from clmim.errors import ClmimError


def test_deterministic_random_access():
  ds = ShapesTextures(32, "train", 100, seed=3)
  again = ShapesTextures(32, "train", 100, seed=3)
  forward = ds.batch(range(10))
  backward = again.batch(range(9, -1, -1))
  np.testing.assert_array_equal(forward["image"], backward["image"][::-1])
  np.testing.assert_array_equal(forward["shape"], backward["shape"][::-1])
  other_seed = ShapesTextures(32, "train", 100, seed=4).batch(range(10))
  assert not np.allclose(forward["image"], other_seed["image"])


def test_splits_are_disjoint_draws_and_images_are_valid():
  train = ShapesTextures(32, "train", 64)[5]["image"]
  val = ShapesTextures(32, "validation", 64)[5]["image"]
  assert not np.allclose(train, val)
  batch = ShapesTextures(48, "validation", 64).batch(range(64))
  assert batch["image"].shape == (64, 48, 48, 3) and batch["image"].dtype == np.float32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert set(batch["shape"]) == set(range(len(SHAPES)))
  assert set(batch["texture"]) == set(range(len(TEXTURES)))


def test_pairings_and_cue_conflict():
  aligned = ShapesTextures(16, "train", 200, pairing="aligned").batch(range(200))
  np.testing.assert_array_equal(aligned["texture"], aligned["shape"] % len(TEXTURES))
  conflict = ShapesTextures(16, "cue_conflict", 200).batch(range(200))
  assert (conflict["texture"] != conflict["shape"] % len(TEXTURES)).all()
  assert len(set(conflict["texture"])) == len(TEXTURES)


def test_scene_scales_with_resolution():
  # The same index renders the same scene at any size: downsampling 128 px ~ the 32 px image.
  small = ShapesTextures(32, "validation", 4)[1]["image"]
  large = ShapesTextures(128, "validation", 4)[1]["image"]
  pooled = large.reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
  assert np.abs(pooled - small).mean() < 0.12


def test_training_stream_is_resumable():
  ds = ShapesTextures(16, "train", 50)
  stream = training_stream(ds, 8, start_step=0)
  batches = [next(stream) for _ in range(4)]
  resumed = next(training_stream(ds, 8, start_step=3))
  np.testing.assert_array_equal(batches[3]["image"], resumed["image"])


def test_second_views_keep_what_they_should():
  ds = ShapesTextures(32, "train", 20)
  swapped = next(training_stream(ds, 6, start_step=2, second_view="background"))
  restyled = next(training_stream(ds, 6, start_step=2, second_view="restyle"))
  for i in range(6):
    mask = ds.object_mask((2 * 6 + i) % 20)  # step 2 of batch 6 holds images 12 ... 17
    inside, outside = mask > 0.999, mask < 0.001  # fully covered: the object's own colours
    image = swapped["image"][i]
    # background: the object's pixels are the image's, the rest differs.
    np.testing.assert_allclose(swapped["second"][i][inside], image[inside], atol=1e-6)
    assert np.abs(swapped["second"][i][outside] - image[outside]).mean() > 0.01
    # restyle: same silhouette (the edge between object and background stays), new colours.
    assert np.abs(restyled["second"][i][inside] - image[inside]).mean() > 0.01
    assert np.abs(restyled["second"][i][outside] - image[outside]).mean() > 0.01
  again = next(training_stream(ds, 6, start_step=2, second_view="restyle"))
  np.testing.assert_array_equal(again["second"], restyled["second"])  # resumable
  other_step = next(training_stream(ds, 6, start_step=5, second_view="restyle"))
  assert not np.array_equal(ds.restyled(12, 2), ds.restyled(12, 5)) and len(other_step["second"])
  with pytest.raises(ClmimError, match="second_view"):
    next(training_stream(ds, 6, second_view="blur"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="test"), "split"), (dict(pairing="random"), "pairing"),
    (dict(shapes=("hexagon",)), "shape"), (dict(textures=("plaid",)), "texture"),
    (dict(image_size=4), "image_size")])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ClmimError, match=match):
    ShapesTextures(**kwargs)
