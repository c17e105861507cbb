"""Patch tokens of a few chosen images: do they cluster by image? k-NN accuracy and t-SNE.

Definition (docs/analyses/tsne.md): the chosen images are stream positions (option `images`: a
tuple of positions, default 0 .. 17, or an int n = the first n; analyses never see labels, so
the paper's "6 images from each of 3 classes" becomes "the first 18 images" unless chosen).
Their patch tokens (cls and register tokens removed, `Batch.layout`; option
`max_tokens_per_image` > 0 keeps that many, evenly spaced in row-major order) are gathered exactly
once each, whatever the batching, by matching `Batch.index` against the chosen positions. Only
patch tokens are read, so a model with registers or without a cls token is analysed the same way.

Results:
  "tsne_knn_image_accuracy": [stage] leave-one-out k-NN accuracy (option `k`, default 5) of the
    image id, cosine distance between the original tokens, at every stage (embedding output and
    each block's output). Chance is 1 / number of images. High = tokens cluster by image.
  "tsne_knn_image_accuracy_state": the same on the state that t-SNE embeds (option `state`:
    "official" (default) = the official notebook's zs[10] of a 12-block ViT-B, i.e. the output
    of block 5 of 12, at the same relative depth for other depths: the output of block
    max(1, round-half-up(5 * depth / 12)), zs[2 * that]; "last" = the last block's output; or
    an index into zs, also as a string "5").
  "tsne_knn_image_accuracy_2d": the same in the 2-D t-SNE embedding (Euclidean distance).
  "tsne_embedding": [image][token][2] t-SNE coordinates from scikit-learn's TSNE (perplexity
    20, random init, 1000 iterations: options `perplexity`, `iterations` (>= 250), `seed`).
  "tsne_images": the stream positions embedded (chosen positions past the stream's end are
    left out).
"""
import importlib.util

import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from clmim.analysis import core, plots
from clmim.errors import ClmimError

NAME = "tsne"
# Its statistics are computed on a few chosen images, not averaged over the stream: no
# bootstrap interval over images (clmim.analysis.bootstrap).
BOOTSTRAP = False
OPTIONS = {"state": "official", "images": tuple(range(18)), "max_tokens_per_image": 0, "k": 5,
           "seed": 0, "iterations": 1000, "perplexity": 20.0}

# The pip requirement named when scikit-learn is missing (the pin of requirements.txt).
SKLEARN_REQUIREMENT = "scikit-learn==1.9.1"
_INSTALL = ("tsne: the t-SNE analysis needs scikit-learn, which is not installed: "
            f"pip install {SKLEARN_REQUIREMENT}")


def _sklearn_installed() -> bool:
  """Whether scikit-learn can be imported, found without importing it (that takes a second)."""
  try:
    return importlib.util.find_spec("sklearn") is not None
  except (ImportError, ValueError):  # a broken or blocked install counts as missing
    return False


def _chance(results, *unused):
  """1 / number of embedded images (reads any model's "tsne_images")."""
  del unused
  by_model = results.get("models", results) if isinstance(results, dict) else {}
  for values in by_model.values():
    if isinstance(values, dict) and values.get("tsne_images"):
      return 1.0 / len(values["tsne_images"])
  return None


def _as_curve(values):
  """The curve of "tsne_knn_image_accuracy": its values as they are, one per stage."""
  return np.asarray(values, np.float64).tolist()


def models_with(results, key):
  return [n for n, v in (results.get("models") or {}).items()
          if isinstance(v, dict) and v.get(key) is not None and len(v[key]) > 0]


RESULTS = (
    core.Result("tsne_knn_image_accuracy", "k-NN image accuracy (tokens)", "[stage]",
                x="stage", series=_as_curve, reference=_chance, cl_direction="higher",
                description="leave-one-out k-NN accuracy of a token's image (cosine)",
                title="Do tokens cluster by image?", reference_label="chance"),
    core.Result("tsne_knn_image_accuracy_state", "k-NN image accuracy (t-SNE state)", "[]",
                x=None, series=None),
    core.Result("tsne_knn_image_accuracy_2d", "k-NN image accuracy (2-D t-SNE)", "[]", x=None,
                series=None),
    core.Result("tsne_embedding", "t-SNE coordinates", "[image][token][2]", x=None,
                series=None),
    core.Result("tsne_images", "stream positions embedded", "[image]", x=None, series=None),
)


def chosen_images(options) -> np.ndarray:
  """The stream positions of option `images` (int n -> 0 .. n-1, or a tuple), int32."""
  given = options["images"]
  try:
    if isinstance(given, (int, np.integer)) and not isinstance(given, bool):
      positions = list(range(int(given)))
    else:
      parts = given.split(",") if isinstance(given, str) else list(given)
      positions = [int(p) for p in parts]
  except (TypeError, ValueError) as e:
    raise ClmimError(f"config.analysis_options.tsne.images: expected a count or stream "
                     f"positions; got {given!r}.") from e
  if len(positions) < 2 or min(positions) < 0 or len(set(positions)) != len(positions):
    raise ClmimError(f"config.analysis_options.tsne.images: expected at least 2 distinct "
                     f"stream positions >= 0; got {given!r}.")
  return np.asarray(positions, np.int32)


# The official notebook embeds zs[10] of ViT-B/16: the output of block 5 of 12.
OFFICIAL_BLOCK, OFFICIAL_DEPTH = 5, 12


def official_block(depth: int) -> int:
  """The block whose output sits at the official state's relative depth (5 of 12)."""
  return max(1, int(np.floor(OFFICIAL_BLOCK * depth / OFFICIAL_DEPTH + 0.5)))


def state_index(options, num_states: int) -> int:
  """The zs index of option `state` ("official", "last" or an int, negative counting from
  the end)."""
  state = options["state"]
  if state == "last":
    return num_states - 1
  if state == "official":
    return 2 * official_block((num_states - 1) // 2)
  if isinstance(state, str) and state.strip().lstrip("-").isdigit():
    state = int(state)  # a config string field set from the command line
  if isinstance(state, (int, np.integer)) and not isinstance(state, bool) \
      and -num_states <= state < num_states:
    return int(state) % num_states
  raise ClmimError(f"config.analysis_options.tsne.state: expected 'official', 'last' or an "
                   f"index into the "
                   f"{num_states} states zs; got {state!r}.")


def token_indices(num_tokens: int, keep: int) -> np.ndarray:
  """Which patch tokens to keep: all (keep <= 0 or >= N), else `keep` evenly spaced ones."""
  if keep <= 0 or keep >= num_tokens:
    return np.arange(num_tokens)
  return np.unique(np.linspace(0, num_tokens - 1, keep).round().astype(np.int64))


def check(model, options) -> None:
  """Raises ClmimError before any compute: scikit-learn missing or options out of range."""
  vit = getattr(model, "vit", model)  # the registry Model, or a bare ViT
  if not _sklearn_installed():  # here, not in finalize: after the compute would be too late
    raise ClmimError(_INSTALL)
  chosen_images(options)
  state_index(options, 2 * vit.depth + 1)
  if int(options["k"]) < 1 or int(options["iterations"]) < 250 \
      or float(options["perplexity"]) <= 0:
    raise ClmimError(f"config.analysis_options.tsne: need k >= 1, iterations >= 250 (scikit-learn"
                     f"'s minimum) and perplexity > 0; got k={options['k']}, iterations="
                     f"{options['iterations']}, perplexity={options['perplexity']}.")


def partial_sums(batch: core.Batch, options) -> dict:
  """The chosen images' patch tokens where this device holds them, zeros elsewhere.

  Returns:
    {"found": [C] (1 where this device holds chosen image c), "state_tokens": [C, N', D],
     "stage_tokens": [S, C, N', D]}; the sum over devices and steps holds each token once.
  """
  chosen = chosen_images(options)
  state = state_index(options, len(batch.zs))
  layout = batch.layout
  keep = token_indices(layout.num_patches(batch.zs[0].shape[1]),
                       int(options["max_tokens_per_image"]))
  match = (batch.index[:, None] == chosen[None, :]) & (batch.weights[:, None] > 0)  # [b, C]
  found = jnp.any(match, axis=0)
  row = jnp.argmax(match, axis=0)  # the batch row of each chosen image (0 when absent)

  def gather(z):
    # A gather, not a one-hot matmul: the tokens come through bit-exact, and adding the other
    # devices' zeros leaves them so.
    tokens = layout.patches(z)[:, keep].astype(jnp.float32)[row]
    return jnp.where(found[:, None, None], tokens, 0)

  return {"found": found.astype(jnp.float32), "state_tokens": gather(batch.zs[state]),
          "stage_tokens": jnp.stack([gather(z) for z in batch.zs[0::2]])}


def knn_accuracy(points, labels, k: int, metric: str = "cosine", chunk: int = 2048) -> float:
  """Leave-one-out k-NN accuracy of `labels` [M] from `points` [M, F], float64.

  Votes are counted over the k nearest other points; a tie goes to the tied label met first in
  order of distance. Cosine distance treats a zero vector as orthogonal to everything.
  """
  x = np.asarray(points, np.float64)
  labels = np.asarray(labels)
  m = len(x)
  if not 1 <= k < m:
    raise ClmimError(f"tsne: k-NN needs 1 <= k < number of tokens ({m}); got k={k}.")
  if metric == "cosine":
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
  sq = (x * x).sum(1)
  correct = 0
  for start in range(0, m, chunk):  # rows in chunks: the full [M, M] matrix may be large
    q = x[start:start + chunk]
    dist = (1 - q @ x.T if metric == "cosine"
            else sq[start:start + chunk, None] + sq[None, :] - 2 * q @ x.T)
    dist[np.arange(len(q)), np.arange(start, start + len(q))] = np.inf  # leave one out
    nn = np.argpartition(dist, k - 1, axis=1)[:, :k]
    nn = np.take_along_axis(nn, np.argsort(np.take_along_axis(dist, nn, 1), 1, kind="stable"),
                            1)
    votes = labels[nn]  # [q, k], nearest first
    counts = (votes[:, :, None] == votes[:, None, :]).sum(-1)  # votes for each neighbour's label
    winner = votes[np.arange(len(q)), np.argmax(counts, axis=1)]  # argmax: first of the best
    correct += int((winner == labels[start:start + len(q)]).sum())
  return correct / m


def embed(tokens, options) -> np.ndarray:
  """[M, D] -> [M, 2] with scikit-learn's TSNE (the paper's recipe, options as documented)."""
  try:
    from sklearn.manifold import TSNE
  except ImportError as e:
    raise ClmimError(_INSTALL) from e
  perplexity = float(options["perplexity"])
  if perplexity >= len(tokens):
    raise ClmimError(f"tsne: perplexity {perplexity:g} must be below the number of tokens "
                     f"({len(tokens)}).")
  tsne = TSNE(n_components=2, perplexity=perplexity, init="random",
              max_iter=int(options["iterations"]), random_state=int(options["seed"]))
  return tsne.fit_transform(np.asarray(tokens, np.float64))


def finalize(sums, options) -> dict:
  """k-NN image accuracies, the t-SNE embedding and the images used (see the module doc)."""
  found = np.asarray(sums["found"], np.float64)
  if np.any(found > 1.5):
    raise ClmimError("tsne: a chosen image was seen more than once (duplicate stream index).")
  kept = found > 0.5
  chosen = chosen_images(options)
  if kept.sum() < 2:
    raise ClmimError(f"tsne: needs at least 2 of the chosen images {chosen.tolist()}; the stream "
                     f"held {int(kept.sum())} of them.")
  state = np.asarray(sums["state_tokens"], np.float64)[kept]  # [C, N', D]
  stages = np.asarray(sums["stage_tokens"], np.float64)[:, kept]  # [S, C, N', D]
  c, n, d = state.shape
  labels = np.repeat(np.arange(c), n)
  k = int(options["k"])
  curve = [knn_accuracy(s.reshape(c * n, d), labels, k) for s in stages]
  coords = embed(state.reshape(c * n, d), options)
  return {
      "tsne_knn_image_accuracy": curve,
      "tsne_knn_image_accuracy_state": knn_accuracy(state.reshape(c * n, d), labels, k),
      "tsne_knn_image_accuracy_2d": knn_accuracy(coords, labels, k, metric="euclidean"),
      "tsne_embedding": coords.reshape(c, n, 2).tolist(),
      "tsne_images": chosen[kept].tolist(),
  }


def figures(results, options) -> dict:
  """tsne.png: the 2-D embedding per model, one colour per image, and under the panels a strip
  that says which colour is which image (its stream position); the shared depth-curve figure
  draws tsne_knn_image_accuracy.png."""
  del options
  names = models_with(results, "tsne_embedding")
  if not names:
    return {}
  styles = plots.model_styles(results, names)
  fig = Figure(figsize=(3.4 * len(names), 4.3), layout="constrained")
  panels, strip = fig.subfigures(2, 1, height_ratios=[3.6, 0.7])
  count = 0
  for ax, name in zip(panels.subplots(1, len(names), squeeze=False)[0], names):
    coords = np.asarray(results["models"][name]["tsne_embedding"], np.float64)
    colours = _image_colours(len(coords))
    count = max(count, len(coords))
    for i, points in enumerate(coords):
      ax.scatter(points[:, 0], points[:, 1], s=3, color=colours[i], linewidths=0)
    acc = results["models"][name].get("tsne_knn_image_accuracy_2d")
    extra = f"\n2-D k-NN image accuracy {float(acc):.2f}" if acc is not None else ""
    ax.set_title(styles[name]["label"] + extra, fontsize=10, color=styles[name]["color"])
    ax.set_xticks([])
    ax.set_yticks([])
  _colour_key(strip, _shown_positions(results, names, count))
  return {"tsne.png": fig}


def _shown_positions(results, names, count) -> list:
  """The stream positions of the embedded images (0 .. count-1 when not recorded)."""
  for name in names:
    shown = results["models"][name].get("tsne_images")
    if shown and len(shown) == count:
      return [int(i) for i in shown]
  return list(range(count))


def _colour_key(figure, positions) -> None:
  """A strip of one cell per image in its colour, labelled with its stream position: points
  are tokens, coloured by the image they come from (colours repeat after 20 images)."""
  ax = figure.subplots()
  colours = np.asarray(_image_colours(len(positions)))[None, :, :3]
  ax.imshow(colours, aspect="auto", interpolation="nearest")
  ax.set_xticks(range(len(positions)), [str(p) for p in positions], fontsize=7)
  ax.set_yticks([])
  ax.set_xlabel("point colour = the image its token comes from (stream position)", fontsize=8)


def _image_colours(count: int) -> list:
  """`count` distinct colours for images (tab20, cycling)."""
  from matplotlib import colormaps
  cmap = colormaps["tab20"]
  return [cmap(i % 20) for i in range(count)]
