"""clmim's own encoder checkpoint: a directory with `encoder.npz` and `manifest.json`, and for
an MAE, SimMIM or hybrid run `decoder.npz` too.

The npz holds the ViT parameters flattened to "a/b/c" keys; the manifest holds the model fields,
the preprocessing, how it was trained (config, steps, final loss, the command that reproduces
it) and the npz's sha256, which `load` verifies before trusting the file. A pretraining
decoder (MAE's decoder, SimMIM's pixel head) is kept beside the encoder: its params in
`decoder.npz`, and under the manifest's "decoder" key its kind ("mae" | "simmim"), the module
config (`clmim.models.heads.decoder_module`), file and sha256; `load_decoder` reads it (the
registry's `?decoder=1`). Checkpoints written before decoders were kept, and the shipped demo
checkpoints, hold only the encoder.

Names: a checkpoint is named by its config's `name`, except that the name of a model shipped in
clmim/demo_checkpoints/ belongs to the shipped weights: a checkpoint of other weights that would
take it is named `<name>_retrained` (`checkpoint_name`), so that results never show two models
under one name.
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
DECODER_WEIGHTS = "decoder.npz"
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "demo_checkpoints")
# The pretraining objectives whose export can hold a decoder (MoCo v3's and fine-tuning's
# heads map to no pixels).
DECODER_METHODS = ("mae", "simmim", "hybrid")


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _flat(params) -> dict:
  return {"/".join(k): np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(params).items()}


def _write_npz(path: str, flat: dict) -> str:
  """Writes `flat` to `path` atomically; returns its sha256."""
  write_atomic(path, lambda f: np.savez(f, **flat))
  return sha256_of(path)


def checkpoint_name(name: str, flat: dict, directory: str) -> str:
  """`name`, or `<name>_retrained` when `name` is a shipped model's (clmim/demo_checkpoints/)
  and `flat` (the encoder's "a/b/c" -> array) holds other weights: a shipped name stays the
  shipped weights', so a run of the demo recipe can be analysed beside the shipped model.
  Writing into the shipped folder itself (making a new demo checkpoint) keeps the name."""
  shipped = os.path.join(SHIPPED_DIR, name) if name else ""
  if not shipped or not os.path.exists(os.path.join(shipped, MANIFEST)) \
      or os.path.abspath(directory) == os.path.abspath(shipped):
    return name
  try:
    with np.load(os.path.join(shipped, WEIGHTS)) as data:
      same = set(data.files) == set(flat) and all(
          np.array_equal(data[k], flat[k]) for k in data.files)
  except (OSError, ValueError, zipfile.BadZipFile, EOFError):
    same = False  # an unreadable shipped file: not the same weights
  return name if same else f"{name}_retrained"


def save(directory: str, config, encoder_params, model_fields: dict, steps: int,
         final_loss=None, invocation: dict | None = None, extra: dict | None = None,
         decoder: dict | None = None) -> str:
  """Writes encoder.npz + manifest.json into `directory`; returns the directory.

  `model_fields` is the encoder's architecture (`clmim.models.vit.vit_fields`), recorded as
  resolved values so the checkpoint does not depend on how a config spelt them.
  `invocation` (command, config overrides, workdir) says how the run was started.
  `decoder`: the pretraining decoder {"kind", "params", "config"} (an objective's
  `pretraining_decoder`), written to decoder.npz and recorded in the manifest; None: none.
  The manifest's name is `checkpoint_name` of the config's (see the module docstring).
  """
  os.makedirs(directory, exist_ok=True)
  flat = _flat(encoder_params)
  weights_path = os.path.join(directory, WEIGHTS)
  digest = _write_npz(weights_path, flat)
  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  record = None
  if decoder is not None:
    record = {"kind": decoder["kind"], "config": dict(decoder["config"]),
              "file": DECODER_WEIGHTS,
              "sha256": _write_npz(os.path.join(directory, DECODER_WEIGHTS),
                                   _flat(decoder["params"]))}
  elif os.path.exists(os.path.join(directory, DECODER_WEIGHTS)):
    # Overwriting a checkpoint that had one: its decoder is not this encoder's.
    os.remove(os.path.join(directory, DECODER_WEIGHTS))
  name = cfg.get("name") or os.path.basename(os.path.normpath(directory))
  manifest = {
      "name": checkpoint_name(name, flat, directory),
      "method": cfg.get("objective"),
      "family": cfg.get("family"),
      "model": dict(model_fields),
      "preprocessing": {"image_size": model_fields["image_size"], "mean": cfg["data"]["mean"],
                        "std": cfg["data"]["std"]},
      "steps": steps,
      "final_loss": final_loss,
      "num_params": int(sum(v.size for v in flat.values())),
      "file": WEIGHTS,
      "sha256": digest,
      **({"decoder": record} if record else {}),
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
  return manifest, _read_npz(weights_path)


def _read_npz(weights_path: str):
  """The nested params of an "a/b/c"-keyed npz, or one error naming the file."""
  try:
    with np.load(weights_path) as data:
      flat = {tuple(k.split("/")): np.asarray(data[k]) for k in data.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise ClmimError(f"Checkpoint weights {weights_path!r} cannot be read: {e}") from e
  return traverse_util.unflatten_dict(flat)


def _no_decoder(spec: str, manifest: dict, shipped: bool) -> str:
  """Why a checkpoint without a decoder has none, and how to get one (one line)."""
  method = manifest.get("method")
  if method not in DECODER_METHODS:
    return (f"model spec {spec!r}: '?decoder=1' asks for the pretraining decoder, but a "
            f"{method or 'non-MIM'} model has none (MAE, SimMIM and the hybrid have one).")
  recipe = f"configs/pretrain_{method}.py"
  if shipped:
    return (f"model spec {spec!r}: the shipped {manifest.get('name')} holds only its encoder "
            f"(its training checkpoints were not kept), so '?decoder=1' has no decoder to "
            f"load; train one (python -m clmim.main --config {recipe} --workdir runs/{method}; "
            f"the :runlocal variant takes seconds) and load 'runs/{method}/export?decoder=1'.")
  workdir = manifest.get("workdir") or "<its training workdir>"
  return (f"model spec {spec!r}: this export holds only the encoder (written before clmim "
          f"kept the pretraining decoder), so '?decoder=1' has no decoder to load; export it "
          f"again from its checkpoints (python -m clmim.main --config {recipe} "
          f"--config.mode=export --workdir {workdir}) or retrain it.")


def load_decoder(path: str, manifest: dict, spec: str, shipped: bool = False,
                 verify: bool = True) -> dict:
  """The pretraining decoder {"kind", "params", "config"} kept in checkpoint `path` (whose
  manifest is `manifest`), verified against the manifest's sha256; a checkpoint without one is
  one error naming `spec` that says how to get one (`shipped`: a demo checkpoint of clmim's)."""
  record = manifest.get("decoder")
  if not record:
    raise ClmimError(_no_decoder(spec, manifest, shipped))
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  weights_path = os.path.join(directory, record.get("file", DECODER_WEIGHTS))
  if not os.path.exists(weights_path):
    raise ClmimError(f"Checkpoint decoder weights {weights_path!r} are missing (the manifest "
                     f"records a {record.get('kind')} decoder).")
  if verify and sha256_of(weights_path) != record.get("sha256"):
    raise ClmimError(f"Checkpoint decoder weights {weights_path!r} are corrupt: sha256 does "
                     f"not match the manifest.")
  import jax  # only when a decoder is loaded: this module is otherwise numpy alone
  import jax.numpy as jnp
  from clmim.models import heads
  kind, config, params = record.get("kind"), dict(record.get("config") or {}), \
      _read_npz(weights_path)
  fields = manifest["model"]
  grid = fields["image_size"] // fields["patch_size"]
  latent = jax.ShapeDtypeStruct((1, grid * grid + 1, fields["width"]), jnp.float32)
  try:  # the shapes the recorded kind and config make, against the file's
    expected = jax.eval_shape(
        lambda x: heads.init_decoder(kind, config, x, jax.random.PRNGKey(0)), latent)
  except TypeError as e:
    raise ClmimError(f"Checkpoint {spec!r}: its manifest's decoder config {config} does not "
                     f"make a {kind} decoder: {e}") from None
  check_params(expected, params, f"{spec} (decoder)")
  # The masks its pretraining drew (the decoder analysis feeds the decoder those by default).
  section = (manifest.get("config") or {}).get("mae" if kind == "mae" else "simmim") or {}
  training_mask = {"ratio": section.get("mask_ratio"),
                   "patch_px": section.get("mask_patch") if kind == "simmim" else None}
  return {"kind": kind, "params": jax.tree.map(jnp.asarray, params), "config": config,
          "training_mask": training_mask}


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
