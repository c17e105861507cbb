"""`hf:` and `timm:` specs: the Hugging Face cache read offline, downloads from a local stand-in
for the Hub (tests/fake_hub.py), and the one-line errors -- never the network."""
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


# --- online: the same code against a local stand-in for the Hub (tests/fake_hub.py) ---------

@pytest.fixture
def hub(monkeypatch, tmp_path):
  """Starts a FakeHub for {repo: directory of files} and points huggingface_hub at it."""
  from fake_hub import FakeHub
  servers = []

  def serve(repos, gated=()):
    contents = {repo: {name: open(os.path.join(folder, name), "rb").read()
                       for name in os.listdir(folder)} for repo, folder in repos.items()}
    server = FakeHub(contents, gated)
    servers.append(server)
    import huggingface_hub.constants as constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "downloaded"))
    return server
  yield serve
  for server in servers:
    server.close()


def _fetched(server):
  return sorted({path.rsplit("/", 1)[-1] for method, path in server.requests if method == "GET"
                 and "/resolve/" in path})


def test_a_repo_is_downloaded_once_with_only_the_files_clmim_reads(tmp_path, hub, offline):
  _tiny_dinov2(tmp_path / "files")
  (tmp_path / "files" / "pytorch_model.bin").write_bytes(b"never fetched")
  (tmp_path / "files" / "tokenizer.json").write_text("{}")
  server = hub({"facebook/dinov2-tiny-test": tmp_path / "files"})
  model = registry.resolve("hf:facebook/dinov2-tiny-test")
  assert model.vit.num_registers == 2
  assert _fetched(server) == ["config.json", "model.safetensors"]
  offline(tmp_path / "downloaded")  # the second time, from the cache alone
  assert registry.resolve("hf:facebook/dinov2-tiny-test").vit.num_registers == 2


def test_a_timm_spec_downloads_from_the_timm_org(tmp_path, hub):
  from reference_timm import import_timm
  timm, _ = import_timm()
  model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, embed_dim=32,
                            depth=1, num_heads=4, img_size=28, num_classes=0)
  args = dict(embed_dim=32, depth=1, num_heads=4, img_size=28)
  timm.models.save_for_hf(model, str(tmp_path / "timm"), model_args=args,
                          safe_serialization=True)
  server = hub({"timm/vit_small_patch14_reg4_dinov2.test": tmp_path / "timm"})
  loaded = registry.resolve("timm:vit_small_patch14_reg4_dinov2.test")
  assert loaded.name == "vit_small_patch14_reg4_dinov2.test"
  assert loaded.source == "timm:vit_small_patch14_reg4_dinov2.test"
  assert loaded.vit.num_registers == 4 and loaded.info["checkpoint"]["layout"] == "timm"
  assert _fetched(server) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("spec,message", [
    ("hf:org/absent", "no such repo on the Hugging Face Hub"),
    ("hf:org/gated", "the repo is gated: accept its licence"),
    ("hf:org/model@v9", "the repo has no revision 'v9'"),
    ("hf:org/model-bin-only", r"no safetensors weights .*it has \['config.json', "
                              r"'pytorch_model.bin'\]"),
    ("hf:org/unsupported", "model_type 'llama' is not a supported transformers layout"),
])
def test_online_errors_are_one_line_and_come_before_the_weights(tmp_path, hub, spec, message):
  _tiny_dinov2(tmp_path / "files")
  bin_only = tmp_path / "bin_only"
  bin_only.mkdir()
  shutil.copy(tmp_path / "files" / "config.json", bin_only / "config.json")
  (bin_only / "pytorch_model.bin").write_bytes(b"x")
  unsupported = tmp_path / "unsupported"
  unsupported.mkdir()
  (unsupported / "config.json").write_text('{"model_type": "llama"}')
  shutil.copy(tmp_path / "files" / "model.safetensors", unsupported / "model.safetensors")
  server = hub({"org/model": tmp_path / "files", "org/gated": tmp_path / "files",
                "org/model-bin-only": bin_only, "org/unsupported": unsupported},
               gated={"org/gated"})
  with pytest.raises(ClmimError, match=message) as e:
    registry.resolve(spec)
  assert "\n" not in str(e.value)
  assert "model.safetensors" not in _fetched(server)


def test_a_known_short_name_downloads_its_spec(tmp_path, hub):
  _tiny_dinov2(tmp_path / "files")
  server = hub({"facebook/dinov2-with-registers-base": tmp_path / "files"})
  model = registry.resolve("dinov2_reg_vitb14?image_size=42")
  assert model.name == "dinov2_reg_vitb14" and model.vit.image_size == 42
  assert model.source == "hf:facebook/dinov2-with-registers-base"
  assert _fetched(server) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("name,why", [("aimv2_vitl14", "AIMv2 layout"),
                                      ("eva02_vitb14_mim", "rotary position embeddings")])
def test_known_models_clmim_cannot_load_say_why_before_any_download(tmp_path, hub, name, why):
  server = hub({})
  with pytest.raises(ClmimError, match=f"{name} .*params, licence .*{why}"):
    registry.resolve(name)
  assert not any("/resolve/" in path for _, path in server.requests)  # nothing fetched


def test_a_gated_known_model_says_so_before_downloading(tmp_path, hub):
  hub({"facebook/dinov3-vitb16-pretrain-lvd1689m": tmp_path}, gated={
      "facebook/dinov3-vitb16-pretrain-lvd1689m"})
  with pytest.raises(ClmimError, match="the repo is gated: accept its licence"):
    registry.resolve("dinov3_vitb16")


def test_the_readme_lists_the_known_hub_models():
  from clmim.checkpoints import known_hub
  readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")).read()
  assert known_hub.table() in readme, "paste known_hub.table() into the README"
