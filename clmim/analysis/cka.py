"""Linear CKA between every pair of stages of one model, exact over all images.

Definition (docs/analyses/cka.md, Kornblith et al. 2019): samples are images; a stage is the
embedding output zs[0] or a block's output zs[2b] (depth + 1 stages); each stage gives two
features per image: the mean of its patch tokens ("mean_tokens"; register tokens are not patches
and are left out, `Batch.layout`) and its cls token ("cls"). A model without a cls token has no
"cls" feature: its cls results are None (a run that asks for the cls feature only is refused for
it before any compute). For
the n x D feature matrices X, Y of two stages, centred over the images (Xc, Yc):

  CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)

Streaming: the centred products are linear in the per-image outer products, so each device
returns the feature sums Σx [S, D], the cross second moments Σ x_i x_j^T of the stage pairs
i <= j it needs ([P, D, D], pairs listed by `stage_pairs`; the lower triangle is the transpose)
and the image count. `finalize` centres in float64, Σ (x - μx)(y - μy)^T = Σ x y^T - n μx μy^T,
and forms the matrices.

Memory: P D^2 floats per feature kind; all stages: P = S(S+1)/2, for ViT-B (S = 13, D = 768)
91 x 768^2 x 4 B = 215 MB per kind on each device, twice that in float64 on the host. Options:
  features: "mean_tokens,cls" (default), "mean_tokens" or "cls".
  stages: "all" (default) or a tuple / comma-separated string of stage indices (0 = embedding,
    b = block b's output); the matrices then cover the chosen stages only (P = their pairs plus
    the at most 2S - 1 pairs of the adjacent curve).
  between_models: True (default): the analysis job also computes CKA between the stages of every
    two trained models of the run on the same images (`between_models` below, computed by
    clmim/analysis/between_models.py; results.json "cka_between_models", figure
    cka_between_models.png).
  mutual_knn_k: k of the mutual k-NN alignment between models (10; Huh et al. 2024): for each
    of the first `mutual_knn_images` images, the share of its k nearest images (cosine) in
    model A's stage that are also among its k nearest in model B's stage, averaged.
  mutual_knn_images: how many images (the first in stream order) the alignment compares (1000;
    0 = no mutual k-NN). Their features are gathered on the devices: images x stages x D floats.

Results: "cka_mean_tokens", "cka_cls": [stage][stage] (None when not computed, e.g. "cka_cls" of
a model without a cls token; NaN for a stage whose feature is constant over the images, e.g. the
cls token at stage 0);
"cka_unbiased_mean_tokens", "cka_unbiased_cls": the same with the unbiased HSIC estimator
(`unbiased_pair_cka`: from four more small sums per pair, ~0 for independent features where
the plain estimator sits at ~D/n; needs >= 4 images); "cka_adjacent":
[block] CKA(stage b-1, stage b), b = 1 .. depth, always every block, of the mean-token features
(cls when only those are computed).
"""
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from clmim.analysis import core, plots
from clmim.errors import ClmimError

NAME = "cka"
OPTIONS = {"features": "mean_tokens,cls", "stages": "all", "between_models": True,
           "mutual_knn_k": 10, "mutual_knn_images": 1000}
KINDS = ("mean_tokens", "cls")

# A stage whose centred variance is below this fraction of its raw second moment is treated as
# constant over the images: float32 rounding (~1e-7) would otherwise pose as signal.
_CONSTANT_RTOL = 1e-5


def _adjacent_series(values):
  """The curve of "cka_adjacent": its values as they are, one per block."""
  return np.asarray(values, np.float64).tolist()


RESULTS = (
    core.Result("cka_mean_tokens", "linear CKA (mean patch token)", "[stage][stage]", x=None,
                series=None, description="linear CKA between stages, mean-token features"),
    core.Result("cka_cls", "linear CKA (cls token)", "[stage][stage]", x=None, series=None,
                description="linear CKA between stages, cls-token features"),
    core.Result("cka_unbiased_mean_tokens", "unbiased linear CKA (mean patch token)",
                "[stage][stage]", x=None, series=None,
                description="unbiased linear CKA between stages (no ~D/n floor), mean tokens"),
    core.Result("cka_unbiased_cls", "unbiased linear CKA (cls token)", "[stage][stage]",
                x=None, series=None,
                description="unbiased linear CKA between stages, cls-token features"),
    core.Result("cka_adjacent", "CKA(stage b-1, stage b)", "[block]", x="block",
                series=_adjacent_series, cl_direction="higher",
                description="how alike consecutive stages are (linear CKA, mean tokens)",
                title="Similarity of consecutive stages (linear CKA)"),
)


def feature_kinds(options) -> tuple:
  """The feature kinds of option `features`, in canonical order."""
  given = options["features"]
  names = [s.strip() for s in given.split(",")] if isinstance(given, str) else list(given)
  names = [n for n in names if n]
  unknown = [n for n in names if n not in KINDS]
  if unknown or not names:
    raise ClmimError(f"config.analysis_options.cka.features: expected a comma-separated subset "
                     f"of {', '.join(KINDS)}; got {given!r}.")
  return tuple(k for k in KINDS if k in names)


def chosen_stages(options, num_stages=None) -> list:
  """Stage indices of option `stages` (sorted); checked against `num_stages` when given."""
  given = options["stages"]
  if isinstance(given, str) and given.strip() == "all":
    if num_stages is None:
      return None
    return list(range(num_stages))
  try:
    parts = given.split(",") if isinstance(given, str) else list(given)
    stages = sorted({int(s) for s in parts})
  except (TypeError, ValueError) as e:
    raise ClmimError(f"config.analysis_options.cka.stages: expected 'all' or stage indices; "
                     f"got {given!r}.") from e
  bad = [s for s in stages if s < 0 or (num_stages is not None and s >= num_stages)]
  if bad or not stages:
    limit = f"0 .. {num_stages - 1}" if num_stages is not None else ">= 0"
    raise ClmimError(f"config.analysis_options.cka.stages: stage indices must be {limit} "
                     f"(0 = embedding, b = block b's output); got {given!r}.")
  return stages


def mutual_knn_settings(options) -> tuple[int, int]:
  """(k, images) of the mutual k-NN options, checked: k >= 1, images 0 or > k."""
  k, images = options["mutual_knn_k"], options["mutual_knn_images"]
  ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (k, images))
  if not ints or k < 1 or images < 0 or (images and images <= k):
    raise ClmimError(f"config.analysis_options.cka.mutual_knn_k / mutual_knn_images: expected "
                     f"k >= 1 and images 0 (off) or more than k; got {k!r} and {images!r}.")
  return int(k), int(images)


def computed_kinds(options, layout=core.TokenLayout()) -> tuple:
  """The feature kinds of option `features` that a model of token `layout` has (no "cls"
  without a cls token)."""
  return tuple(k for k in feature_kinds(options) if k != "cls" or layout.has_cls)


def check(model, options) -> None:
  """Rejects bad options before any compute, and a cls-only run on a model without cls."""
  vit = getattr(model, "vit", model)  # the registry Model, or a bare ViT
  feature_kinds(options)
  if not computed_kinds(options, core.TokenLayout.of(vit)):
    raise ClmimError(f"config.analysis_options.cka.features={options['features']!r}: this model "
                     "has no cls token (class_token=False), so there is nothing to compare; "
                     "add 'mean_tokens'.")
  mutual_knn_settings(options)
  chosen_stages(options, vit.depth + 1)


def stage_feature(z, kind, layout=core.TokenLayout()):
  """[b, T, D] state -> [b, D] float32: the mean of the patch tokens (registers left out) or the
  cls token. `layout`: where the tokens are (default: the paper's, cls then the patches)."""
  z = z.astype(jnp.float32)
  return jnp.mean(layout.patches(z), axis=1) if kind == "mean_tokens" else layout.cls(z)


def stage_pairs(num_stages: int, stages, adjacent: bool) -> list:
  """The (i, j), i <= j, stage pairs whose moments are kept, sorted: every pair of the chosen
  `stages`, plus, when `adjacent`, every (s, s) and (s - 1, s) of all `num_stages` stages (the
  cka_adjacent curve always spans the whole depth; that costs at most 2S - 1 pairs)."""
  pairs = {(i, j) for a, i in enumerate(stages) for j in stages[a:]}
  if adjacent:
    pairs |= {(s, s) for s in range(num_stages)}
    pairs |= {(s - 1, s) for s in range(1, num_stages)}
  return sorted(pairs)


def _pairs_of(kind, kinds, num_stages, options):
  """The stage pairs of feature `kind`; the first kind also carries the adjacent curve."""
  return stage_pairs(num_stages, chosen_stages(options, num_stages), kind == kinds[0])


def partial_sums(batch: core.Batch, options) -> dict:
  """Per-device sums: feature sums, stage-pair cross moments and the image count.

  Returns:
    {"sum_<kind>": [S, D] (all stages), "moment_<kind>": [P, D, D]} per chosen
    kind the model has (`computed_kinds`), where moment[p] = Σ_images w x_i x_j^T for the p-th
    pair (i, j) of `stage_pairs`.
  """
  states = list(batch.zs[0::2])
  kinds = computed_kinds(options, batch.layout)
  w = jnp.where(batch.weights > 0, batch.weights, 0).astype(jnp.float32)
  real = (w > 0)[None, :, None]
  out = {}
  for kind in kinds:
    rows, cols = np.asarray(_pairs_of(kind, kinds, len(states), options)).T
    # Padding may hold anything (even NaN): zero it, as weight 0 alone would give 0 * NaN.
    f = jnp.where(real, jnp.stack([stage_feature(z, kind, batch.layout) for z in states]), 0)
    fw = f * w[None, :, None]
    out[f"sum_{kind}"] = jnp.sum(fw, axis=1)
    # HIGHEST: accelerators otherwise run float32 matmuls in reduced precision (TF32/bf16), and
    # the centring in finalize subtracts large numbers from these moments.
    out[f"moment_{kind}"] = jnp.einsum("pbd,pbe->pde", fw[rows], f[cols],
                                       precision=jax.lax.Precision.HIGHEST)
    # The unbiased estimator's diagonal corrections (`unbiased_pair_cka`).
    sq = jnp.sum(f * f, axis=-1)  # [S, b] |x|^2 per image
    out[f"sq_{kind}"] = jnp.sum(sq * w[None], axis=1)
    out[f"sqsq_{kind}"] = jnp.sum(sq[rows] * sq[cols] * w[None], axis=1)
    out[f"xsq_{kind}"] = jnp.einsum("pbd,pb->pd", fw[rows], sq[cols],
                                    precision=jax.lax.Precision.HIGHEST)
    out[f"sqx_{kind}"] = jnp.einsum("pb,pbd->pd", sq[rows], fw[cols],
                                    precision=jax.lax.Precision.HIGHEST)
  return out


def unbiased_pair_cka(sums: dict, kind: str, count: float, pairs, constant=()) -> dict:
  """{(i, j): float64 unbiased linear CKA} (Song et al. 2012's unbiased HSIC, as Nguyen et al.
  2021 use it for CKA) from the streamed sums of feature `kind`, images weighted 1.

  With K = X X^T, L = Y Y^T (n x n, not centred) and K~, L~ their off-diagonal parts:
    HSIC_u = [tr(K~L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3))
  where every term is a sum over images of streamed quantities:
    tr(K~L~)   = ||X^T Y||_F^2 - sum_a |x_a|^2 |y_a|^2
    1^T K~ 1   = |sum_a x_a|^2 - sum_a |x_a|^2
    1^T K~L~ 1 = Sx^T (X^T Y) Sy - Sx . sum_a x_a |y_a|^2 - Sy . sum_a |x_a|^2 y_a
                 + sum_a |x_a|^2 |y_a|^2,      Sx = sum_a x_a.
  Unlike the plain (biased) estimator, it is ~0 for independent features at any n (the biased
  one is ~D/n there). Needs n >= 4; NaN where a stage's HSIC_u(X, X) <= 0 or the stage is in
  `constant` (constant over the images, as `pair_cka` finds: float round-off would otherwise
  turn 0/0 into an arbitrary number, e.g. for the cls token before the first block). Precision: the
  terms are sums of *uncentred* products, added in float32 on the devices, so features whose
  mean is large against their spread lose digits: ~1e-4 absolute when the mean is twice the
  spread (tests/test_cka_tsne.py), against ~1e-5 relative for the plain estimator.
  """
  n = float(count)
  if n < 4:
    return {pair: float("nan") for pair in pairs}
  total = np.asarray(sums[f"sum_{kind}"], np.float64)
  sq = np.asarray(sums[f"sq_{kind}"], np.float64)
  hsic = {}
  for p, (i, j) in enumerate(pairs):
    moment = np.asarray(sums[f"moment_{kind}"][p], np.float64)
    sqsq = float(sums[f"sqsq_{kind}"][p])
    trace = np.vdot(moment, moment) - sqsq
    ones_x = total[i] @ total[i] - sq[i]
    ones_y = total[j] @ total[j] - sq[j]
    middle = (total[i] @ moment @ total[j] - total[i] @ np.asarray(sums[f"xsq_{kind}"][p])
              - total[j] @ np.asarray(sums[f"sqx_{kind}"][p]) + sqsq)
    hsic[i, j] = (trace + ones_x * ones_y / ((n - 1) * (n - 2))
                  - 2 / (n - 2) * middle) / (n * (n - 3))
  out = {}
  for (i, j), value in hsic.items():
    scale = hsic[i, i] * hsic[j, j]
    defined = hsic[i, i] > 0 and hsic[j, j] > 0 and i not in constant and j not in constant
    out[i, j] = float(value / np.sqrt(scale)) if defined else float("nan")
  return out


def pair_cka(moments, sums, count, pairs) -> dict:
  """{(i, j): float64 linear CKA} from raw moments [P, D, D] of `pairs`, sums [S, D] and the
  total weight. Every stage in `pairs` must have its (s, s) pair. A pair involving a stage that
  is constant over the images is NaN (CKA is undefined there)."""
  sums = np.asarray(sums, np.float64)
  cross, constant = {}, {}
  for p, (i, j) in enumerate(pairs):
    # One pair at a time: a centred copy of all pairs would double the (large) memory.
    raw = np.asarray(moments[p], np.float64)
    centred = raw - np.outer(sums[i], sums[j]) / count
    cross[i, j] = np.vdot(centred, centred)  # ||Xc^T Yc||_F^2
    if i == j:
      constant[i] = np.trace(centred) <= _CONSTANT_RTOL * np.trace(raw)
  out = {}
  for (i, j), value in cross.items():
    if constant[i] or constant[j]:
      out[i, j] = float("nan")
    else:  # ||Xc^T Xc||_F ||Yc^T Yc||_F
      out[i, j] = float(value / np.sqrt(cross[i, i] * cross[j, j]))
  return out


def finalize(sums, options) -> dict:
  """{"cka_mean_tokens": [S][S] | None, "cka_cls": [S][S] | None, "cka_adjacent": [block]}
  (None: a kind not computed, e.g. "cls" of a model without a cls token)."""
  count = float(sums["count"])
  if count < 2:
    raise ClmimError(f"cka: needs at least 2 images (CKA centres over images); got {count:g}.")
  # The kinds partial_sums computed: those asked for that the model has.
  kinds = tuple(k for k in feature_kinds(options) if f"sum_{k}" in sums)
  if not kinds:
    raise ClmimError("cka: no feature was computed (a cls-only run on a model without a cls "
                     "token).")
  num = np.asarray(sums[f"sum_{kinds[0]}"]).shape[0]
  stages = chosen_stages(options, num)
  out = {f"cka{u}_{k}": None for k in KINDS for u in ("", "_unbiased")}
  for kind in kinds:
    values = pair_cka(sums[f"moment_{kind}"], sums[f"sum_{kind}"], count,
                      _pairs_of(kind, kinds, num, options))
    out[f"cka_{kind}"] = [[values[min(i, j), max(i, j)] for j in stages] for i in stages]
    constant = {i for (i, j), value in values.items() if i == j and np.isnan(value)}
    unbiased = unbiased_pair_cka(sums, kind, count, _pairs_of(kind, kinds, num, options),
                                 constant)
    out[f"cka_unbiased_{kind}"] = [[unbiased[min(i, j), max(i, j)] for j in stages]
                                   for i in stages]
    if kind == kinds[0]:
      out["cka_adjacent"] = [values[b - 1, b] for b in range(1, num)]
  return out


def models_with(results, key):
  return [n for n, v in (results.get("models") or {}).items()
          if isinstance(v, dict) and v.get(key) is not None and len(v[key]) > 0]


def figures(results, options) -> dict:
  """cka.png: one heatmap per model and feature kind (the shared depth-curve figure draws
  cka_adjacent.png)."""
  kinds = [k for k in KINDS if models_with(results, f"cka_{k}")]
  names = [n for n in (results.get("models") or {}) if any(
      n in models_with(results, f"cka_{k}") for k in kinds)]
  if not names:
    return {}
  styles = plots.model_styles(results, names)
  fig = Figure(figsize=(3.2 * len(names) + 0.8, 3.2 * len(kinds)), layout="constrained")
  axes = np.asarray(fig.subplots(len(kinds), len(names), squeeze=False))
  image = None
  for r, kind in enumerate(kinds):
    for c, name in enumerate(names):
      ax = axes[r, c]
      values = results["models"][name].get(f"cka_{kind}")
      if values is None:
        ax.axis("off")
        continue
      matrix = np.asarray(values, np.float64)
      labels = chosen_stages(options) or list(range(len(matrix)))
      image = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma", origin="lower")
      ticks = range(0, len(labels), max(1, len(labels) // 6))
      ax.set_xticks(list(ticks), [str(labels[t]) for t in ticks], fontsize=8)
      ax.set_yticks(list(ticks), [str(labels[t]) for t in ticks], fontsize=8)
      ax.set_title(f"{styles[name]['label']}\n{kind.replace('_', ' ')}", fontsize=10,
                   color=styles[name]["color"])
      ax.set_xlabel("stage", fontsize=9)
      if c == 0:
        ax.set_ylabel("stage", fontsize=9)
  if image is not None:
    fig.colorbar(image, ax=axes, shrink=0.8, label="linear CKA")
  return {"cka.png": fig}


def between_models(runs, options: dict, session):
  """The between-models hook (core.py): CKA and mutual k-NN between the stages of every two
  trained models of `runs` ([(model, images)]), streamed by the run's `session`; None when the
  between_models option is off."""
  if not options.get("between_models"):
    return None
  from clmim.analysis import between_models as pairs  # it streams through this module
  return pairs.cka_between_models(runs, options, session)


def between_models_figure(value) -> Figure | None:
  """One heatmap per computed pair of `between_models`' value (None: no pair computed)."""
  from clmim.analysis import between_models as pairs
  return pairs.figure(value or {})
