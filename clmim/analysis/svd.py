"""SVD view of the patch tokens: how many directions they use, and how attention moves them.

Definitions (docs/analyses/svd.md). Z is one image's patch-token matrix [N, D] of one state of
`zs` (`batch.layout`: cls and register tokens dropped; patches only, so every value is the
same on every token layout), centred over its tokens by default (option `centre`), as the paper's
authors describe their SVD (of the tokens' covariance, whose eigenvalues are s^2 / N of the
centred Z); `centre=False` keeps the mean token, which then shows as a large first singular
value (a shift of the whole token cloud).
  singular_values [state][rank]: s / sum(s) of Z's singular values (the full min(N, D)
    spectrum sums to 1; the first `max_rank` are kept), averaged over images.
  effective_rank [state]: exp(-sum_k p_k log p_k), p = s / sum(s) (Roy & Vetterli, 2007),
    averaged over images.
  token_shift_ratio [block]: with d_n = (after attention)_n - (block input)_n per patch token,
    |mean_n d_n| / mean_n |d_n| (1: all tokens move by one vector; ~1/sqrt(N): independent
    moves), averaged over all images.
  svd_projection [image][2][N][3]: for the chosen images and block, the block input ("before")
    and the after-attention state ("after"), projected on the top-3 right singular vectors of
    the stacked [before; after] matrix (2N x D), float64 on the host.
  svd_shift_ratio [image]: token_shift_ratio of those images at that block.

Options (config.analysis_options.svd.<option>):
  max_rank: int >= 1, spectrum entries kept (32).
  images: stream positions of the images to project ((0,)).
  block: 1-based block whose attention branch is projected, or "last" ("last").
  centre: bool, subtract each image's mean patch token before the spectra (True).
  method: how the singular values are computed ("exact"): "exact" = an SVD of Z (on NVIDIA
    GPUs cuSOLVER's polar-decomposition SVD); "gram" = |Z^T v| for the eigenvectors v of the
    smaller Gram matrix (Z Z^T or Z^T Z, full float32 matmuls), ~26x faster than "exact" on
    an H100 and slightly less accurate (docs/analyses/svd.md, "Speed and accuracy").
"""
import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy
import numpy as np
from matplotlib.figure import Figure

from clmim.analysis import core, plots
from clmim.analysis.common import weighted_sum
from clmim.errors import ClmimError

NAME = "svd"
# The chosen images' tokens are not resampled by the bootstrap (clmim.analysis.bootstrap).
FIXED_SUMS = ("before", "after", "found")
OPTIONS = {"max_rank": 32, "images": (0,), "block": "last", "centre": True, "method": "exact"}
METHODS = ("exact", "gram")


def _stages(values):
  """[state] -> [stage]: the embedding output and each block's output (even states)."""
  return list(values)[0::2]


def _as_list(values):
  return list(values)


RESULTS = (
    core.Result(key="singular_values", label="normalised singular value", layout="[state][rank]",
                x=None, series=None, title="Singular value spectrum of the patch tokens",
                description="singular values of an image's patch-token matrix, summing to 1"),
    core.Result(key="effective_rank", label="effective rank", layout="[state]", x="stage",
                series=_stages, cl_direction="lower", title="Effective rank of the patch tokens",
                description="exp(entropy) of the normalised singular values: directions used"),
    core.Result(key="token_shift_ratio", label="shift ratio |mean d| / mean |d|",
                layout="[block]", series=_as_list, cl_direction="higher",
                title="How together attention moves the tokens",
                description="1 = the attention branch moves all tokens of an image together"),
    core.Result(key="svd_projection", label="projection on the top-3 singular vectors",
                layout="[image][before, after][token][3]", x=None, series=None),
    core.Result(key="svd_shift_ratio", label="shift ratio of the projected images",
                layout="[image]", x=None, series=None, cl_direction="higher",
                description="token_shift_ratio of the images of svd_projection"),
)
_BY_KEY = {r.key: r for r in RESULTS}


def _bad(option, expected, value):
  return ClmimError(f"config.analysis_options.{NAME}.{option}: expected {expected}, got "
                    f"{value!r}.")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _images(options) -> tuple:
  value = options["images"]
  images = (value,) if _is_int(value) else value
  if (not isinstance(images, (tuple, list)) or not images
      or not all(_is_int(i) and i >= 0 for i in images) or len(set(images)) != len(images)):
    raise _bad("images", "a non-empty tuple of distinct stream positions >= 0", value)
  return tuple(int(i) for i in images)


def _block(options, depth: int) -> int:
  """The 0-based block of option `block` (1-based in the config) of a depth-`depth` model."""
  value = options["block"]
  if value == "last":
    return depth - 1
  if not _is_int(value) or not 1 <= value <= depth:
    raise _bad("block", f"'last' or a block number 1..{depth}", value)
  return int(value) - 1


def _validate(options, depth: int):
  """All options checked; returns (max_rank, images, 0-based block)."""
  rank = options["max_rank"]
  if not _is_int(rank) or rank < 1:
    raise _bad("max_rank", "an int >= 1", rank)
  if not isinstance(options["centre"], (bool, np.bool_)):
    raise _bad("centre", "True or False", options["centre"])
  if options["method"] not in METHODS:
    raise _bad("method", f"one of {METHODS}", options["method"])
  return int(rank), _images(options), _block(options, depth)


def check(model, options: dict) -> None:
  """Rejects bad options before any compute (the block must exist in `vit`)."""
  vit = getattr(model, "vit", model)  # the registry Model, or a bare ViT
  _validate(options, vit.depth)


def shift_ratio(before, after):
  """|mean_n d_n| / mean_n |d_n| of d = after - before over axis -2 (tokens); 0 if nothing
  moves. Works on jnp and np arrays alike."""
  xp = np if isinstance(before, np.ndarray) else jnp
  d = after - before
  together = xp.sqrt(xp.sum(xp.mean(d, axis=-2) ** 2, axis=-1))
  apart = xp.mean(xp.sqrt(xp.sum(d * d, axis=-1)), axis=-1)
  return xp.where(apart > 0, together / xp.where(apart > 0, apart, 1), 0)


def _exact(z):
  """[..., N, D] -> [..., min(N, D)] singular values, descending (the backend's default SVD)."""
  return jnp.linalg.svd(z, compute_uv=False)


def _exact_polar(z):
  # On NVIDIA GPUs JAX's default SVD is cuSOLVER's Jacobi one (gesvdj); the polar-decomposition
  # one (gesvdp) took 68 instead of 96 ms for 16 ViT-B/16 token matrices on an H100 and came
  # 60x closer to float64 (benchmarks/analysis_profile.py).
  return jax.lax.linalg.svd(z, full_matrices=False, compute_uv=False,
                            algorithm=jax.lax.linalg.SvdAlgorithm.POLAR)


def _gram_one(z):
  """[N, D] -> [min(N, D)] singular values from the eigenvectors of the smaller Gram matrix.

  sigma_k = |Z^T v_k| for the unit eigenvectors v_k of Z Z^T (or |Z u_k| for those of Z^T Z):
  the norms, unlike the square roots of the eigenvalues, keep small singular values accurate to
  about eps * sigma_max^2 / sigma_j instead of sqrt(eps) * sigma_max. Matmuls at full float32
  precision: a GPU's default (TF32) would cost three decimal digits.
  """
  rows = z if z.shape[0] <= z.shape[1] else z.T
  gram = jnp.matmul(rows, rows.T, precision=jax.lax.Precision.HIGHEST)
  _, vectors = jnp.linalg.eigh(gram)
  norms = jnp.linalg.norm(jnp.matmul(vectors.T, rows, precision=jax.lax.Precision.HIGHEST),
                          axis=-1)
  return jnp.sort(norms)[::-1]


def singular_values(z, method: str = "exact"):
  """[B, N, D] -> [B, min(N, D)] singular values of each matrix, descending; `method` as the
  option of that name ("exact" or "gram")."""
  if method == "gram":
    one, batched, cuda = _gram_one, jax.vmap(_gram_one), jax.vmap(_gram_one)
  else:
    one, batched, cuda = _exact, _exact, _exact_polar
  # On CPU, jaxlib's batched decompositions spread the batch over the thread pool that also runs
  # the other (virtual) devices' programs; with several CPU devices stuck in a collective they
  # can wait forever for a free thread. One matrix per call runs inline: same numbers.
  return jax.lax.platform_dependent(z, cpu=lambda z: jax.lax.map(one, z), cuda=cuda,
                                    default=batched)


def spectrum(z, centre: bool = False, method: str = "exact"):
  """[B, N, D] token matrices -> ([B, min(N, D)] singular values / their sum, [B] effective
  rank). A zero matrix gives zeros and effective rank 0."""
  z = z.astype(jnp.float32)
  if centre:
    z = z - jnp.mean(z, axis=1, keepdims=True)
  s = singular_values(z, method)
  total = jnp.sum(s, axis=-1, keepdims=True)
  p = s / jnp.where(total > 0, total, 1)
  erank = jnp.where(total[:, 0] > 0, jnp.exp(-jnp.sum(xlogy(p, p), axis=-1)), 0)
  return p, erank


def _select(values, index, chosen):
  """[K, ...] the rows of `values` whose stream position is chosen[k] (zeros if absent): an
  exact one-hot sum, so the devices' psum adds only zeros to each image's own values."""
  return jnp.stack([jnp.sum(jnp.where((index == c).reshape((-1,) + (1,) * (values.ndim - 1)),
                                      values, 0), axis=0) for c in chosen])


def partial_sums(batch: core.Batch, options: dict):
  """Per-device sums: spectra and effective ranks of every state, shift ratios of every block,
  and the chosen images' tokens before/after the chosen block's attention branch."""
  weights, index = batch.weights, batch.index
  zs = [batch.layout.patches(z) for z in batch.zs]  # [B, N, D] each
  depth = (len(zs) - 1) // 2
  rank, images, block = _validate(options, depth)
  values, eranks, shifts = [], [], []
  for z in zs:
    p, erank = spectrum(z, options["centre"], options["method"])
    values.append(weighted_sum(p[:, :rank], weights))
    eranks.append(weighted_sum(erank, weights))
  for b in range(depth):
    before = zs[2 * b].astype(jnp.float32)
    shifts.append(weighted_sum(shift_ratio(before, zs[2 * b + 1].astype(jnp.float32)),
                               weights))
  chosen = jnp.asarray(images, jnp.int32)
  return {
      "singular_values_sum": jnp.stack(values), "effective_rank_sum": jnp.stack(eranks),
      "shift_ratio_sum": jnp.stack(shifts),
      "before": _select(zs[2 * block].astype(jnp.float32), index, images),
      "after": _select(zs[2 * block + 1].astype(jnp.float32), index, images),
      "found": jnp.sum((index[:, None] == chosen[None]).astype(jnp.float32), axis=0),
  }


def projection(before, after):
  """[N, D] tokens before and after -> [2, N, 3] coordinates on the top-3 right singular
  vectors of [before; after] (float64), each vector's sign set so its largest entry is > 0."""
  stacked = np.concatenate([before, after]).astype(np.float64)
  _, _, vt = np.linalg.svd(stacked, full_matrices=False)
  top = vt[:3]
  # Singular vectors are defined up to sign; fixing it keeps figures comparable between runs.
  signs = np.sign(top[np.arange(len(top)), np.abs(top).argmax(axis=1)])
  coords = stacked @ (top * signs[:, None]).T
  return coords.reshape(2, len(before), -1)


def finalize(sums: dict, options: dict):
  """Divides by the image count and projects the chosen images (see the module doc)."""
  count = float(sums["count"])
  if count <= 0:
    raise ClmimError("svd: no images were analysed (total weight is 0).")
  images = _images(options)
  found = np.asarray(sums["found"])
  missing = [i for i, f in zip(images, found) if f != 1]
  if missing:
    raise _bad("images", f"stream positions of the {int(count)} images analysed", missing[0])
  before = np.asarray(sums["before"], np.float64)
  after = np.asarray(sums["after"], np.float64)
  return {
      "singular_values": (np.asarray(sums["singular_values_sum"], np.float64) / count).tolist(),
      "effective_rank": (np.asarray(sums["effective_rank_sum"], np.float64) / count).tolist(),
      "token_shift_ratio": (np.asarray(sums["shift_ratio_sum"], np.float64) / count).tolist(),
      "svd_projection": [projection(b, a).tolist() for b, a in zip(before, after)],
      "svd_shift_ratio": [float(shift_ratio(b, a)) for b, a in zip(before, after)],
  }


def models_with(results: dict, key: str) -> list:
  """Names of the models of a results.json dict that have values under `key`, in order."""
  return [name for name, values in (results.get("models") or {}).items()
          if isinstance(values, dict) and values.get(key) is not None]


def _finish(ax, xlabel, ylabel, title):
  ax.set_xlabel(xlabel, fontsize=10)
  ax.set_ylabel(ylabel, fontsize=10)
  ax.set_title(title, fontsize=11)
  ax.grid(alpha=0.25, linewidth=0.6)
  # Outside the axes: with several models an inside legend always hides some curve. Handles
  # as plots draws them: a dashed (untrained) curve's handle reads dashed.
  plots.add_legend(ax, fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _spectrum_figure(results, names, styles) -> Figure:
  fig = Figure(figsize=(5.2, 3.8))
  ax = fig.add_subplot()
  for name in names:
    values = np.asarray(results["models"][name]["singular_values"][-1], np.float64)
    ax.semilogy(np.arange(1, len(values) + 1), values, linewidth=1.8, color=styles[name]["color"],
                linestyle=styles[name]["linestyle"], label=styles[name]["label"])
  _finish(ax, "Rank", "Singular value / sum", "Patch-token spectrum, last block's output")
  return fig


def _rank_figure(results, names, styles) -> Figure:
  fig = Figure(figsize=(5.2, 3.8))
  ax = fig.add_subplot()
  for name in names:
    values = np.asarray(results["models"][name]["effective_rank"], np.float64)
    # State 2i+1 is block i+1's after-attention state: half a block past the previous output.
    ax.plot(np.arange(len(values)) / 2, values, marker="o", markersize=3, linewidth=1.8,
            color=styles[name]["color"], linestyle=styles[name]["linestyle"],
            label=styles[name]["label"])
  _finish(ax, "Depth (0 = embedding, .5 = after attention)", "Effective rank",
          "Effective rank of the patch tokens")
  return fig


def _projection_figure(results, names, styles, options) -> Figure:
  images = _images(options)
  fig = Figure(figsize=(3.6 * len(names), 3.4 * len(images)))
  for col, name in enumerate(names):
    model = results["models"][name]
    # Untrained models are grey: their "after" tokens are drawn dark, the "before" ones hollow.
    after_colour = "#3a3a3a" if plots.family(results, name) == "random" else styles[name]["color"]
    for row, (coords, ratio) in enumerate(zip(model["svd_projection"], model["svd_shift_ratio"])):
      before, after = np.asarray(coords, np.float64)
      ax = fig.add_subplot(len(images), len(names), row * len(names) + col + 1, projection="3d")
      ax.scatter(*before.T, s=6, facecolors="none", edgecolors="#9a9a9a", linewidths=0.6,
                 label="before attention")
      ax.scatter(*after.T, s=6, color=after_colour, label="after attention")
      ax.quiver(*before.T, *(after - before).T, color=after_colour, alpha=0.3, linewidth=0.5,
                arrow_length_ratio=0.1)
      ax.set_title(f"{name}\nimage {images[row]}, shift ratio {ratio:.2f}", fontsize=8)
      ax.tick_params(labelsize=6)
      for axis, label in zip("xyz", ("v1", "v2", "v3")):
        getattr(ax, f"set_{axis}label")(label, fontsize=7, labelpad=-2)
      if row == 0 and col == 0:
        ax.legend(fontsize=7, loc="upper left")
  block = options["block"]
  fig.suptitle("Patch tokens before and after the attention branch of "
               + ("the last block" if block == "last" else f"block {block}")
               + " (top-3 right singular vectors of both)", fontsize=9)
  # Room above the panels' own two-line titles, so the suptitle does not run into them.
  fig.subplots_adjust(top=0.8)
  return fig


def figures(results: dict, options: dict) -> dict:
  """svd_spectrum.png, effective_rank.png (replacing the shared curve: it adds the
  after-attention states at half steps), token_shift_ratio.png and svd_projection.png."""
  options = {**OPTIONS, **options}
  names = models_with(results, "effective_rank")
  if not names:
    return {}
  styles = plots.model_styles(results, names)
  return {
      "svd_spectrum.png": _spectrum_figure(results, names, styles),
      "effective_rank.png": _rank_figure(results, names, styles),
      "token_shift_ratio.png": plots.curve_figure(results, _BY_KEY["token_shift_ratio"]),
      "svd_projection.png": _projection_figure(results, names, styles, options),
  }
