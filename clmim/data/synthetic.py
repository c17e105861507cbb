"""Procedural "shapes x textures" images: a dataset that needs no download.

Each image is a shape (low-frequency, global cue) filled with a texture (high-frequency, local
cue) on a smooth background. That makes the paper's question answerable in miniature: a
shape-biased (contrastive) model and a texture-biased (masked-modeling) model should differ in
how far they attend and which frequencies they keep.

Everything is a pure function of (seed, split, index), so any image can be regenerated at any
resolution, in any order, by any process. Geometry and texture periods are fractions of the
image side, so a 224 px image shows the same scene as a 32 px one.

Splits:
- "train", "validation": shape and texture drawn independently ("independent" pairing) or
  tied, texture = shape ("aligned" pairing, for cue-conflict studies).
- "cue_conflict": the texture always disagrees with the aligned partner of the shape.

An image is its identity — shape, texture class and (version 2) its own outline — and its
appearance: background, pose, texture parameters and colours (FACTORS), drawn in that order.
Versions (VERSIONS; `version=`, config field `data.version`) never change once published:
- 1: the four shapes exactly; the data of the v1 demo models (default).
- 2: each instance's outline deformed by its own low harmonics (radius x (1 + sum a_k cos(k
  theta + phi_k)), k = 2, 3, 5), so that an instance can be told apart by its silhouette.
- 3: version 2 with the texture's two colours drawn as a dark one (channels < 0.4) and a light
  one (channels > 0.6): when a second view redraws the colours, the pattern keeps its grey-level
  sign (with version 2's free colours it may invert).
Second views for contrastive training (`training_stream`'s `second_view`): the object on another
image's background, the object with every appearance factor redrawn, with each factor redrawn
with probability 1/2, or with named factors redrawn ("redraw:background+colours"; the texture
class may be redrawn as well, "texture_class") (docs/miniature.md records what each did to MoCo
v3).
"""
from __future__ import annotations

import concurrent.futures
import copy
import multiprocessing
import signal
from typing import Iterator, Optional, Sequence

import numpy as np

from clmim.errors import ClmimError

SHAPES = ("disk", "square", "triangle", "cross")
TEXTURES = ("stripes", "checker", "dots", "grain")
SPLITS = {"train": 0, "validation": 1, "cue_conflict": 2}
PAIRINGS = ("independent", "aligned")
# What each version of the generator changed; every image of a version stays the same forever.
VERSIONS = {1: "the four shapes exactly (the data of the v1 demo models)",
            2: "every instance's outline deformed by its own low harmonics",
            3: "version 2 with a dark and a light texture colour: a pattern keeps its sign in "
               "grey whatever its hues"}
SECOND_VIEWS = ("", "background", "restyle", "partial", "redraw:<factor>+<factor>...")
_RESTYLE = 7  # stream ids of the restyled views' generators, apart from the images' own
_PARTIAL = 8
_RAMP = 9     # stream id of the choice between a pair's second view and the image itself
_CLASS = 10   # stream id of a redrawn view's texture class


# Per-instance geometry: the outline's radius is the family's, times 1 + sum_k a_k cos(k*theta +
# phi_k) for these harmonics, with a_k ~ U(0, amplitude). Small enough that a deformed disk never
# looks like a square or a triangle; large enough that every instance has an outline of its own.
_HARMONICS = ((2, 0.12), (3, 0.06), (5, 0.05))


def _family_radius(name: str, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
  """The unit-size shape's boundary distance from its centre along direction (cos, sin); every
  family is star-shaped around its centre."""
  c, s = np.abs(cos), np.abs(sin)
  tiny = 1e-6
  if name == "disk":
    return np.ones_like(cos)
  if name == "square":
    return 0.85 / np.maximum(np.maximum(c, s), tiny)
  if name == "triangle":  # equilateral, pointing up (y runs downwards), inradius 0.5
    normals = ((0.0, 1.0), (-0.866, -0.5), (0.866, -0.5))
    exits = [np.where(nx * cos + ny * sin > tiny, 0.5 / np.maximum(nx * cos + ny * sin, tiny),
                      np.inf) for nx, ny in normals]
    return np.min(np.stack(exits), axis=0)
  if name == "cross":  # two centred bars, half-length 1, half-width 0.35
    bar = 0.35
    horizontal = np.minimum(1.0 / np.maximum(c, tiny), bar / np.maximum(s, tiny))
    vertical = np.minimum(bar / np.maximum(c, tiny), 1.0 / np.maximum(s, tiny))
    return np.maximum(horizontal, vertical)
  raise ClmimError(f"Unknown shape {name!r}; expected one of {SHAPES}.")


def _draw_outline(rng: np.random.Generator) -> np.ndarray:
  """An instance's outline deformation: [len(_HARMONICS), 2] amplitudes and phases."""
  return np.array([(rng.uniform(0, amplitude), rng.uniform(0, 2 * np.pi))
                   for _, amplitude in _HARMONICS])


def _shape_distance(name: str, outline: Optional[np.ndarray], x: np.ndarray,
                    y: np.ndarray) -> np.ndarray:
  """Distance to the unit-size shape's outline (negative inside). Without an `outline` (version
  1) the shape's exact signed distance; with one, the radial distance to the deformed outline:
  within a factor cos(edge angle) of the Euclidean one, which only sharpens the anti-aliased
  edge a little."""
  if outline is None:
    return _exact_distance(name, x, y)
  radius = np.sqrt(x * x + y * y)
  theta = np.arctan2(y, x)
  deform = 1.0 + sum(a * np.cos(k * theta + phase)
                     for (k, _), (a, phase) in zip(_HARMONICS, outline))
  safe = np.maximum(radius, 1e-9)
  return radius - _family_radius(name, x / safe, y / safe) * deform


def _exact_distance(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Signed distance to the undeformed unit-size shape (negative inside)."""
  if name == "disk":
    return np.sqrt(x * x + y * y) - 1.0
  if name == "square":
    return np.maximum(np.abs(x), np.abs(y)) - 0.85
  if name == "triangle":  # equilateral, pointing up, centroid at the origin
    edges = [y - 0.5, -0.866 * x - 0.5 * y - 0.5, 0.866 * x - 0.5 * y - 0.5]
    return np.max(np.stack(edges), axis=0)
  if name == "cross":
    bar = 0.35
    horizontal = np.maximum(np.abs(x) - 1.0, np.abs(y) - bar)
    vertical = np.maximum(np.abs(x) - bar, np.abs(y) - 1.0)
    return np.minimum(horizontal, vertical)
  raise ClmimError(f"Unknown shape {name!r}; expected one of {SHAPES}.")


def _texture(name: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
             size: int) -> np.ndarray:
  """A binary-ish pattern in [0, 1]; x, y are in image units ([-1, 1] across the image)."""
  angle = rng.uniform(0, np.pi)
  u = x * np.cos(angle) + y * np.sin(angle)
  v = -x * np.sin(angle) + y * np.cos(angle)
  # Period of ~3-5 px at 32 px: a fraction of the image, so the scene is resolution-free.
  period = rng.uniform(0.19, 0.3)
  phase_u, phase_v = rng.uniform(0, period, size=2)
  if name == "stripes":
    return (np.mod(u + phase_u, period) < period / 2).astype(np.float32)
  if name == "checker":
    a = np.mod(u + phase_u, period) < period / 2
    b = np.mod(v + phase_v, period) < period / 2
    return (a ^ b).astype(np.float32)
  if name == "dots":
    du = np.mod(u + phase_u, period) - period / 2
    dv = np.mod(v + phase_v, period) - period / 2
    return (du * du + dv * dv < (0.3 * period) ** 2).astype(np.float32)
  if name == "grain":
    # Random blocks of about one 32px-pixel: the highest-frequency texture.
    cells = max(2, int(round(size / max(1, size // 32))))
    noise = rng.random((cells, cells)) < 0.5
    rows = np.clip(((y + 1) / 2 * cells).astype(int), 0, cells - 1)
    cols = np.clip(((x + 1) / 2 * cells).astype(int), 0, cells - 1)
    return noise[rows, cols].astype(np.float32)
  raise ClmimError(f"Unknown texture {name!r}; expected one of {TEXTURES}.")


def _random_colour(rng: np.random.Generator) -> np.ndarray:
  return rng.uniform(0.0, 1.0, size=3).astype(np.float32)


# An image's appearance, drawn in this order after its identity (shape, texture, outline): a view
# may redraw any of these factors from another generator (`render`'s `redraw`).
FACTORS = ("background", "pose", "texture", "colours")
# Part of the identity a view may redraw as well: the texture class (a second view then shares
# only what is left of the object — its silhouette, and its pose unless that is redrawn too).
TEXTURE_CLASS = "texture_class"
REDRAWABLE = FACTORS + (TEXTURE_CLASS,)


def _grid(image_size: int):
  """Pixel centres x (column), y (row, downwards) in [-1, 1] image units, and the pixel side."""
  pixel = 2.0 / image_size
  coords = (np.arange(image_size, dtype=np.float32) + 0.5) * pixel - 1.0
  x, y = np.meshgrid(coords, coords)
  return x, y, pixel


def _draw_background(rng: np.random.Generator, x, y) -> np.ndarray:
  """A smooth two-colour gradient [S, S, 3] (only low frequencies)."""
  direction = rng.uniform(0, 2 * np.pi)
  ramp = (x * np.cos(direction) + y * np.sin(direction) + 1.5) / 3.0
  bg0, bg1 = _random_colour(rng), _random_colour(rng)
  return bg0 * (1 - ramp[..., None]) + bg1 * ramp[..., None]


def _draw_pose(rng: np.random.Generator):
  """(scale, centre [2], rotation) of the shape's own frame in the image."""
  return rng.uniform(0.45, 0.7), rng.uniform(-0.25, 0.25, size=2), rng.uniform(-0.5, 0.5)


def _draw_colours(rng: np.random.Generator):
  """The texture's two colours, different enough for the texture to be visible."""
  fg0, fg1 = _random_colour(rng), _random_colour(rng)
  if np.abs(fg0 - fg1).sum() < 0.6:
    fg1 = 1.0 - fg0
  return fg0, fg1


def _draw_dark_light_colours(rng: np.random.Generator):
  """Version 3's texture colours: a dark one (every channel < 0.4) and a light one (every channel
  > 0.6), so that two renderings of one pattern with colours drawn anew share its grey-level
  structure, sign included (with unconstrained colours a redraw can invert it)."""
  return (rng.uniform(0.0, 0.4, size=3).astype(np.float32),
          rng.uniform(0.6, 1.0, size=3).astype(np.float32))


def _coverage(shape: str, outline: Optional[np.ndarray], pose, x, y, pixel) -> np.ndarray:
  """The share of each pixel [S, S] in [0, 1] the posed object covers (anti-aliased edge)."""
  scale, centre, rotation = pose
  sx, sy = x - centre[0], y - centre[1]
  lx = (sx * np.cos(rotation) + sy * np.sin(rotation)) / scale
  ly = (-sx * np.sin(rotation) + sy * np.cos(rotation)) / scale
  distance = _shape_distance(shape, outline, lx, ly) * scale
  return np.clip(0.5 - distance / pixel, 0.0, 1.0)


def render(shape: str, texture: str, outline: Optional[np.ndarray], rng: np.random.Generator,
           image_size: int, background: Optional[np.ndarray] = None,
           style: Optional[np.random.Generator] = None, redraw: Sequence[str] = (),
           dark_light: bool = False, texture_as: Optional[str] = None) -> np.ndarray:
  """One image [S, S, 3] float32 in [0, 1]: the `outline`-deformed `shape` filled with `texture`,
  its appearance (FACTORS: background, pose, texture parameters, colours) drawn from `rng`.

  `background` [S, S, 3] replaces the image's own. The factors named in `redraw` are drawn from
  `style` instead; `rng` still makes every draw, so the other factors stay the image's own.
  `texture_as` fills the object with that texture class instead (its parameters — angle, period,
  phases — drawn as for the image's own, from `style` when "texture" is redrawn).
  `dark_light` (version 3) draws the texture's colours as a dark and a light one.
  """
  x, y, pixel = _grid(image_size)

  def draw(factor, make):
    own = make(rng)
    return make(style) if factor in redraw else own

  own_background = draw("background", lambda r: _draw_background(r, x, y))
  coverage = _coverage(shape, outline, draw("pose", _draw_pose), x, y, pixel)
  # The texture parameters come from `style` when redrawn; a texture class of the view's own
  # (`texture_as`) without them takes the image's own parameters from a copy of `rng` made
  # before its texture draws. `rng` makes its own draws either way, so later factors stay put.
  before_texture = copy.deepcopy(rng) if texture_as is not None else None
  pattern = _texture(texture, x, y, rng, image_size)
  if "texture" in redraw or texture_as is not None:
    source = style if "texture" in redraw else before_texture
    pattern = _texture(texture if texture_as is None else texture_as, x, y, source, image_size)
  fg0, fg1 = draw("colours", _draw_dark_light_colours if dark_light else _draw_colours)
  background = own_background if background is None else background
  foreground = fg0 * pattern[..., None] + fg1 * (1 - pattern[..., None])
  image = background * (1 - coverage[..., None]) + foreground * coverage[..., None]
  return image.astype(np.float32)


def _layout(shape: str, outline: Optional[np.ndarray], rng: np.random.Generator, image_size: int):
  """(background [S, S, 3], object coverage [S, S]): the draws of an image that come before its
  texture, in the order `render` makes them."""
  x, y, pixel = _grid(image_size)
  background = _draw_background(rng, x, y)
  return background, _coverage(shape, outline, _draw_pose(rng), x, y, pixel)


class ShapesTextures:
  """Deterministic procedural dataset; `ds[i]` -> dict(image [S,S,3] in [0,1], shape, texture).

  Args:
    image_size: side in pixels (any size; the scene scales with it).
    split: "train", "validation" or "cue_conflict".
    num_images: length of the split.
    seed: dataset seed; (seed, split, index) fixes an image.
    shapes, textures: class names (subsets/orderings of SHAPES and TEXTURES).
    pairing: "independent" (shape and texture drawn independently) or "aligned"
      (texture index = shape index mod number of textures) for train/validation.
  """

  def __init__(self, image_size: int = 32, split: str = "validation", num_images: int = 512,
               seed: int = 0, shapes: Sequence[str] = SHAPES,
               textures: Sequence[str] = TEXTURES, pairing: str = "independent",
               version: int = 1):
    if version not in VERSIONS:
      raise ClmimError(f"Unknown synthetic data version {version!r}; expected one of "
                       f"{tuple(VERSIONS)} ({'; '.join(f'{k}: {v}' for k, v in VERSIONS.items())}).")
    if split not in SPLITS:
      raise ClmimError(f"Unknown synthetic split {split!r}; expected one of {sorted(SPLITS)}.")
    if pairing not in PAIRINGS:
      raise ClmimError(f"Unknown pairing {pairing!r}; expected one of {PAIRINGS}.")
    for name in shapes:
      if name not in SHAPES:
        raise ClmimError(f"Unknown shape {name!r}; expected some of {SHAPES}.")
    for name in textures:
      if name not in TEXTURES:
        raise ClmimError(f"Unknown texture {name!r}; expected some of {TEXTURES}.")
    if split == "cue_conflict" and len(textures) < 2:
      raise ClmimError("The cue_conflict split needs at least two textures.")
    if image_size < 8 or num_images < 1:
      raise ClmimError(f"Synthetic data needs image_size >= 8 and num_images >= 1, got "
                       f"{image_size} and {num_images}.")
    self.image_size, self.split, self.num_images, self.seed = image_size, split, num_images, seed
    self.shapes, self.textures, self.pairing = tuple(shapes), tuple(textures), pairing
    self.version = version

  def __len__(self) -> int:
    return self.num_images

  def labels(self, index: int) -> tuple[int, int, np.random.Generator]:
    """(shape id, texture id, the image's generator after the label draws)."""
    rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
    shape = int(rng.integers(len(self.shapes)))
    partner = shape % len(self.textures)
    if self.split == "cue_conflict":
      texture = (partner + 1 + int(rng.integers(len(self.textures) - 1))) % len(self.textures)
    elif self.pairing == "aligned":
      texture = partner
    else:
      texture = int(rng.integers(len(self.textures)))
    return shape, texture, rng

  def identity(self, index: int) -> tuple[int, int, np.ndarray, np.random.Generator]:
    """(shape id, texture id, outline, the generator after them): what makes image `index` the
    object it is. Everything drawn after (background, pose, colours, texture parameters) is its
    appearance."""
    shape, texture, rng = self.labels(index)
    return shape, texture, (_draw_outline(rng) if self.version >= 2 else None), rng

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_images:
      raise IndexError(index)
    identity = self.identity(index)
    return {"image": self._render(identity), "shape": identity[0], "texture": identity[1]}

  def _render(self, identity, **options) -> np.ndarray:
    """The image of `identity` (`self.identity(index)`) drawn by `render` with `options`
    (background, style, redraw) and this version's colour rule."""
    shape, texture, outline, rng = identity
    return render(self.shapes[shape], self.textures[texture], outline, rng, self.image_size,
                  dark_light=self.version >= 3, **options)

  def object_mask(self, index: int) -> np.ndarray:
    """The share of each pixel the object covers [S, S] float32 in [0, 1] (anti-aliased edge),
    without rendering the texture."""
    if not 0 <= index < self.num_images:
      raise IndexError(index)
    shape, _, outline, rng = self.identity(index)
    return _layout(self.shapes[shape], outline, rng, self.image_size)[1].astype(np.float32)

  def background(self, index: int) -> np.ndarray:
    """Image `index`'s background [S, S, 3] (float64), without its object."""
    shape, _, outline, rng = self.identity(index)
    return _layout(self.shapes[shape], outline, rng, self.image_size)[0]

  def composite(self, index: int, background_of: int) -> np.ndarray:
    """Image `index` (its object: shape, outline, texture, colours, pose) on the background of
    image `background_of`: the probe of what a model matches images by (docs/miniature.md)."""
    return self._render(self.identity(index), background=self.background(background_of))

  def restyled(self, index: int, key: int, factors: Sequence[str] = FACTORS) -> np.ndarray:
    """Image `index`'s object — its shape, outline and texture class — with the appearance
    `factors` (default: all of FACTORS — background, pose, texture parameters, colours) drawn
    anew from (seed, split, index, key); the others stay the image's own. With TEXTURE_CLASS
    among `factors`, the texture class too is drawn anew (uniformly, so one time in
    len(textures) it is the image's own): the view shares only the silhouette (and the pose
    unless redrawn)."""
    for factor in factors:
      if factor not in REDRAWABLE:
        raise ClmimError(f"Unknown appearance factor {factor!r}; expected some of {REDRAWABLE}.")
    style = np.random.default_rng([self.seed, SPLITS[self.split], index, _RESTYLE, key])
    texture_as = None
    if TEXTURE_CLASS in factors:
      chooser = np.random.default_rng([self.seed, SPLITS[self.split], index, _CLASS, key])
      texture_as = self.textures[int(chooser.integers(len(self.textures)))]
    return self._render(self.identity(index), style=style, texture_as=texture_as,
                        redraw=[f for f in factors if f in FACTORS])

  def partly_restyled(self, index: int, key: int) -> np.ndarray:
    """`restyled` with each appearance factor redrawn with probability 1/2, chosen by (seed,
    split, index, key): no factor but the object itself is shared every time."""
    chooser = np.random.default_rng([self.seed, SPLITS[self.split], index, _PARTIAL, key])
    factors = [f for f, redraw in zip(FACTORS, chooser.random(len(FACTORS)) < 0.5) if redraw]
    return self.restyled(index, key, factors)

  def batch(self, indices: Sequence[int]) -> dict:
    """Stacks examples: image [b,S,S,3] float32, shape [b], texture [b] int32."""
    items = [self[int(i) % self.num_images] for i in indices]
    return {"image": np.stack([it["image"] for it in items]),
            "shape": np.array([it["shape"] for it in items], np.int32),
            "texture": np.array([it["texture"] for it in items], np.int32)}

  def batches(self, batch_size: int, num_images: Optional[int] = None) -> Iterator[dict]:
    """One pass in index order; the last batch may be smaller."""
    total = min(num_images or self.num_images, self.num_images)
    for start in range(0, total, batch_size):
      yield self.batch(range(start, min(start + batch_size, total)))


def parse_second_view(second_view: str) -> tuple[str, tuple[str, ...]]:
  """(kind, factors) of a second-view name (SECOND_VIEWS): kind is "", "background", "partial"
  or "redraw"; factors are what a "redraw" view draws anew — appearance FACTORS and, optionally,
  TEXTURE_CLASS ("restyle" is "redraw" of the four FACTORS). Raises ClmimError naming what was
  expected."""
  if second_view in ("", "background", "partial"):
    return second_view, ()
  if second_view == "restyle":
    return "redraw", FACTORS
  if second_view.startswith("redraw:"):
    factors = tuple(f for f in second_view[len("redraw:"):].split("+") if f)
    unknown = [f for f in factors if f not in REDRAWABLE]
    if factors and not unknown and len(set(factors)) == len(factors):
      return "redraw", tuple(f for f in REDRAWABLE if f in factors)
  raise ClmimError(f"second_view={second_view!r}: expected one of {SECOND_VIEWS}, the factors "
                   f"distinct names from {REDRAWABLE} (e.g. 'redraw:background+colours').")


def second_view_share(step: int, ramp: Sequence[int]) -> float:
  """The share of pairs whose second view is rendered by `second_view` at `step` (the others
  are the image itself): 0 before ramp[0], rising linearly to 1 at ramp[1] (1 throughout when
  ramp[1] <= ramp[0], e.g. (0, 0))."""
  start, end = int(ramp[0]), int(ramp[1])
  if end <= start:
    return 1.0
  return float(np.clip((step - start) / (end - start), 0.0, 1.0))


def training_stream(dataset: ShapesTextures, batch_size: int, start_step: int = 0,
                    prefetch: int = 2, second_view: str = "", workers: int = 1,
                    ramp: Sequence[int] = (0, 0),
                    rows: Optional[Sequence[int]] = None) -> Iterator[dict]:
  """Endless batches for step start_step, start_step+1, ... (resumable: depends only on step).

  `rows` (lo, hi) renders only those rows of each global batch of `batch_size` (one process's
  share; clmim/data/train_data.py), identical to the same rows of the whole batch.

  With `second_view`, each batch also holds "second" [b, S, S, 3], a second rendering of each
  image for a contrastive objective's other view, chosen by (step, position):
    "background": the image's object (shape, outline, texture, colours, pose) on another
      training image's background — the background can no longer tell instances apart;
    "restyle": the same object (shape, outline, texture class) drawn anew: new pose,
      background, colours and texture parameters (`ShapesTextures.restyled`) — only what the
      object is is shared;
    "partial": each of those appearance factors redrawn with probability 1/2
      (`ShapesTextures.partly_restyled`);
    "redraw:<factor>+...": only the named FACTORS drawn anew, the others the image's own
      (e.g. "redraw:background+colours": same pose and texture parameters, so the view shares
      the object's silhouette and pattern but none of the image's colours); "texture_class"
      among them draws the texture class anew too (e.g. "redraw:background+colours+texture+
      texture_class": only the silhouette and the pose are shared).

  `ramp` (start, end) eases the second view in: at each step a share `second_view_share` of the
  pairs (chosen by (step, index)) gets it, the rest the image itself — a curriculum from
  same-image pairs, whose shared colours and background give a contrastive model its first
  signal, to views that share only the object.

  Images are rendered ahead of the consumer so the accelerator is not kept waiting: in one
  background thread (`workers` = 1), or in `workers` processes, each rendering whole batches —
  the batches are the same either way.
  """
  parse_second_view(second_view)
  if workers < 1:
    raise ClmimError(f"workers={workers}: expected at least 1.")
  if workers == 1:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  else:  # spawn, not fork: the consumer is a multi-threaded JAX process
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_ignore_ctrl_c)
    prefetch = max(prefetch, 2 * workers)
  with pool:
    step = start_step
    render = lambda s: pool.submit(_step_batch, dataset, batch_size, s, second_view, ramp, rows)
    pending = [render(s) for s in range(step, step + prefetch)]
    while True:
      batch = pending.pop(0).result()
      pending.append(render(step + prefetch))
      step += 1
      yield batch


def _ignore_ctrl_c():
  """A render process ignores Ctrl-C, which a terminal sends to the whole process group: the
  trainer decides (it saves a checkpoint and stops, clmim/jobs/pretrain.py), and a worker
  killed by it would break the pool under the step being saved."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def background_donor(index: int, step: int, size: int) -> int:
  """The training image whose background image `index` borrows at `step` (never itself)."""
  offset = 1 + (index * 7919 + step * 104729) % (size - 1)
  return (index + offset) % size


def _step_batch(dataset: ShapesTextures, batch_size: int, step: int,
                second_view: str = "", ramp: Sequence[int] = (0, 0),
                rows: Optional[Sequence[int]] = None) -> dict:
  lo, hi = rows if rows is not None else (0, batch_size)
  start = step * batch_size
  batch = dataset.batch(range(start + lo, start + hi))
  size = len(dataset)
  indices = [i % size for i in range(start + lo, start + hi)]
  kind, factors = parse_second_view(second_view)
  if not kind:
    return batch
  share = second_view_share(step, ramp)
  if share >= 1.0:
    chosen = np.ones(hi - lo, bool)
  else:  # the ramp: the other pairs keep the image itself as their second view
    chosen = np.random.default_rng([dataset.seed, SPLITS[dataset.split], _RAMP, step]
                                   ).random(batch_size)[lo:hi] < share
  batch["second"] = batch["image"].copy()
  for position in np.flatnonzero(chosen):
    i = indices[position]
    if kind == "background":
      view = dataset.composite(i, background_donor(i, step, size))
    elif kind == "redraw":
      view = dataset.restyled(i, step, factors)
    else:  # "partial"
      view = dataset.partly_restyled(i, step)
    batch["second"][position] = view
  return batch
