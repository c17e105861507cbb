"""`hf:` specs: the Hugging Face cache read offline, and the one-line errors (no network)."""
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from clmim.checkpoints import hf_hub, registry  # noqa: E402
from clmim.errors import ClmimError  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_with(tmp_path, repo, files_from):
  """A huggingface_hub cache holding `repo` at main = COMMIT with the files of `files_from`."""
  cache = tmp_path / "hub"
  root = cache / f"models--{repo.replace('/', '--')}"
  snapshot = root / "snapshots" / COMMIT
  snapshot.mkdir(parents=True)
  for name in os.listdir(files_from):
    shutil.copy(os.path.join(files_from, name), snapshot / name)
  (root / "refs").mkdir()
  (root / "refs" / "main").write_text(COMMIT)
  return cache


@pytest.fixture
def offline(monkeypatch, tmp_path):
  def use(cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return use


def _tiny_dinov2(path):
  config = transformers.Dinov2WithRegistersConfig(
      hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
      image_size=28, patch_size=7, num_register_tokens=2)
  transformers.Dinov2WithRegistersModel(config).save_pretrained(path)


def test_a_cached_repo_loads_offline(tmp_path, offline):
  _tiny_dinov2(tmp_path / "files")
  offline(_cache_with(tmp_path, "facebook/dinov2-tiny-test", tmp_path / "files"))
  model = registry.resolve("hf:facebook/dinov2-tiny-test?name=tiny")
  assert model.name == "tiny" and model.vit.num_registers == 2
  assert model.source == "hf:facebook/dinov2-tiny-test" and model.info["method"] == "dinov2"


def test_an_uncached_repo_offline_is_one_line(tmp_path, offline):
  offline(tmp_path / "empty")
  with pytest.raises(ClmimError, match=r"hf:org/absent: config.json is not in the Hugging Face "
                                       r"cache .* HF_HUB_OFFLINE is set") as e:
    registry.resolve("hf:org/absent")
  assert "\n" not in str(e.value)


def test_cached_config_without_weights_offline(tmp_path, offline):
  _tiny_dinov2(tmp_path / "files")
  os.remove(tmp_path / "files" / "model.safetensors")
  offline(_cache_with(tmp_path, "org/noweights", tmp_path / "files"))
  with pytest.raises(ClmimError, match="model.safetensors is not in the Hugging Face cache"):
    registry.resolve("hf:org/noweights")


@pytest.mark.parametrize("spec", ["hf:", "hf:a/b/c", "hf:org/na me"])
def test_malformed_specs(spec):
  with pytest.raises(ClmimError, match="expected 'hf:<org>/<name>"):
    hf_hub.parse(spec)


def test_revision_is_parsed():
  assert hf_hub.parse("hf:facebook/dinov2-base@abc123") == ("facebook/dinov2-base", "abc123")
  assert hf_hub.parse("hf:facebook/dinov2-base") == ("facebook/dinov2-base", "main")
