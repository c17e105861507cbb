"""Where attention lands: the share of attention mass on the object, per block and head.

Definition (docs/analyses/object_attention.md): the procedural images know their object's mask.
A patch token is an *object token* when the object covers at least `threshold` (default 0.5) of
its patch's pixels. For a query q of block l, head h, the object share is the attention mass q
gives the object tokens divided by the mass it gives all patch tokens (the cls and register keys
are left out, `Batch.layout`):

  share(q) = Σ_{k object} A[q, k] / Σ_{k patch} A[q, k]

reported for the cls query ("object_attention_cls") and averaged over the patch queries
("object_attention_patches"; register queries are not patches), each the mean over images. A
model without a cls token has no cls query: its results hold "object_attention_patches" only.
The reference is the object's share of the tokens (mean over images): attention spread uniformly
over the image has exactly that share, attention spread over the object only has share 1. A
model whose attention lands on the object is above the reference; one that attends to the
background (e.g. the image border) is below it.

Data: object masks come with the procedural data only (config.data.source "synthetic", the one
source with OBJECT_MASKS); the pass streams config.data's images with each image's token mask
as its label row.

Options:
  threshold: 0.5: the share of a patch the object must cover for its token to count as object.

Results: "object_attention_cls" (cls models only), "object_attention_patches": [block][head];
"object_attention_details": {"object_token_share", "threshold", "images"}.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from clmim.analysis import core
from clmim.errors import ClmimError

NAME = "object_attention"
OPTIONS = {"threshold": 0.5}


def _object_share(results):
  """The reference: the object's share of the tokens (first model that has it)."""
  for values in results.get("models", {}).values():
    details = values.get("object_attention_details")
    if details:
      return details["object_token_share"]
  return None


RESULTS = (
    core.Result("object_attention_cls", "cls attention on the object (share)", "[block][head]",
                reference=_object_share, reference_label="object's share of the tokens",
                cl_direction="higher",
                description="share of the cls query's attention (over patch keys) that lands on "
                            "object tokens",
                title="cls attention on the object"),
    core.Result("object_attention_patches", "patch attention on the object (share)",
                "[block][head]", reference=_object_share,
                reference_label="object's share of the tokens", cl_direction="higher",
                description="share of each patch query's attention that lands on object tokens, "
                            "mean over queries",
                title="Patch-query attention on the object"),
    core.Result("object_attention_details", "object attention details", "{...}", x=None,
                series=None, description="object's share of the tokens, threshold, images"),
)


def _threshold(options) -> float:
  value = options["threshold"]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
    raise ClmimError(f"config.analysis_options.{NAME}.threshold={value!r}: expected a share of "
                     "a patch in (0, 1].")
  return float(value)


def token_masks(images, patch_size: int, threshold: float) -> np.ndarray:
  """[n, N] int32: 1 for the object tokens of each image of `images` (an `EvalImages` of a
  source with object masks), tokens in row-major order."""
  size = images.image_shape[0]
  grid = size // patch_size
  rows = []
  for index in range(len(images)):
    coverage = images.object_mask(index)[:grid * patch_size, :grid * patch_size]
    patches = coverage.reshape(grid, patch_size, grid, patch_size).mean(axis=(1, 3))
    rows.append((patches >= threshold - 1e-6).reshape(-1))
  return np.asarray(rows, np.int32)


def attention_sums(batch, options=None) -> dict:
  """Per device: Σ over images of the object share per block and head, for the cls query (not
  for a model without one) and the mean over patch queries; Σ of the object token share; the
  count of the images with a mask ("masked_count")."""
  layout = batch.layout
  mask = (batch.labels > 0).astype(jnp.float32)  # [b, N]
  valid = batch.weights * (batch.labels[:, 0] >= 0)
  cls, patches = [], []
  for attn in batch.attns:
    keys = attn[..., layout.prefix:].astype(jnp.float32)  # [b, H, T, N]: patch keys only
    on_object = jnp.einsum("bhqk,bk->bhq", keys, mask)
    share = on_object / jnp.maximum(keys.sum(-1), 1e-30)  # [b, H, T]: per query
    if layout.has_cls:
      cls.append(jnp.einsum("bh,b->h", share[:, :, 0], valid))
    patches.append(jnp.einsum("bh,b->h", share[:, :, layout.prefix:].mean(-1), valid))
  out = {"patches": jnp.stack(patches), "area": (mask.mean(-1) * valid).sum(),
         "masked_count": valid.sum()}
  if cls:
    out["cls"] = jnp.stack(cls)
  return out


STAGE = core.Stage(f"{NAME}_pass", ("object_attention",), attention_sums)


def check(model, options) -> None:
  _threshold(options)


def check_data(data, options) -> None:
  """Object masks exist for the procedural data only."""
  _threshold(options)
  if not data.source.OBJECT_MASKS:
    raise ClmimError(f"analysis {NAME!r} needs object masks, which only the procedural data "
                     f"has (config.data.source='synthetic'); got {data.source.NAME!r}.")
  data.evaluation()


def measure(model, data, passes, options) -> dict:
  evaluation = data.evaluation()
  threshold = _threshold(options)
  # Drawn once per model: the bootstrap replays `measure` per replicate with the same cache.
  key = ("object token masks", model.vit.patch_size, threshold)
  if key not in passes.cache:
    passes.cache[key] = token_masks(evaluation.images, model.vit.patch_size, threshold)
  masks = passes.cache[key]
  sums = passes.run(STAGE, evaluation.images, masks, None, "object attention")
  count = max(float(sums["masked_count"]), 1.0)
  out = {"num_images": int(round(float(sums["masked_count"]))),
         "object_attention_patches": (np.asarray(sums["patches"]) / count).tolist(),
         "object_attention_details": {"object_token_share": float(sums["area"]) / count,
                                      "threshold": threshold,
                                      "images": int(round(float(sums["masked_count"])))}}
  if "cls" in sums:  # absent for a model without a cls token (`attention_sums`)
    out["object_attention_cls"] = (np.asarray(sums["cls"]) / count).tolist()
  return out
