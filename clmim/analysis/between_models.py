"""Linear CKA (plain and unbiased) between the layers of two different models, exact over the
same images.

CKA compares two representations of the same samples, so both models must run on each batch.
For every two trained models of a run (untrained copies are left out) this builds a paired
forward pass whose states are model A's stages followed by model B's — each stage at an even
position of `zs`, which is where the `cka` analysis reads stages — and streams it through the
`cka` analysis itself (same sums, same centring, same invariance). The cross block of the
resulting [SA + SB] x [SA + SB] matrix is CKA(stage i of A, stage j of B).

The two models may lay out their tokens differently (register tokens, no cls token), while one
paired batch has one `TokenLayout`: each model's stage states are rewritten into the paper's
layout first, [pooled, patches], where pooled is the model's cls token, or, for a model without
one, the mean of its patch tokens (registers are dropped). So a pair's "cls" feature of a model
without a cls token is its mean patch token (recorded per pair as "cls_feature"); the
"mean_tokens" feature is every model's mean patch token, as in `cka`.

Besides CKA, each pair gets the mutual k-NN alignment of every stage of A with every stage of B
(cka options `mutual_knn_k`, `mutual_knn_images`): the first images' features are gathered in
a second paired pass (`GatherStage`), and `mutual_knn` compares their neighbourhoods on the host.

A pair is skipped, with the reason recorded, when its models do not see the same input (other
preprocessing or resolution) or have different widths (their features would not stack).
The `cka` analysis runs it (its `between_models` hook, core.py) when its option
`between_models` is on.
Memory: the `cka` analysis' statement with S = SA + SB stages.
"""
from __future__ import annotations

import itertools

import numpy as np
from matplotlib.figure import Figure

import jax.numpy as jnp

from clmim.analysis import cka, common, core
from clmim.models.vit import forward_with_states


def paper_layout(z, layout: core.TokenLayout):
  """States [b, T, D] of token `layout` -> [b, 1 + N, D] in the paper's layout: the cls token
  (a model without one: the mean of its patch tokens, in float32) then the N patch tokens."""
  if layout == core.TokenLayout():
    return z  # already so: the paper's models pair exactly as before
  patches = layout.patches(z)
  if layout.has_cls:
    pooled = layout.cls(z)
  else:
    patches = patches.astype(jnp.float32)  # the mean in float32, as cka's mean_tokens
    pooled = jnp.mean(patches, axis=1)
  return jnp.concatenate([pooled[:, None].astype(patches.dtype), patches], axis=1)


def pooled_feature(vit) -> str:
  """What a pair's "cls" feature is for the model of `vit` (see the module docstring)."""
  return "cls token" if core.TokenLayout.of(vit).has_cls else "mean patch token (no cls token)"


def _paired_forward(vit_a, vit_b):
  layouts = (core.TokenLayout.of(vit_a), core.TokenLayout.of(vit_b))

  def forward(params, images):
    stages = [paper_layout(z, layout)
              for vit, p, layout in zip((vit_a, vit_b), params, layouts)
              for z in forward_with_states(vit, p, images)[0][0::2]]
    # Each stage at an even index (cka reads zs[0::2]); the odd slots repeat it and are unread.
    # The paired batch has the default (paper) layout: the Analyzer is built without one.
    return [s for stage in stages for s in (stage, stage)][:-1], []
  return forward


def gather_stage(kinds, count: int) -> core.Stage:
  """A stage that gathers the features ([kind][stage, count, D]) of stream positions
  0 .. count-1, each exactly once (a one-hot sum over the batch, as tsne gathers)."""
  kinds = tuple(kinds)

  def partial_sums(batch, options):
    out = {}
    for kind in kinds:
      f = jnp.stack([cka.stage_feature(z, kind, batch.layout)
                     for z in batch.zs[0::2]])  # [S, b, D]
      out["found"], out[kind] = common.gather_first(batch.index, batch.weights, count, f)
    return out

  return core.Stage("mutual_knn_features", ("gather", kinds, count), partial_sums,
                    BOOTSTRAP=False)


def neighbours(features, k: int) -> np.ndarray:
  """[n, k] indices of each row's k nearest other rows by cosine similarity (float64)."""
  x = np.asarray(features, np.float64)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  x = x / np.where(norms > 0, norms, 1)
  sims = x @ x.T
  np.fill_diagonal(sims, -np.inf)
  return np.argpartition(-sims, k - 1, axis=1)[:, :k]


def mutual_knn(a, b, k: int) -> float:
  """Mean over rows of |kNN_A(i) ∩ kNN_B(i)| / k for features a [n, Da] and b [n, Db] of the
  same n images: 1 when both spaces have the same neighbourhoods, ~k/(n-1) by chance."""
  na, nb = neighbours(a, k), neighbours(b, k)
  n = len(na)
  member = np.zeros((n, n), bool)
  member[np.arange(n)[:, None], na] = True
  return float(member[np.arange(n)[:, None], nb].sum(axis=1).mean() / k)


def _same_input(a, images_a, b, images_b) -> str:
  """"" when A and B see identical inputs, else why not."""
  if a.vit.image_size != b.vit.image_size:
    return f"image sizes differ ({a.vit.image_size} vs {b.vit.image_size} px)"
  if images_a.description != images_b.description or not (
      np.allclose(images_a.mean, images_b.mean) and np.allclose(images_a.std, images_b.std)):
    return "the two models preprocess their images differently"
  if a.vit.width != b.vit.width:
    return f"widths differ ({a.vit.width} vs {b.vit.width})"
  return ""


def cka_between_models(jobs, options: dict, session) -> dict:
  """{"A ~ B": {"stages": [SA, SB], "cka_<kind>": [SA][SB], "cka_unbiased_<kind>": [SA][SB],
  "cls_feature": [what "cls" is for A, for B], ...} or {"skipped": why}} for every
  two trained models of `jobs` ([(Model, EvalImages)]), each pair streamed by the analysis job's
  `session` (its batching, max_batches and multi-process plan; counted in its compilations)."""
  trained = [(m, images) for m, images in jobs if m.family != "random"]
  out = {}
  for (a, images_a), (b, images_b) in itertools.combinations(trained, 2):
    name = f"{a.name} ~ {b.name}"
    why = _same_input(a, images_a, b, images_b)
    if why:
      out[name] = {"skipped": why}
      continue
    pair_options = {**options, "stages": "all"}
    analyzer = session.extra_analyzer(("cka pair", name), _paired_forward(a.vit, b.vit), [cka],
                                      a.vit.patch_size, {"cka": pair_options})
    result = session.stream(analyzer, images_a, (a.params, b.params), name)
    split = a.vit.depth + 1
    entry = {"stages": [split, b.vit.depth + 1], "num_images": result["num_images"],
             "cls_feature": [pooled_feature(a.vit), pooled_feature(b.vit)]}
    for kind in cka.feature_kinds(pair_options):
      for estimator in ("", "_unbiased"):
        matrix = np.asarray(result[f"cka{estimator}_{kind}"], np.float64)
        entry[f"cka{estimator}_{kind}"] = matrix[:split, split:].tolist()
    entry.update(_mutual_knn(a, b, images_a, session, options, name))
    out[name] = entry
  return out


def _mutual_knn(a, b, images, session, options, name) -> dict:
  """{"mutual_knn_<kind>": [SA][SB], "mutual_knn_k", "mutual_knn_images"} of one pair, or {}
  when the option is off."""
  k, count = cka.mutual_knn_settings(options)
  count = min(count, len(images))
  if not count or count <= k:
    return {}
  kinds = cka.feature_kinds(options)
  stage = gather_stage(kinds, count)
  analyzer = session.extra_analyzer(("mutual knn", name, count), _paired_forward(a.vit, b.vit),
                                    [stage], a.vit.patch_size, {stage.NAME: stage.OPTIONS})
  gathered = session.stream(analyzer, images, (a.params, b.params), f"{name}: mutual k-NN",
                            quiet=True)
  found = int((np.asarray(gathered["found"]) > 0).sum())  # fewer with max_batches
  split = a.vit.depth + 1
  out = {"mutual_knn_k": k, "mutual_knn_images": found}
  if found <= k:
    return {}
  for kind in kinds:
    features = np.asarray(gathered[kind], np.float64)[:, :found]
    out[f"mutual_knn_{kind}"] = [[mutual_knn(features[i], features[split + j], k)
                                  for j in range(b.vit.depth + 1)] for i in range(split)]
  return out


def figure(pairs: dict) -> Figure | None:
  """One heatmap per computed pair (mean-token features, else cls): rows = A's stages, columns =
  B's stages (0 = embedding)."""
  shown = {n: p for n, p in pairs.items() if "skipped" not in p}
  if not shown:
    return None
  fig = Figure(figsize=(3.6 * len(shown) + 0.8, 3.4), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(shown)))
  image = None
  for ax, (name, pair) in zip(axes, shown.items()):
    kind = "mean_tokens" if "cka_mean_tokens" in pair else "cls"
    image = ax.imshow(np.asarray(pair[f"cka_{kind}"], np.float64), vmin=0, vmax=1,
                      cmap="magma", origin="lower")
    first, second = name.split(" ~ ", 1)
    ax.set_xlabel(f"{second}: stage", fontsize=9)
    ax.set_ylabel(f"{first}: stage", fontsize=9)
    ax.set_title(f"linear CKA between models\n({kind.replace('_', ' ')})", fontsize=10)
  fig.colorbar(image, ax=axes, shrink=0.8, label="linear CKA")
  return fig
