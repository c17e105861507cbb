"""The procedural shapes x textures dataset: determinism, splits, labels, errors."""
import numpy as np
import pytest

from clmim.data import synthetic
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
    # restyle: the object drawn anew (pose, colours, background): every region changes.
    assert np.abs(restyled["second"][i][inside] - image[inside]).mean() > 0.01
    assert np.abs(restyled["second"][i][outside] - image[outside]).mean() > 0.01
  again = next(training_stream(ds, 6, start_step=2, second_view="restyle"))
  np.testing.assert_array_equal(again["second"], restyled["second"])  # resumable
  other_step = next(training_stream(ds, 6, start_step=5, second_view="restyle"))
  assert not np.array_equal(ds.restyled(12, 2), ds.restyled(12, 5)) and len(other_step["second"])
  with pytest.raises(ClmimError, match="second_view"):
    next(training_stream(ds, 6, second_view="blur"))


def test_redraw_views_share_the_factors_they_do_not_name():
  ds = ShapesTextures(24, "train", 30, version=3)
  named = next(training_stream(ds, 5, start_step=1, second_view="redraw:colours+background"))
  restyled = next(training_stream(ds, 5, start_step=1, second_view="restyle"))
  every_factor = next(training_stream(
      ds, 5, start_step=1, second_view="redraw:background+pose+texture+colours"))
  np.testing.assert_array_equal(restyled["second"], every_factor["second"])  # the same view
  for i in range(5):
    index = 5 + i
    np.testing.assert_array_equal(named["second"][i], ds.restyled(index, 1, ("background", "colours")))
    # Pose and texture parameters shared: the same silhouette, and (version 3) the pattern's grey
    # levels follow the original's inside the object, whatever the new colours.
    inside = ds.object_mask(index) > 0.999
    grey, grey_view = named["image"][i].mean(-1)[inside], named["second"][i].mean(-1)[inside]
    assert np.corrcoef(grey, grey_view)[0, 1] > 0.8
    assert np.abs(named["second"][i] - named["image"][i]).mean() > 0.02
  for bad in ("redraw:", "redraw:colour", "redraw:pose+pose"):
    with pytest.raises(ClmimError, match="redraw:background"):
      synthetic.parse_second_view(bad)


def test_second_view_ramp_eases_the_second_view_in():
  assert [synthetic.second_view_share(s, (10, 20)) for s in (0, 10, 15, 20, 99)] == \
      [0.0, 0.0, 0.5, 1.0, 1.0]
  assert synthetic.second_view_share(0, (0, 0)) == 1.0
  ds = ShapesTextures(16, "train", 200, version=3)
  view = "redraw:background+colours"

  def same_image_share(step):
    batch = next(training_stream(ds, 40, start_step=step, second_view=view, ramp=(10, 20)))
    return np.mean([np.array_equal(a, b) for a, b in zip(batch["image"], batch["second"])])
  assert same_image_share(3) == 1.0 and same_image_share(25) == 0.0
  assert 0.25 < same_image_share(15) < 0.75
  full = next(training_stream(ds, 40, start_step=15, second_view=view))
  ramped = next(training_stream(ds, 40, start_step=15, second_view=view, ramp=(10, 20)))
  redrawn = [not np.array_equal(a, b) for a, b in zip(ramped["image"], ramped["second"])]
  np.testing.assert_array_equal(ramped["second"][redrawn], full["second"][redrawn])


def test_version_3_keeps_a_patterns_sign_in_grey():
  # With unconstrained colours (version 2) a colour redraw can invert the pattern's grey levels;
  # version 3's dark and light colours never do.
  def correlations(version):
    ds = ShapesTextures(24, "train", 40, version=version)
    values = []
    for index in range(40):
      inside = ds.object_mask(index) > 0.999
      if inside.sum() < 20:
        continue
      grey = ds[index]["image"].mean(-1)[inside]
      view = ds.restyled(index, 3, ("colours",)).mean(-1)[inside]
      values.append(np.corrcoef(grey, view)[0, 1])
    return np.array(values)
  assert correlations(3).min() > 0.8
  assert correlations(2).min() < 0.0
  dark, light = synthetic._draw_dark_light_colours(np.random.default_rng(0))
  assert dark.max() < 0.4 < 0.6 < light.min()


def test_restyling_redraws_exactly_the_named_factors():
  ds = ShapesTextures(32, "train", 20, version=2)
  for i in range(4):
    image, mask = ds[i]["image"], ds.object_mask(i)
    inside, outside = mask == 1, mask == 0
    np.testing.assert_array_equal(ds.restyled(i, 3, factors=()), image)
    background = ds.restyled(i, 3, factors=("background",))  # the object stays, pixel for pixel
    np.testing.assert_array_equal(background[inside], image[inside])
    assert np.abs(background[outside] - image[outside]).min() > 0
    colours = ds.restyled(i, 3, factors=("colours",))  # the background stays
    np.testing.assert_array_equal(colours[outside], image[outside])
    assert np.abs(colours[inside] - image[inside]).mean() > 0.01
    # Each factor of a partial restyle is the image's own or the full restyle's.
    partial, full = ds.partly_restyled(i, 3), ds.restyled(i, 3)
    assert any(np.array_equal(partial, ds.restyled(i, 3, factors=f))
               for f in _subsets(("background", "pose", "texture", "colours")))
    assert not np.array_equal(full, image)
  with pytest.raises(ClmimError, match="factor"):
    ds.restyled(0, 1, factors=("lighting",))


def test_a_texture_class_redraw_changes_only_the_objects_class():
  ds = ShapesTextures(32, "train", 40, version=3)
  kept = changed = 0
  for i in range(40):
    image, outside = ds[i]["image"], ds.object_mask(i) == 0
    view = ds.restyled(i, 4, factors=("texture_class",))
    np.testing.assert_array_equal(view[outside], image[outside])  # background and pose stay
    shape, own, outline, rng = ds.identity(i)
    chosen = int(np.random.default_rng([0, 0, i, synthetic._CLASS, 4]).integers(4))
    if chosen == own:  # the class drawn anew may be the image's own: then the image itself
      np.testing.assert_array_equal(view, image)
      kept += 1
    elif "grain" not in (ds.textures[own], ds.textures[chosen]):
      # The image's own angle, period, phases and colours with the other class: the image of
      # that identity (grain draws extra numbers, so its colours would not line up).
      np.testing.assert_array_equal(view, ds._render((shape, chosen, outline, rng)))
      changed += 1
  assert kept and changed
  # With the texture parameters redrawn as well, only the silhouette and pose are shared.
  assert sum(not np.array_equal(ds.restyled(i, 4, factors=("texture", "texture_class")),
                                 ds.restyled(i, 4, factors=("texture",))) for i in range(8)) >= 4
  assert synthetic.parse_second_view("redraw:texture_class+background") == \
      ("redraw", ("background", "texture_class"))


def _subsets(items):
  return [tuple(x for j, x in enumerate(items) if mask >> j & 1) for mask in range(2 ** len(items))]


def test_version_2_gives_every_instance_its_own_outline():
  v1, v2 = ShapesTextures(32, "train", 50), ShapesTextures(32, "train", 50, version=2)
  assert [v1.labels(i)[:2] for i in range(50)] == [v2.labels(i)[:2] for i in range(50)]
  assert v1.identity(0)[2] is None and v2.identity(0)[2].shape == (3, 2)
  # Same labels; the images differ (the outline draws come first, so the appearance moves too).
  assert all(not np.array_equal(v1[i]["image"], v2[i]["image"]) for i in range(5))
  # Two disks of version 2 differ in silhouette: at one common pose, their masks differ by
  # whole pixels, and a version 1 disk at that pose is the exact circle.
  disks = [i for i in range(50) if v2.labels(i)[0] == 0][:2]
  x, y, pixel = synthetic._grid(64)
  pose = (0.6, np.zeros(2), 0.0)
  masks = [synthetic._coverage("disk", v2.identity(i)[2], pose, x, y, pixel) for i in disks]
  assert np.abs(masks[0] - masks[1]).sum() > 10
  circle = synthetic._coverage("disk", None, pose, x, y, pixel)
  inside_circle = np.hypot(x, y) < 0.6 - pixel
  assert np.all(circle[inside_circle] == 1) and np.all(circle[np.hypot(x, y) > 0.6 + pixel] == 0)
  with pytest.raises(ClmimError, match="version"):
    ShapesTextures(32, "train", 5, version=99)


def test_worker_processes_render_the_same_batches():
  ds = ShapesTextures(16, "train", 40, version=2)
  thread = training_stream(ds, 4, start_step=1, second_view="partial")
  processes = training_stream(ds, 4, start_step=1, second_view="partial", workers=2)
  for _ in range(3):
    a, b = next(thread), next(processes)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  thread.close(), processes.close()
  with pytest.raises(ClmimError, match="workers"):
    next(training_stream(ds, 4, workers=0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="test"), "split"), (dict(pairing="random"), "pairing"),
    (dict(shapes=("hexagon",)), "shape"), (dict(textures=("plaid",)), "texture"),
    (dict(image_size=4), "image_size")])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ClmimError, match=match):
    ShapesTextures(**kwargs)


def test_analysis_data_follows_the_version_field():
  from clmim.data.eval_data import EvalImages
  from configs import analyze as all_config
  data_cfg = all_config.get_config("runlocal").data
  data_cfg.version = 2
  images = EvalImages(data_cfg, {"image_size": 32}, num_images=3)
  assert "version 2" in images.description and images.dataset.version == 2
  np.testing.assert_array_equal(images.dataset[1]["image"],
                                ShapesTextures(32, "validation", 3, version=2)[1]["image"])
