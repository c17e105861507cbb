"""MAE objective: masking, the visible-token-only encoder, targets, loss, and a training run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clmim.checkpoints import registry
from clmim.errors import ClmimError
from clmim.jobs import analyze
from clmim.models.vit import build_vit
from clmim.train import mae, trainer
from clmim.jobs import pretrain
from configs import analyze as all_config
from configs import pretrain_mae


def test_random_keep_keeps_a_quarter_per_image_and_the_mask_is_its_complement():
  keep, mask = mae.random_keep(jax.random.PRNGKey(0), 5, 64, 0.75)
  keep, mask = np.asarray(keep), np.asarray(mask)
  assert keep.shape == (5, 16) and mask.shape == (5, 64)
  for row, m in zip(keep, mask):
    assert len(set(row)) == 16 and not m[row].any() and m.sum() == 48
  assert len({tuple(sorted(r)) for r in keep}) == 5  # images draw their own patches


def _encoder_and_params():
  vit = build_vit("mu/4", image_size=16, depth=2, position_embedding="sincos")
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  return vit, vit.init(jax.random.PRNGKey(2), images)["params"], images


@pytest.mark.slow
def test_encoder_sees_only_the_kept_patches():
  vit, params, images = _encoder_and_params()
  full = vit.apply({"params": params}, images)
  every = jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 1))
  np.testing.assert_allclose(vit.apply({"params": params}, images, keep=every), full, atol=1e-6)
  keep = jnp.asarray([[0, 5, 10, 15], [3, 2, 1, 0]], jnp.int32)
  out = vit.apply({"params": params}, images, keep=keep)
  assert out.shape == (2, 5, 128)
  # Repaint every patch the encoder does not keep: its output must not move.
  kept = np.zeros((2, 4, 4), bool)
  for b, row in enumerate(np.asarray(keep)):
    kept[b].flat[row] = True
  pixels = np.repeat(np.repeat(kept, 4, axis=1), 4, axis=2)[..., None]
  repainted = jnp.where(pixels, images, 100.0)
  np.testing.assert_array_equal(vit.apply({"params": params}, repainted, keep=keep), out)
  assert not np.allclose(vit.apply({"params": params}, repainted), full, atol=1e-3)
  with pytest.raises(ClmimError, match="rel_pos_bias"):
    beit = build_vit("mu/4", image_size=16, depth=1, rel_pos_bias="shared")
    beit.init(jax.random.PRNGKey(0), images, keep=keep)


def test_scatter_targets_and_masked_mse_known_answers():
  latent = jnp.arange(2 * 3 * 1, dtype=jnp.float32).reshape(2, 3, 1) + 1  # cls + 2 visible
  keep = jnp.asarray([[3, 0], [1, 2]], jnp.int32)
  full = np.asarray(mae.scatter_visible(latent, keep, 4))[..., 0]
  np.testing.assert_array_equal(full, [[1, 3, 0, 0, 2], [4, 0, 5, 6, 0]])
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 3))
  target = np.asarray(mae.pixel_targets(images, 4, True))
  assert target.shape == (2, 4, 48)
  np.testing.assert_allclose(target.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(target.std(-1), 1, atol=1e-3)
  raw = np.asarray(mae.pixel_targets(images, 4, False))
  np.testing.assert_array_equal(raw[0, 0], np.asarray(images)[0, :4, :4].reshape(-1))
  mask = jnp.asarray([[True, False, False, True], [False, False, False, True]])
  prediction = jnp.asarray(target) + jnp.where(mask[..., None], 2.0, 1e3)  # unmasked: way off
  assert float(mae.masked_mse(prediction, jnp.asarray(target), mask)) == pytest.approx(4.0)


@pytest.mark.parametrize("field, value, message", [
    ("mae.mask_ratio", 1.0, "config.mae.mask_ratio"),
    ("mae.decoder_width", 66, "config.mae.decoder_width"),
    ("model.rel_pos_bias", "shared", "config.model.rel_pos_bias"),
])
def test_bad_fields_are_named(field, value, message):
  config = pretrain_mae.get_config("runlocal")
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(ClmimError, match=message):
    mae.Objective(config)


@pytest.mark.slow
def test_runlocal_trains_and_exports(tmp_path):  # resuming: the trainer's own tests
  config = pretrain_mae.get_config("runlocal")
  metrics = pretrain.run(config, str(tmp_path))
  assert np.isfinite(metrics["loss"]) and metrics["mask_ratio"] == pytest.approx(0.75)
  records = trainer.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [2, 4, 6]
  assert records[-1]["loss"] < records[0]["loss"]  # it learns, even in six steps
  model = registry.resolve(str(tmp_path / "export"))
  assert model.family == "mim" and model.vit.depth == 2 and model.info["method"] == "mae"
  assert model.name == "mae_demo_runlocal"
  # The export keeps the decoder, and the decoder analysis runs on it through the job.
  analysis = all_config.get_config("runlocal")
  analysis.models = f"{tmp_path / 'export'}?decoder=1"
  analysis.analyses = "decoder"
  analysis.include_untrained = False
  analysis.progress = False
  analysis.data.num_images = 8
  analysis.batch_size = 8
  results = analyze.run(analysis, str(tmp_path / "analysis"))
  values = results["models"]["mae_demo_runlocal"]
  assert np.shape(values["decoder_fourier"]) == (3, 4)  # its blocks' input, then 2 blocks
  assert np.shape(values["decoder_nmi"]) == (2, 4)      # 2 blocks x 4 heads
  assert np.isfinite(values["encoder_decoder_fourier"]).all()
  assert results["model_info"]["mae_demo_runlocal"]["decoder"] == {
      "kind": "mae", "width": 64, "depth": 2, "num_heads": 4, "mlp_dim": 256, "patch_size": 4,
      "training_mask": {"ratio": 0.75, "patch_px": None}}  # fed masked by default, as trained
