"""`hf:<repo-id>[@revision]` and `timm:<name>[@revision]` model specs: checkpoints from the
Hugging Face Hub, in transformers' layout or timm's (`timm:vit_base_patch16_224.mae` is the repo
`timm/vit_base_patch16_224.mae`; `timm:<org>/<name>` any repo in timm's layout).

The files a vision encoder needs (config.json, the safetensors weights -- one file or the shards
of model.safetensors.index.json -- and preprocessor_config.json when the repo has one) are
fetched with `huggingface_hub` into its own cache (HF_HOME / HF_HUB_CACHE), so a model already
downloaded by transformers is not downloaded again, and `HF_HUB_OFFLINE=1` reads the cache
only. No other file of the repo is fetched: a CLIP repo's tokenizer or a PyTorch .bin never is.
config.json is read first, so an unsupported model_type or timm architecture fails before any
weights are downloaded.
"""
from __future__ import annotations

import json
import os
import re

from clmim.checkpoints import hf_layout, timm_layout
from clmim.errors import ClmimError

_REPO = re.compile(r"[\w.-]+(/[\w.-]+)?")
PREFIXES = ("hf:", "timm:")


def parse(spec: str) -> tuple[str, str]:
  """"hf:org/name@rev" -> ("org/name", "rev"); "timm:arch.tag" -> ("timm/arch.tag", "main")."""
  prefix = next((p for p in PREFIXES if spec.startswith(p)), "hf:")
  repo, _, revision = spec[len(prefix):].partition("@")
  if not _REPO.fullmatch(repo):
    example = ("'timm:<architecture>.<tag>', e.g. 'timm:vit_base_patch14_reg4_dinov2.lvd142m'"
               if prefix == "timm:" else "'hf:<org>/<name>[@revision]', e.g. "
               "'hf:facebook/dinov2-base'")
    raise ClmimError(f"model spec {spec!r}: expected {example}.")
  if prefix == "timm:" and "/" not in repo:
    repo = f"timm/{repo}"
  return repo, revision or "main"


def _hub():
  try:
    import huggingface_hub  # a runtime dependency, imported only for hf: specs
    from huggingface_hub import constants, errors
  except ImportError:
    raise ClmimError("hf: model specs need the huggingface_hub package "
                     "(pip install -r requirements.txt).") from None
  return huggingface_hub, constants, errors


def download(spec: str) -> str:
  """The local snapshot directory of `spec`'s repo, holding the files clmim reads; one line
  for a repo that does not exist, is gated, lacks safetensors, or (offline) is not cached."""
  repo, revision = parse(spec)
  hub, constants, errors = _hub()

  offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")

  def not_cached(filename):
    why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
    return ClmimError(f"{spec}: {filename} is not in the Hugging Face cache "
                      f"({constants.HF_HUB_CACHE}) and {why}; download it once online "
                      f"(or give a local directory holding config.json + model.safetensors).")

  def fetch(filename, required=True):
    """The cached path of `filename`; None for a missing optional file."""
    try:
      return hub.hf_hub_download(repo, filename, revision=revision)
    except errors.LocalEntryNotFoundError:
      if required:
        raise not_cached(filename) from None
      return None
    except errors.RemoteEntryNotFoundError:
      if required:
        raise ClmimError(f"{spec}: the repo has no {filename}.") from None
      return None
    except errors.GatedRepoError:
      raise ClmimError(f"{spec}: the repo is gated: accept its licence on huggingface.co and "
                       f"log in (`hf auth login`) first.") from None
    except errors.RepositoryNotFoundError:
      raise ClmimError(f"{spec}: no such repo on the Hugging Face Hub (or it is private).") \
          from None
    except errors.RevisionNotFoundError:
      raise ClmimError(f"{spec}: the repo has no revision {revision!r}.") from None

  config_file = fetch(hf_layout.CONFIG)
  directory = os.path.dirname(config_file)
  # An unsupported model_type / architecture fails here, before the weights download.
  if timm_layout.is_timm_config(hf_layout.read_json(config_file)):
    timm_layout.read_config(directory)
  else:
    hf_layout.read_config(directory)
    fetch(hf_layout.PREPROCESSOR, required=False)
  if fetch(hf_layout.WEIGHTS, required=False) is None:
    index = fetch(hf_layout.WEIGHTS_INDEX, required=False)
    if index is None:
      if offline:
        raise not_cached(hf_layout.WEIGHTS)
      # The endpoint read now, not at import: HF_ENDPOINT as huggingface_hub resolved it.
      files = sorted(hub.HfApi(endpoint=constants.ENDPOINT).list_repo_files(repo, revision=revision))
      raise ClmimError(f"{spec}: the repo has no safetensors weights (clmim reads "
                       f"model.safetensors only); it has {files[:15]}.")
    with open(index) as f:
      for shard in sorted(set(json.load(f).get("weight_map", {}).values())):
        fetch(shard)
  return directory
