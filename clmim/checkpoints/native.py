"""clmim's own encoder checkpoint: a directory with `encoder.npz` and `manifest.json`.

The npz holds the ViT parameters flattened to "a/b/c" keys; the manifest holds the model fields,
the preprocessing, how it was trained (config, steps, final loss, the command that reproduces
it) and the npz's sha256, which `load` verifies before trusting the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile

import numpy as np
from flax import traverse_util

from clmim.atomic import write_atomic, write_json_atomic
from clmim.errors import ClmimError

MANIFEST = "manifest.json"
WEIGHTS = "encoder.npz"


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def save(directory: str, config, encoder_params, model_fields: dict, steps: int,
         final_loss=None, invocation: dict | None = None, extra: dict | None = None) -> str:
  """Writes encoder.npz + manifest.json into `directory`; returns the directory.

  `model_fields` is the encoder's architecture (`clmim.models.vit.vit_fields`), recorded as
  resolved values so the checkpoint does not depend on how a config spelt them.
  `invocation` (command, config overrides, workdir) says how the run was started.
  """
  os.makedirs(directory, exist_ok=True)
  flat = {"/".join(k): np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(encoder_params).items()}
  weights_path = os.path.join(directory, WEIGHTS)
  write_atomic(weights_path, lambda f: np.savez(f, **flat))
  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  manifest = {
      "name": cfg.get("name", os.path.basename(os.path.normpath(directory))),
      "method": cfg.get("objective"),
      "family": cfg.get("family"),
      "model": dict(model_fields),
      "preprocessing": {"image_size": model_fields["image_size"], "mean": cfg["data"]["mean"],
                        "std": cfg["data"]["std"]},
      "steps": steps,
      "final_loss": final_loss,
      "num_params": int(sum(v.size for v in flat.values())),
      "file": WEIGHTS,
      "sha256": sha256_of(weights_path),
      **{k: (invocation or {}).get(k) for k in ("command", "overrides", "workdir")},
      "config": cfg,
      **(extra or {}),
  }
  write_json_atomic(os.path.join(directory, MANIFEST), manifest)
  return directory


def read_manifest(path: str) -> tuple[dict, str]:
  """(manifest, directory) for a checkpoint directory or its manifest.json path."""
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  manifest_path = os.path.join(directory, MANIFEST)
  if not os.path.exists(manifest_path):
    raise ClmimError(f"Checkpoint {path!r}: no {MANIFEST} found (expected a clmim checkpoint "
                     f"directory holding {MANIFEST} and {WEIGHTS}).")
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ClmimError(f"Checkpoint manifest {manifest_path!r} is not valid JSON: {e}") from e
  for key in ("model", "file", "sha256"):
    if key not in manifest:
      raise ClmimError(f"Checkpoint manifest {manifest_path!r} lacks the key {key!r}.")
  return manifest, directory


def load(path: str, verify: bool = True) -> tuple[dict, dict]:
  """Loads a clmim checkpoint; returns (manifest, nested params).

  Raises ClmimError for a missing directory, a missing or corrupt file (sha256 mismatch,
  unreadable zip) — naming the file.
  """
  if not os.path.exists(path):
    raise ClmimError(f"Checkpoint {path!r} does not exist.")
  manifest, directory = read_manifest(path)
  weights_path = os.path.join(directory, manifest["file"])
  if not os.path.exists(weights_path):
    raise ClmimError(f"Checkpoint weights {weights_path!r} are missing.")
  if verify and sha256_of(weights_path) != manifest["sha256"]:
    raise ClmimError(f"Checkpoint weights {weights_path!r} are corrupt: sha256 does not match "
                     f"the manifest ({manifest['sha256'][:12]}...).")
  try:
    with np.load(weights_path) as data:
      flat = {tuple(k.split("/")): np.asarray(data[k]) for k in data.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise ClmimError(f"Checkpoint weights {weights_path!r} cannot be read: {e}") from e
  return manifest, traverse_util.unflatten_dict(flat)


def check_params(expected, loaded, source: str) -> None:
  """Strict accounting: same keys and shapes as the model's params, or one clear error."""
  want = {"/".join(k): np.shape(v) for k, v in traverse_util.flatten_dict(expected).items()}
  got = {"/".join(k): np.shape(v) for k, v in traverse_util.flatten_dict(loaded).items()}
  missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if missing or unexpected or wrong:
    details = []
    if missing:
      details.append(f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}")
    if unexpected:
      details.append(f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    if wrong:
      details.append("wrong shapes " + ", ".join(f"{k}: {got[k]} (model {want[k]})"
                                                 for k in wrong[:8]))
    raise ClmimError(f"Checkpoint {source!r} does not fit its model: " + "; ".join(details))
