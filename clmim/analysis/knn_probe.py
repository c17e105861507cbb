"""The weighted k-NN probe of DINO's evaluation (Caron et al. 2021), per block, beside the ridge
probe of `clmim.analysis.probing` (which calls it; options `knn_*` there).

Definition (docs/analyses/probing.md, "k-NN probe"):
- Features: the ridge probe's (`probing.layout_features`: each block's cls token and mean patch
  token, registers left out, normalised like a LayerNorm without affine parameters; the mean
  patch token only for a model without a cls token), then L2-normalised, so the similarity of
  two images is the cosine of their (centred) features.
- Memory: the first `knn_train_images` training images (all when 0), every one of them.
- Vote: for an evaluation image, its k most similar memory images (k = `knn_k`, 20 in DINO) each
  vote for their class with weight exp(similarity / T) (T = `knn_temperature`, 0.07 in DINO);
  the prediction is the class with the largest total vote (ties: the lowest class id).
- Top-1: the share of evaluation images predicted as their label.

How it streams: one pass over the memory images gathers their features ([blocks, kinds, M, D],
a one-hot sum over each batch: exact whatever the batching and device count), then the
evaluation pass holds them, replicated, as its context and counts hits per block and kind. Both
passes run on all devices; the hits are sums over the evaluation images, so the bootstrap
resamples them like the ridge probe's (the memory is held fixed, as the fitted probe is).
Memory: blocks x kinds x M x D float32 on each device (ViT-B, M = 10,000: 0.74 GB), and a
[blocks, kinds, b, M] similarity per step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from clmim.analysis import common, core
from clmim.errors import ClmimError

OPTIONS = {"knn_k": 20, "knn_temperature": 0.07, "knn_train_images": 10000}


def check_options(options, where: str) -> None:
  """Rejects bad k-NN options (one line each)."""
  k, t, m = options["knn_k"], options["knn_temperature"], options["knn_train_images"]
  for name, value in (("knn_k", k), ("knn_train_images", m)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ClmimError(f"config.analysis_options.{where}.{name}={value!r}: expected an integer "
                       ">= 0 (knn_k=0: no k-NN probe; knn_train_images=0: every training image).")
  if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t) or t <= 0:
    raise ClmimError(f"config.analysis_options.{where}.knn_temperature={t!r}: expected a number "
                     "> 0.")


def memory_size(options, train_images: int) -> int:
  """How many training images the k-NN memory holds."""
  cap = int(options["knn_train_images"])
  return train_images if cap == 0 else min(cap, train_images)


def check_training_set(train_images: int, options, where: str) -> None:
  """The memory holds more than k images (checked before any compute)."""
  k = int(options["knn_k"])
  if k and memory_size(options, train_images) <= k:
    raise ClmimError(f"config.analysis_options.{where}.knn_k={k}: the k-NN memory holds "
                     f"{memory_size(options, train_images)} training image(s) (config.data."
                     "probe_data.num_images, knn_train_images); it needs more than k.")


def unit(x):
  """x / |x| over the last axis (0 stays 0)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.where(norm > 0, norm, 1.0)


def memory_stage(features_fn, count: int) -> core.Stage:
  """The pass that gathers `features_fn(zs, layout)` ([blocks, kinds, b, D]; `layout` the
  batch's `core.TokenLayout`) of stream positions 0 .. count-1 (held fixed in the bootstrap)."""
  def partial_sums(batch, options):
    found, gathered = common.gather_first(batch.index, batch.weights, count,
                                          unit(features_fn(batch.zs, batch.layout)))
    return {"found": found, "features": gathered}

  return core.Stage("knn_memory", ("knn_memory", count), partial_sums, BOOTSTRAP=False)


def votes(similarity, memory_labels, k: int, temperature: float, classes: int):
  """[..., b, classes] weighted votes: each row's k most similar memory images (similarity
  [..., b, M]; -inf = not in the memory) vote for their class (memory_labels [M] int) with
  weight exp(similarity / T)."""
  top, where = jax.lax.top_k(similarity, k)
  weight = jnp.where(jnp.isfinite(top), jnp.exp((top - 1.0) / temperature), 0.0)  # scale-free
  one_hot = jax.nn.one_hot(memory_labels[where], classes, dtype=jnp.float32)
  return jnp.einsum("...k,...kc->...c", weight, one_hot)


def eval_stage(features_fn, columns, k: int, temperature: float) -> core.Stage:
  """The pass that counts, per label column (name, column index, classes), the evaluation images
  whose k-NN vote names their label ([blocks, kinds] hits) and the labelled images."""
  columns = tuple(columns)

  def partial_sums(batch, options):
    x = unit(features_fn(batch.zs, batch.layout))  # [L, K, b, D]
    memory = batch.context["features"]  # [L, K, M, D], unit rows (0 where not found)
    similarity = jnp.einsum("lkbd,lkmd->lkbm", x, memory, precision=jax.lax.Precision.HIGHEST)
    similarity = jnp.where(batch.context["found"][None, None, None, :] > 0, similarity,
                           -jnp.inf)
    out = {}
    for index, (name, column, classes) in enumerate(columns):
      vote = votes(similarity, batch.context["labels"][name], k, temperature, classes)
      predicted = jnp.argmax(vote, axis=-1)  # first of equal votes: the lowest class id
      y = batch.labels[:, column]
      valid = batch.weights * (y >= 0)
      out[f"hits{index}"] = ((predicted == y[None, None, :]) * valid).sum(-1)
      out[f"count{index}"] = valid.sum()
    return out

  return core.Stage("knn_eval", ("knn_eval", columns, k, float(temperature)), partial_sums)


def measure(passes, data, options, features_fn) -> tuple[dict, dict]:
  """({target: [blocks, kinds] top-1}, details) of the k-NN probe on `data` (ProbeData), the
  memory from its independent training set, evaluated on its evaluation images.
  `features_fn(zs, layout)` -> [blocks, kinds, b, D]."""
  k, temperature = int(options["knn_k"]), float(options["knn_temperature"])
  train = data.train()
  count = memory_size(options, len(train.labels.values))
  key = ("knn memory", count)
  if key not in passes.cache:
    passes.cache[key] = passes.run(memory_stage(features_fn, count), train.images, None, None,
                                   "k-NN memory")
  memory = passes.cache[key]
  evaluation = data.evaluation()
  columns = [(t, evaluation.labels.columns.index(t), len(train.labels.classes[t]))
             for t in data.targets]
  context = {"features": np.asarray(memory["features"], np.float32),
             "found": np.asarray(memory["found"], np.float32),
             # -1 (no label) votes for no class: its one-hot row is all zeros.
             "labels": {t: train.column(t)[:count].astype(np.int32) for t in data.targets}}
  sums = passes.run(eval_stage(features_fn, columns, k, temperature), evaluation.images,
                    evaluation.labels.values, context, "k-NN evaluation")
  top1 = {}
  for index, target in enumerate(data.targets):
    top1[target] = np.asarray(sums[f"hits{index}"], np.float64) / max(
        float(sums[f"count{index}"]), 1.0)
  details = {"k": k, "temperature": temperature,
             "memory_images": int(round(float(np.sum(memory["found"])))),
             "memory_data": train.description}
  return top1, details
