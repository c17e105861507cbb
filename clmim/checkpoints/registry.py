"""Models by name or path: what a config's `models` string can say.

A model spec is one of
- a name the project knows: the demo checkpoints shipped in clmim/demo_checkpoints/
  (`moco_v3_demo`, `simmim_demo`), or an official checkpoint of `known.KNOWN`
  (`moco_v3_vitb16`, `simmim_vitb16`, `mae_vitb16`, `dino_vitb16`, `beit_vitb16`, ...),
  downloaded to the cache on first use;
- a path to a clmim checkpoint directory (encoder.npz + manifest.json);
- a path to an official checkpoint file (.pth, .pth.tar, .safetensors, .npz), optionally as
  `<family>:<path>` (family one of converters.FAMILIES; otherwise detected from the layout);
- `random:<spec>`: the same architecture as <spec>, randomly initialised (an untrained baseline).
`resolve` turns a spec into a `Model`, verifying the file and that every parameter fits.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from clmim.checkpoints import converters, known, native
from clmim.errors import ClmimError
from clmim.models.vit import ViT, build_vit

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "demo_checkpoints")


@dataclasses.dataclass
class Model:
  """A ready-to-run encoder: the linen module, its params and how to preprocess its inputs."""
  name: str
  family: str            # "cl", "mim", "random" or "other"
  vit: ViT
  params: Any
  preprocessing: dict    # image_size, mean, std (+ interpolation, crop_pct when known)
  source: str            # where it came from (path or description)
  info: dict             # manifest facts worth recording (method, steps, sha256, ...)


def known_names() -> list[str]:
  """Names of the checkpoints shipped with clmim (the official ones are `known.KNOWN`)."""
  if not os.path.isdir(DEMO_DIR):
    return []
  return sorted(d for d in os.listdir(DEMO_DIR)
                if os.path.exists(os.path.join(DEMO_DIR, d, native.MANIFEST)))


_FILE_SUFFIXES = (".pth", ".pth.tar", ".tar", ".pt", ".bin", ".safetensors", ".npz")


def _official_file(spec: str):
  """(family or None, path) when `spec` names an official checkpoint file, else None."""
  family, sep, rest = spec.partition(":")
  if sep and family in converters.FAMILIES:
    return family, rest
  is_native_npz = spec.endswith(".npz") and os.path.exists(
      os.path.join(os.path.dirname(spec), native.MANIFEST))
  if spec.endswith(_FILE_SUFFIXES) and not is_native_npz:
    return None, spec
  return None


def _from_official(name: str, family, path: str, variant=None, info=None) -> Model:
  if not os.path.exists(path):
    raise ClmimError(f"Checkpoint {path!r} does not exist.")
  converted = converters.load(path, family, variant=variant)
  preprocessing = {"image_size": converted.vit.image_size,
                   **known.PREPROCESSING[converted.family]}
  return Model(name=name, family=converters.FAMILY_KIND[converted.family], vit=converted.vit,
               params=jax.tree.map(jnp.asarray, converted.params), preprocessing=preprocessing,
               source=path, info={"method": converted.family, **converted.info, **(info or {})})


def split_specs(specs: str) -> list[str]:
  """"a, b,c" -> ["a", "b", "c"] (empty entries dropped)."""
  return [s.strip() for s in str(specs).split(",") if s.strip()]


def _locate(spec: str) -> str:
  if spec in known_names():
    return os.path.join(DEMO_DIR, spec)
  if os.path.sep in spec or os.path.exists(spec):
    return spec
  names = known_names() + sorted(known.KNOWN)
  raise ClmimError(f"Unknown model {spec!r}: not a known name ({', '.join(names)}) nor an "
                   f"existing checkpoint path (a clmim checkpoint directory, or a .pth/.pth.tar/"
                   f".safetensors file, optionally as '<family>:<path>').")


def _build(manifest: dict, source: str) -> ViT:
  fields = dict(manifest["model"])
  try:
    return build_vit(fields.pop("variant", None) or None, **fields)
  except TypeError as e:
    raise ClmimError(f"Checkpoint {source!r}: its manifest's model fields are invalid: {e}") from e


def resolve(spec: str, seed: int = 0) -> Model:
  """Loads the model a spec names (see the module docstring)."""
  if spec.startswith("random:"):
    base = resolve(spec[len("random:"):], seed)
    images = jnp.zeros((1, base.vit.image_size, base.vit.image_size, 3), jnp.float32)
    params = base.vit.init(jax.random.PRNGKey(seed), images)["params"]
    return dataclasses.replace(base, name=f"{base.name} (untrained)", family="random",
                               params=params, source=f"random init, seed {seed}",
                               info={"method": "untrained", "architecture_of": base.name})
  if spec in known.KNOWN:
    entry = known.KNOWN[spec]
    path = known.fetch(spec)
    return _from_official(spec, entry.family, path, entry.variant,
                          {"url": entry.url, "sha256": known.cached_sha256(path)})
  official = _official_file(spec)
  if official:
    family, path = official
    return _from_official(os.path.basename(path), family, path)
  path = _locate(spec)
  manifest, params = native.load(path)
  vit = _build(manifest, path)
  images = jnp.zeros((1, vit.image_size, vit.image_size, 3), jnp.float32)
  expected = jax.eval_shape(lambda: vit.init(jax.random.PRNGKey(0), images))["params"]
  native.check_params(expected, params, path)
  return Model(name=manifest.get("name") or os.path.basename(os.path.normpath(path)),
               family=manifest.get("family") or "other", vit=vit,
               params=jax.tree.map(jnp.asarray, params),
               preprocessing=dict(manifest.get("preprocessing", {})), source=path,
               info={k: manifest.get(k) for k in ("method", "steps", "final_loss", "sha256")})
