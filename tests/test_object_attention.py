"""Object attention: known answers on hand-made attention maps, the token masks of the
procedural data, and the analysis in the job."""
import jax.numpy as jnp
import numpy as np
import pytest

from clmim.analysis import core, object_attention
from clmim.data.synthetic import ShapesTextures
from clmim.errors import ClmimError
from clmim.jobs import analyze
from configs import analyze as all_config


def _sums(attns, masks, weights=None):
  masks = jnp.asarray(masks, jnp.int32)
  weights = jnp.ones(masks.shape[0]) if weights is None else jnp.asarray(weights, jnp.float32)
  batch = core.Batch([], [jnp.asarray(a) for a in attns], weights,
                     jnp.arange(masks.shape[0], dtype=jnp.int32), 4, labels=masks)
  return {k: np.asarray(v) for k, v in object_attention.attention_sums(batch).items()}


def _rows(weights_over_keys, tokens, heads=2):
  """Attention [b, heads, N+1, N+1] whose every query spreads `weights_over_keys` [b, N+1]."""
  rows = np.asarray(weights_over_keys, np.float32)
  rows = rows / rows.sum(-1, keepdims=True)
  return np.broadcast_to(rows[:, None, None, :],
                         (rows.shape[0], heads, tokens + 1, tokens + 1)).copy()


def test_attention_on_the_object_only_has_share_one_and_uniform_has_the_area_share():
  masks = np.array([[1, 1, 0, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0, 1]])
  object_only = _rows(np.concatenate([np.zeros((2, 1)), masks], axis=1), 9)
  uniform = _rows(np.ones((2, 10)), 9)  # the cls key too: it is left out of the share
  sums = _sums([object_only, uniform], masks)
  assert sums["masked_count"] == 2
  np.testing.assert_allclose(sums["cls"][0], [2.0, 2.0], rtol=1e-6)  # share 1 for both images
  np.testing.assert_allclose(sums["patches"][0], [2.0, 2.0], rtol=1e-6)
  area = 2 / 9 + 4 / 9
  np.testing.assert_allclose(sums["cls"][1], [area, area], rtol=1e-6)
  np.testing.assert_allclose(sums["patches"][1], [area, area], rtol=1e-6)
  assert sums["area"] == pytest.approx(area)


def test_background_attention_is_below_the_reference_and_padding_does_not_count():
  masks = np.array([[1, 1, 0, 0], [1, 0, 0, 0]])
  background = _rows(np.concatenate([np.zeros((2, 1)), 1 - masks], axis=1), 4)
  sums = _sums([background], masks)
  assert np.all(sums["cls"] == 0) and np.all(sums["patches"] == 0)
  padded = np.concatenate([background, background[:1]])
  with_pad = _sums([padded], np.concatenate([masks, -np.ones((1, 4), int)]), [1, 1, 0])
  assert with_pad["masked_count"] == 2 and with_pad["area"] == pytest.approx(0.75)


def test_token_masks_follow_the_object():
  data = ShapesTextures(32, "validation", 3)

  class Images:  # the parts of EvalImages that token_masks reads
    image_shape = (32, 32, 3)

    def __len__(self):
      return 3

    def object_mask(self, index):
      return data.object_mask(index)

  masks = object_attention.token_masks(Images(), 4, 0.5)
  for i in range(3):
    coverage = data.object_mask(i).reshape(8, 4, 8, 4).mean(axis=(1, 3)).reshape(-1)
    np.testing.assert_array_equal(masks[i], coverage >= 0.5)
    assert 0 < masks[i].sum() < 64
  # The mask is the object: on another image's background, the pixels it covers stay, the rest
  # change.
  image, moved = data[0]["image"], data.composite(0, background_of=1)
  inside, outside = data.object_mask(0) == 1, data.object_mask(0) == 0
  np.testing.assert_array_equal(moved[inside], image[inside])
  assert np.abs(moved[outside] - image[outside]).min() > 0


def test_in_the_job_and_refused_without_masks(tmp_path):
  config = all_config.get_config("runlocal")
  config.analyses = "object_attention"
  config.models = "random:mu/4?depth=2&image_size=16"
  config.progress = False
  results = analyze.run(config, str(tmp_path / "run"))
  values = next(iter(results["models"].values()))
  share = values["object_attention_details"]["object_token_share"]
  assert 0 < share < 1 and values["num_images"] == 64
  # An untrained ViT spreads its attention almost uniformly: close to the object's area share
  # (per head within a few points: random heads still prefer some tokens a little).
  per_head = np.asarray(values["object_attention_cls"])
  assert np.allclose(per_head.mean(axis=-1), share, atol=0.03)
  assert np.allclose(per_head, share, atol=0.07)
  assert (tmp_path / "run" / "object_attention_cls.png").exists()
  config.data.source = "image_folder"
  config.data.path = str(tmp_path)
  with pytest.raises(ClmimError, match="needs object masks"):
    analyze.run(config, str(tmp_path / "other"))
