"""clmim's own checkpoints and the model registry: round trip, strict accounting, clear errors."""
import json
import os

import jax
import numpy as np
import pytest

from clmim.checkpoints import native, registry
from clmim.errors import ClmimError
from tiny_checkpoints import save_random_checkpoint
from configs import pretrain_simmim


def _save_random(directory):
  return save_random_checkpoint(directory, pretrain_simmim, final_loss=1.0)  # depth 2


def test_round_trip_and_manifest(tmp_path):
  params = _save_random(tmp_path / "ckpt")
  model = registry.resolve(str(tmp_path / "ckpt"))
  assert model.family == "mim" and model.info["steps"] == 0
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(model.params)):
    np.testing.assert_array_equal(a, b)
  manifest = json.load(open(tmp_path / "ckpt" / "manifest.json"))
  assert manifest["sha256"] == native.sha256_of(str(tmp_path / "ckpt" / "encoder.npz"))
  assert manifest["preprocessing"] == {"image_size": 32, "mean": "half", "std": "half"}
  assert not [f for f in os.listdir(tmp_path / "ckpt") if f.startswith(".tmp")]


def test_corrupt_and_missing_files(tmp_path):
  _save_random(tmp_path / "ckpt")
  weights = tmp_path / "ckpt" / "encoder.npz"
  data = bytearray(weights.read_bytes())
  data[len(data) // 2] ^= 0xFF
  weights.write_bytes(bytes(data))
  with pytest.raises(ClmimError, match="corrupt"):
    registry.resolve(str(tmp_path / "ckpt"))
  weights.write_bytes(b"not a zip at all")
  with pytest.raises(ClmimError, match="cannot be read"):
    native.load(str(tmp_path / "ckpt"), verify=False)
  os.remove(weights)
  with pytest.raises(ClmimError, match="missing"):
    registry.resolve(str(tmp_path / "ckpt"))
  with pytest.raises(ClmimError, match="does not exist"):
    registry.resolve(str(tmp_path / "nowhere" / "ckpt"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ClmimError, match="manifest.json"):
    registry.resolve(str(tmp_path / "empty"))


def test_unknown_name_lists_the_known_ones():
  with pytest.raises(ClmimError, match="Unknown model 'moco_v4'"):
    registry.resolve("moco_v4")


def test_shapes_that_contradict_the_manifest(tmp_path):
  _save_random(tmp_path / "ckpt")
  manifest_path = tmp_path / "ckpt" / "manifest.json"
  manifest = json.load(open(manifest_path))
  manifest["model"]["depth"] = 3
  manifest["model"]["width"] = 64
  manifest_path.write_text(json.dumps(manifest))
  with pytest.raises(ClmimError, match=r"missing \['block_2.*wrong shapes"):
    registry.resolve(str(tmp_path / "ckpt"))


def test_untrained_copy_has_the_same_architecture(tmp_path):
  _save_random(tmp_path / "ckpt")
  trained = registry.resolve(str(tmp_path / "ckpt"))
  untrained = registry.resolve(f"random:{tmp_path / 'ckpt'}", seed=1)
  assert untrained.family == "random" and untrained.vit == trained.vit
  assert jax.tree.structure(untrained.params) == jax.tree.structure(trained.params)
  assert not np.allclose(untrained.params["block_0"]["mlp"]["fc1"]["kernel"],
                         trained.params["block_0"]["mlp"]["fc1"]["kernel"])
