"""Models by name or path: what a config's `models` string can say.

A model spec is one of
- a name the project knows: the demo checkpoints shipped in clmim/demo_checkpoints/
  (`moco_v3_demo`, `simmim_demo`), or an official checkpoint of `known.KNOWN`
  (`moco_v3_vitb16`, `simmim_vitb16`, `mae_vitb16`, `dino_vitb16`, `beit_vitb16`, ...),
  downloaded to the cache on first use;
- a path to a clmim checkpoint directory (encoder.npz + manifest.json);
- a path to an official checkpoint file (.pth, .pth.tar, .pt, .safetensors, .npz), optionally
  as `<family>:<path>` (family one of `families.NAMES` -- the paper's 2021-2022 families -- or
  of `modern_files.NAMES`: dinov2, ijepa, ibot, clip (OpenAI TorchScript archives and
  OpenAI / OpenCLIP state dicts), siglip (big_vision .npz); otherwise detected from the layout);
- `hf:<org>/<name>[@revision]`: a Hugging Face transformers checkpoint (DINOv2 with or without
  registers, CLIP, SigLIP, MAE, I-JEPA, data2vec, BEiT, ViT: `hf_layout.MODEL_TYPES`),
  downloaded into huggingface_hub's cache (`HF_HUB_OFFLINE=1` reads the cache only);
- `timm:<architecture>.<tag>` (the hub repo `timm/<architecture>.<tag>`, e.g.
  `timm:vit_base_patch14_reg4_dinov2.lvd142m`) or `timm:<org>/<name>`: a checkpoint in timm's
  hub layout (`timm_layout`), downloaded the same way;
- a local directory holding config.json + model.safetensors in either layout (config.json's
  `model_type` means transformers, its `architecture` timm);
- a short name of `known_hub.HUB_MODELS` (`dinov2_reg_vitb14`, `clip_vitb16`, `siglip_vitb16`,
  ...): the `hf:` / `timm:` spec it stands for; models clmim cannot load yet (DINOv3, EVA-02,
  AIMv2) are listed there too and refused in one line that says why;
- `random:<variant>` (e.g. `random:B/16`): an untrained timm-style ViT of that size (offline);
- `random:<spec>`: the architecture of any spec above, randomly initialised (the untrained
  baseline a trained model must differ from).
Options follow a `?`, joined by `&`:
- official files and known names: `num_heads=N` (timm-style files do not store it),
  `variant=S/16` (checked against the file's shapes), `name=...`, `decoder=1` (also convert the
  pretraining decoder of an MAE _full/visualize or SimMIM file into `Model.decoder`; a file
  without one is an error);
- official files of `modern_files.NAMES`: `name`, `num_heads`, `image_size` (resampled as the
  family's own code does), `mlp_activation` (a CLIP state dict: quick_gelu or gelu), `part`
  (I-JEPA: target_encoder, the default, or encoder);
- `hf:` / `timm:` specs and their directories: `name`, `num_heads`, `image_size` (another
  resolution: the position table is resampled as the family's transformers code, or timm,
  does);
- `random:<variant>`: any ViT field (`image_size=224`, `block_style=beit`,
  `position_embedding=sincos`, `num_heads=3`, ...) and `name`;
- clmim checkpoint directories: `name` (the name shown in results and figures), `decoder=1`
  (also load the pretraining decoder an MAE / SimMIM / hybrid export keeps beside its
  encoder, see `native.load_decoder`; an export without one is an error saying how to
  get one).
`resolve` turns a spec into a `Model`, verifying the file and that every parameter fits, and
records in `Model.info["architecture_from"]` where each architecture field came from.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp

from clmim.checkpoints import converters, families, hf_hub, hf_layout, known, known_hub, \
    modern_files, native, timm_layout, torch_reader
from clmim.errors import ClmimError
from clmim.models import heads
from clmim.models.vit import VARIANTS, VIT_FIELDS, ViT, build_vit, parse_variant
from clmim.suggestions import did_you_mean

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "demo_checkpoints")
# Eval preprocessing of a model that says nothing about it (timm's defaults).
DEFAULT_PREPROCESSING = {"mean": "imagenet", "std": "imagenet", "interpolation": "bicubic",
                         "crop_pct": 0.875}
_FILE_OPTIONS = ("name", "num_heads", "variant", "decoder")
_HF_OPTIONS = ("name", "num_heads", "image_size")


@dataclasses.dataclass
class Model:
  """A ready-to-run encoder: the linen module, its params and how to preprocess its inputs."""
  name: str
  family: str            # "cl", "mim", "random" or "other"
  vit: ViT
  params: Any
  preprocessing: dict    # image_size, mean, std (+ interpolation, crop_pct when known)
  source: str            # where it came from (the path as given, or a description)
  info: dict             # manifest facts worth recording (method, steps, sha256, ...)
  # The pretraining decoder when the spec asked for it (`?decoder=1`): {"kind": "mae" | "simmim",
  # "params", "config"} (see `clmim.models.heads.decoder_states`), else None.
  decoder: Any = None


def known_names() -> list[str]:
  """Names of the checkpoints shipped with clmim (the official ones are `known.KNOWN`)."""
  if not os.path.isdir(DEMO_DIR):
    return []
  return sorted(d for d in os.listdir(DEMO_DIR)
                if os.path.exists(os.path.join(DEMO_DIR, d, native.MANIFEST)))


_FILE_SUFFIXES = (".pth", ".pth.tar", ".tar", ".pt", ".bin", ".safetensors", ".npz")


def split_specs(specs: str) -> list[str]:
  """"a, b,c" -> ["a", "b", "c"] (empty entries dropped)."""
  return [s.strip() for s in str(specs).split(",") if s.strip()]


def _value(text: str):
  """An option's value: int, float, None, bool or the string itself."""
  lowered = text.lower()
  if lowered in ("none", "null"):
    return None
  if lowered in ("true", "false"):
    return lowered == "true"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def parse_options(spec: str) -> tuple[str, dict]:
  """"path?a=1&b=x" -> ("path", {"a": 1, "b": "x"}); one error for a malformed option."""
  base, sep, query = spec.rpartition("?")
  if not sep:
    return spec, {}
  options = {}
  for item in filter(None, query.split("&")):
    key, eq, value = item.partition("=")
    if not eq or not re.fullmatch(r"[A-Za-z_]\w*", key.strip()):
      raise ClmimError(f"model spec {spec!r}: option {item!r} is not 'key=value' (options follow "
                       f"'?' and are joined by '&', e.g. '?num_heads=3&name=mine').")
    options[key.strip()] = _value(value.strip())
  return base, options


def with_option(spec: str, key: str, value) -> str:
  """`spec` with option `key` set to `value` (added, or replacing the one it has)."""
  base, options = parse_options(spec)
  options[key] = value
  return f"{base}?{'&'.join(f'{k}={v}' for k, v in options.items())}"


def _check_options(spec: str, options: dict, allowed) -> None:
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ClmimError(f"model spec {spec!r}: unknown option {unknown[0]!r} (expected some of "
                     f"{', '.join(sorted(allowed))}).")


def _family_prefix(spec: str):
  """(family, path) for '<family>:<path>' specs; an unknown family is an error."""
  match = re.fullmatch(r"([A-Za-z_][\w]*):(.+)", spec)
  if not match or os.path.exists(spec):
    return None
  family, path = match.groups()
  if family not in families.FAMILIES and family not in modern_files.LAYOUTS:
    names = families.NAMES + modern_files.NAMES
    raise ClmimError(f"model spec {spec!r}: unknown family {family!r}"
                     f"{did_you_mean(family, names)} (expected "
                     f"{', '.join(names)}, or 'random:' for an untrained copy).")
  return family, path


def _official_file(spec: str):
  """(family or None, path) when `spec` names an official checkpoint file, else None."""
  prefixed = _family_prefix(spec)
  if prefixed:
    return prefixed
  is_native_npz = spec.endswith(".npz") and os.path.exists(
      os.path.join(os.path.dirname(spec), native.MANIFEST))
  if spec.endswith(_FILE_SUFFIXES) and not is_native_npz:
    return None, spec
  return None


# The masks the official pretraining recipes drew (MAE's pretrain script: mask_ratio 0.75;
# SimMIM's ViT-B configs: MASK_RATIO 0.6, MASK_PATCH_SIZE 32).
_OFFICIAL_MASKS = {"mae": {"ratio": 0.75, "patch_px": None},
                   "simmim": {"ratio": 0.6, "patch_px": 32}}


def _from_modern(name: str, layout: str, path: str, ckpt, options: dict, spec: str) -> Model:
  """An official file of today's models (`modern_files.LAYOUTS`) as a Model."""
  _check_options(spec, options, modern_files.OPTIONS)
  converted = modern_files.convert(ckpt, layout, path, options)
  record = modern_files.LAYOUTS[layout]
  info = converted.info
  preprocessing = {"image_size": converted.vit.image_size, **info.pop("preprocessing")}
  return Model(name=options.get("name") or name, family=record.kind, vit=converted.vit,
               params=jax.tree.map(jnp.asarray, converted.params), preprocessing=preprocessing,
               source=path, info={"method": record.method, **info})


def _from_official(name: str, family, path: str, options: dict, info=None,
                   spec: str = "") -> Model:
  if not os.path.exists(path):
    raise ClmimError(f"Checkpoint {path!r} does not exist.")
  ckpt = None
  if family is None or family in modern_files.LAYOUTS:
    ckpt = torch_reader.load(path)
    layout = family or modern_files.detect(ckpt)
    if layout:
      return _from_modern(name, layout, path, ckpt, options, spec or path)
    _check_options(spec or path, options, _FILE_OPTIONS)
  want_decoder = bool(options.get("decoder"))
  converted = converters.load(path, family, ckpt=ckpt, variant=options.get("variant"),
                              num_heads=options.get("num_heads"), with_heads=want_decoder)
  vit, params, decoder = converted.vit, converted.params, None
  if want_decoder:
    head = converted.heads.get("decoder")
    if head is None:
      raise ClmimError(f"{path}: '?decoder=1' asks for the pretraining decoder, but this "
                       f"{converted.family} file has none (MAE's _full/visualize files and "
                       f"SimMIM's have one).")
    decoder = {"kind": converted.family, "params": jax.tree.map(jnp.asarray, head["params"]),
               "config": dict(head["config"]),
               # What the official recipes masked (MAE: 75 % of the patches; SimMIM: 60 % in
               # 32 px blocks): the decoder analysis feeds the decoder that by default.
               "training_mask": dict(_OFFICIAL_MASKS[converted.family])}
    if vit.use_mask_token:
      decoder["mask_token"] = jnp.asarray(params["mask_token"])
      # with_heads also keeps SimMIM's encoder mask token: it goes with the decoder (the
      # decoder analysis' masked feed applies it), so the encoder stays exactly what the spec
      # without `decoder=1` gives.
      vit = vit.clone(use_mask_token=False)
      params = {k: v for k, v in params.items() if k != "mask_token"}
      converted.info["architecture"].pop("use_mask_token", None)
  record = families.get(converted.family)
  preprocessing = {"image_size": vit.image_size, **record.preprocessing}
  extra = {"decoder": {"kind": decoder["kind"], **decoder["config"],
                       "training_mask": decoder["training_mask"]}} if decoder else {}
  return Model(name=options.get("name") or name, family=record.kind, vit=vit,
               params=jax.tree.map(jnp.asarray, params), preprocessing=preprocessing,
               source=path, info={"method": converted.family, **converted.info, **extra,
                                  **(info or {})},
               decoder=decoder)


def _from_directory(spec: str, path: str, options: dict) -> Model:
  """A transformers or timm checkpoint directory (downloaded for `hf:` / `timm:` specs) as a
  Model; config.json says which layout (transformers' `model_type`, timm's `architecture`)."""
  _check_options(spec, options, _HF_OPTIONS)
  if timm_layout.is_timm_config(hf_layout.read_json(os.path.join(path, hf_layout.CONFIG))):
    converted, (method, kind) = timm_layout.convert_directory(
        path, options.get("image_size"), options.get("num_heads"))
  else:
    converted, record = hf_layout.convert_directory(path, options.get("image_size"),
                                                    options.get("num_heads"))
    method, kind = record.method, record.kind
  info = converted.info
  preprocessing = {"image_size": converted.vit.image_size, **info.pop("preprocessing")}
  hub = spec.startswith(hf_hub.PREFIXES)
  name = options.get("name") or (parse_options(spec)[0].split(":", 1)[1] if hub
                                 else os.path.basename(os.path.normpath(path)))
  return Model(name=name, family=kind, vit=converted.vit,
               params=jax.tree.map(jnp.asarray, converted.params), preprocessing=preprocessing,
               source=parse_options(spec)[0] if hub else path,
               info={"method": method, **info})


def _random_decoder(decoder, vit: ViT, seed: int):
  """An untrained decoder of the same kind and sizes (None stays None)."""
  if decoder is None:
    return None
  latent = jnp.zeros((1, vit.grid * vit.grid + 1, vit.width), jnp.float32)
  # A seed other than the encoder's: the two inits must not share random streams.
  params = heads.init_decoder(decoder["kind"], decoder["config"], latent,
                              jax.random.fold_in(jax.random.PRNGKey(seed), 1))
  out = {**decoder, "params": params}
  if "mask_token" in decoder:  # SimMIM's encoder mask token, as the encoder would init it
    out["mask_token"] = 0.02 * jax.random.truncated_normal(
        jax.random.fold_in(jax.random.PRNGKey(seed), 2), -2.0, 2.0, decoder["mask_token"].shape)
  return out


def untrained_copy(base: Model, seed: int) -> Model:
  """`base`'s architecture (its decoder's too) randomly initialised with `seed`, named
  "<base name> (untrained)": what `random:<spec>` gives. The weights depend only on the ViT
  fields, the decoder's kind and sizes, and the seed."""
  return dataclasses.replace(base, name=f"{base.name} (untrained)", family="random",
                             params=_init_params(base.vit, seed),
                             decoder=_random_decoder(base.decoder, base.vit, seed),
                             source=f"random init, seed {seed}",
                             info={"method": "untrained", "architecture_of": base.name,
                                   "architecture_from": base.info.get("architecture_from")})


# A ViT size written without its '/' or in another case ("B16", "vit_b16", "ti/16"): what a
# user meant as a variant, answered with the variant's spelling.
_VARIANT_GUESS = re.compile(r"(?:vit[-_ ]?)?([a-z]{1,2})[-_/ ]?(\d{1,2})", re.IGNORECASE)


def _variant_guess(text: str):
  """"B/16" for "B16", "vit_b16" or "b/16"; None when `text` does not look like a variant (or
  its size is no size of `VARIANTS`)."""
  match = _VARIANT_GUESS.fullmatch(text)
  sizes = {size.lower(): size for size in VARIANTS}
  if not match or match.group(1).lower() not in sizes:
    return None
  return f"{sizes[match.group(1).lower()]}/{int(match.group(2))}"


def _variant_error(spec: str, variant: str) -> ClmimError:
  """One line for `random:<variant>` with a variant ViT does not have: the sizes, an example,
  and the closest spelling."""
  guess = _variant_guess(variant)
  hint = f" (did you mean {guess!r}?)" if guess and guess != variant else did_you_mean(
      variant.partition("/")[0], VARIANTS)
  return ClmimError(f"model spec {spec!r}: unknown ViT variant {variant!r}{hint}: a variant is "
                    f"'<size>/<patch>' with size one of {', '.join(VARIANTS)} (e.g. 'B/16', "
                    f"'S/8'); 'random:<model name or path>' copies a model's architecture "
                    f"instead.")


def _locate(spec: str) -> str:
  if spec in known_names():
    return os.path.join(DEMO_DIR, spec)
  if os.path.sep in spec or os.path.exists(spec):
    return spec
  names = known_names() + sorted(known.KNOWN) + sorted(known_hub.HUB_MODELS)
  raise ClmimError(f"Unknown model {spec!r}{did_you_mean(spec, names)}: not a known name "
                   f"({', '.join(names)}) nor an "
                   f"existing checkpoint path (a clmim checkpoint directory, or a .pth/.pth.tar/"
                   f".safetensors file, optionally as '<family>:<path>'), nor 'random:<variant>' "
                   f"such as 'random:B/16'.")


def _build(manifest: dict, source: str) -> ViT:
  fields = dict(manifest["model"])
  try:
    return build_vit(fields.pop("variant", None) or None, **fields)
  except TypeError as e:
    raise ClmimError(f"Checkpoint {source!r}: its manifest's model fields are invalid: {e}") from e


def _init_params(vit: ViT, seed: int):
  images = jnp.zeros((1, vit.image_size, vit.image_size, 3), jnp.float32)
  return vit.init(jax.random.PRNGKey(seed), images)["params"]


def _random_variant(spec: str, variant: str, options: dict, seed: int) -> Model:
  """`random:<variant>?field=value...`: an untrained ViT of a variant, nothing loaded."""
  _check_options(spec, options, ("name",) + VIT_FIELDS)
  try:
    fields = {"image_size": 224, **parse_variant(variant)}
  except ClmimError:
    raise _variant_error(spec, variant) from None
  origin = {k: f"variant {variant}" for k in fields}
  origin["image_size"] = "default (224 px)"
  user = {k: v for k, v in options.items() if k != "name"}
  fields.update(user)
  origin.update({k: f"user ({k}={v})" for k, v in user.items()})
  vit = build_vit(None, **fields)
  if vit.image_size % vit.patch_size:
    raise ClmimError(f"model spec {spec!r}: image_size {vit.image_size} is not a multiple of the "
                     f"patch size {vit.patch_size}.")
  return Model(name=options.get("name") or f"{variant} (untrained)", family="random", vit=vit,
               params=_init_params(vit, seed),
               preprocessing={"image_size": vit.image_size, **DEFAULT_PREPROCESSING},
               source=f"random init, seed {seed}",
               info={"method": "untrained", "architecture_from": origin})


def resolve(spec: str, seed: int = 0) -> Model:
  """Loads the model a spec names (see the module docstring)."""
  if spec.startswith("random:"):
    inner = spec[len("random:"):]
    base_spec, options = parse_options(inner)
    if re.fullmatch(r"\w+/\d+", base_spec):
      return _random_variant(spec, base_spec, options, seed)
    if _VARIANT_GUESS.fullmatch(base_spec) and not (
        base_spec in known_names() or base_spec in known.KNOWN
        or base_spec in known_hub.HUB_MODELS or os.path.exists(base_spec)):
      raise _variant_error(spec, base_spec)  # e.g. random:B16, meant as random:B/16
    return untrained_copy(resolve(inner, seed), seed)
  base_spec, options = parse_options(spec)
  if base_spec in known.KNOWN:
    _check_options(spec, options, _FILE_OPTIONS)
    entry = known.KNOWN[base_spec]
    path = known.fetch(base_spec)
    options = {"variant": entry.variant, **options}
    return _from_official(base_spec, entry.family, path, options,
                          {"url": entry.url, "sha256": known.cached_sha256(path)})
  if base_spec in known_hub.HUB_MODELS:  # a short name for an hf: / timm: spec
    hub_spec = known_hub.spec_of(base_spec)
    return _from_directory(hub_spec, hf_hub.download(hub_spec), {"name": base_spec, **options})
  if base_spec.startswith(hf_hub.PREFIXES):
    return _from_directory(spec, hf_hub.download(base_spec), options)
  if os.path.isdir(base_spec) and not os.path.exists(os.path.join(base_spec, native.MANIFEST)) \
      and os.path.isfile(os.path.join(base_spec, hf_layout.CONFIG)):
    return _from_directory(spec, base_spec, options)
  official = _official_file(base_spec)
  if official:
    family, path = official
    if family not in modern_files.LAYOUTS:
      _check_options(spec, options, _FILE_OPTIONS + (modern_files.OPTIONS if family is None
                                                     else ()))
    return _from_official(os.path.basename(path), family, path, options, spec=spec)
  _check_options(spec, options, ("name", "decoder"))
  path = _locate(base_spec)
  manifest, params = native.load(path)
  vit = _build(manifest, path)
  images = jnp.zeros((1, vit.image_size, vit.image_size, 3), jnp.float32)
  expected = jax.eval_shape(lambda: vit.init(jax.random.PRNGKey(0), images))["params"]
  native.check_params(expected, params, path)
  shipped = base_spec in known_names() and path == os.path.join(DEMO_DIR, base_spec)
  decoder = native.load_decoder(path, manifest, spec, shipped) if options.get("decoder") \
      else None
  info = {k: manifest[k] for k in ("method", "steps", "final_loss", "sha256", "version")
          if k in manifest}
  info["architecture_from"] = {k: "checkpoint manifest" for k in manifest["model"]}
  if decoder:
    info["decoder"] = {"kind": decoder["kind"], **decoder["config"],
                       "training_mask": decoder["training_mask"]}
    if "mask_token" in params:  # SimMIM / hybrid: what a masked decoder feed needs
      decoder["mask_token"] = jnp.asarray(params["mask_token"])
  return Model(name=options.get("name") or manifest.get("name")
               or os.path.basename(os.path.normpath(path)),
               family=manifest.get("family") or "other", vit=vit,
               params=jax.tree.map(jnp.asarray, params),
               preprocessing=dict(manifest.get("preprocessing", {})),
               # A shipped checkpoint is named, not located: results hold no machine's paths.
               source=f"{base_spec} (shipped with clmim)" if shipped else path, info=info,
               decoder=decoder)
