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
"""
from __future__ import annotations

import concurrent.futures
from typing import Iterator, Optional, Sequence

import numpy as np

from clmim.errors import ClmimError

SHAPES = ("disk", "square", "triangle", "cross")
TEXTURES = ("stripes", "checker", "dots", "grain")
SPLITS = {"train": 0, "validation": 1, "cue_conflict": 2}
PAIRINGS = ("independent", "aligned")
SECOND_VIEWS = ("", "background", "restyle")
_RESTYLE = 7  # a stream id of the restyled views' generators, apart from the images' own


def _shape_distance(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Approximate signed distance to the unit-size shape (negative inside)."""
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


def render(shape: str, texture: str, rng: np.random.Generator, image_size: int,
           background: Optional[np.ndarray] = None) -> np.ndarray:
  """One image [S, S, 3] float32 in [0, 1] with random colours, position, scale and rotation.
  `background` [S, S, 3] replaces the image's own (the draws stay the same)."""
  own, coverage, x, y = _layout(shape, rng, image_size)
  background = own if background is None else background
  return _paint(texture, background, coverage, x, y, rng, image_size)


def _paint(texture: str, background, coverage, x, y, rng, image_size) -> np.ndarray:
  """The object filled with `texture` in two random colours, over `background`."""
  pattern = _texture(texture, x, y, rng, image_size)
  fg0, fg1 = _random_colour(rng), _random_colour(rng)
  # Texture colours must differ enough for the texture to be visible.
  if np.abs(fg0 - fg1).sum() < 0.6:
    fg1 = 1.0 - fg0
  foreground = fg0 * pattern[..., None] + fg1 * (1 - pattern[..., None])
  image = background * (1 - coverage[..., None]) + foreground * coverage[..., None]
  return image.astype(np.float32)


def _layout(shape: str, rng: np.random.Generator, image_size: int):
  """(background [S, S, 3], object coverage [S, S] in [0, 1], x, y): the draws of an image that
  come before its texture, in the order `render` makes them."""
  pixel = 2.0 / image_size
  coords = (np.arange(image_size, dtype=np.float32) + 0.5) * pixel - 1.0
  x, y = np.meshgrid(coords, coords)  # x: column, y: row (downwards)

  # Background: a smooth two-colour gradient (only low frequencies).
  direction = rng.uniform(0, 2 * np.pi)
  ramp = (x * np.cos(direction) + y * np.sin(direction) + 1.5) / 3.0
  bg0, bg1 = _random_colour(rng), _random_colour(rng)
  background = bg0 * (1 - ramp[..., None]) + bg1 * ramp[..., None]

  # Shape geometry in its own frame: scale, rotation and centre jitter.
  scale = rng.uniform(0.45, 0.7)
  centre = rng.uniform(-0.25, 0.25, size=2)
  rotation = rng.uniform(-0.5, 0.5)
  sx, sy = x - centre[0], y - centre[1]
  lx = (sx * np.cos(rotation) + sy * np.sin(rotation)) / scale
  ly = (-sx * np.sin(rotation) + sy * np.cos(rotation)) / scale
  distance = _shape_distance(shape, lx, ly) * scale
  coverage = np.clip(0.5 - distance / pixel, 0.0, 1.0)  # anti-aliased edge
  return background, coverage, x, y


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
               textures: Sequence[str] = TEXTURES, pairing: str = "independent"):
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

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_images:
      raise IndexError(index)
    shape, texture, rng = self.labels(index)
    image = render(self.shapes[shape], self.textures[texture], rng, self.image_size)
    return {"image": image, "shape": shape, "texture": texture}

  def object_mask(self, index: int) -> np.ndarray:
    """The share of each pixel the object covers [S, S] float32 in [0, 1] (anti-aliased edge),
    without rendering the texture."""
    if not 0 <= index < self.num_images:
      raise IndexError(index)
    shape, _, rng = self.labels(index)
    return _layout(self.shapes[shape], rng, self.image_size)[1].astype(np.float32)

  def background(self, index: int) -> np.ndarray:
    """Image `index`'s background [S, S, 3] (float64), without its object."""
    shape, _, rng = self.labels(index)
    return _layout(self.shapes[shape], rng, self.image_size)[0]

  def composite(self, index: int, background_of: int) -> np.ndarray:
    """Image `index` (its object: shape, texture, colours, pose) on the background of image
    `background_of`: the probe of what a model matches images by (README, "diagnosis")."""
    shape, texture, rng = self.labels(index)
    return render(self.shapes[shape], self.textures[texture], rng, self.image_size,
                  background=self.background(background_of))

  def restyled(self, index: int, key: int) -> np.ndarray:
    """Image `index`'s object — its shape, pose and texture class — with a new background, new
    colours and new texture parameters (angle, period, phase), drawn from (seed, split, index,
    key): a view that shares only shape, pose and texture class with the image."""
    shape, texture, rng = self.labels(index)
    _, coverage, x, y = _layout(self.shapes[shape], rng, self.image_size)
    style = np.random.default_rng([self.seed, SPLITS[self.split], index, _RESTYLE, key])
    background = _layout(self.shapes[shape], style, self.image_size)[0]
    return _paint(self.textures[texture], background, coverage, x, y, style, self.image_size)

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


def training_stream(dataset: ShapesTextures, batch_size: int, start_step: int = 0,
                    prefetch: int = 2, second_view: str = "") -> Iterator[dict]:
  """Endless batches for step start_step, start_step+1, ... (resumable: depends only on step).

  With `second_view`, each batch also holds "second" [b, S, S, 3], a second rendering of each
  image for a contrastive objective's other view, chosen by (step, position):
    "background": the image's object (shape, texture, colours, pose) on another training
      image's background — the background can no longer tell instances apart;
    "restyle": the same shape, pose and texture class with a new background, new colours and
      new texture parameters (`ShapesTextures.restyled`) — only shape, pose and texture class
      are shared.

  Images are rendered in a background thread so the accelerator is not kept waiting.
  """
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    step = start_step
    if second_view not in SECOND_VIEWS:
      raise ClmimError(f"second_view={second_view!r}: expected one of {SECOND_VIEWS}.")
    render = lambda s: pool.submit(_step_batch, dataset, batch_size, s, second_view)
    pending = [render(s) for s in range(step, step + prefetch)]
    while True:
      batch = pending.pop(0).result()
      pending.append(render(step + prefetch))
      step += 1
      yield batch


def background_donor(index: int, step: int, size: int) -> int:
  """The training image whose background image `index` borrows at `step` (never itself)."""
  offset = 1 + (index * 7919 + step * 104729) % (size - 1)
  return (index + offset) % size


def _step_batch(dataset: ShapesTextures, batch_size: int, step: int,
                second_view: str = "") -> dict:
  start = step * batch_size
  batch = dataset.batch(range(start, start + batch_size))
  size = len(dataset)
  indices = [i % size for i in range(start, start + batch_size)]
  if second_view == "background":
    batch["second"] = np.stack([
        dataset.composite(i, background_donor(i, step, size)) for i in indices])
  elif second_view == "restyle":
    batch["second"] = np.stack([dataset.restyled(i, step) for i in indices])
  return batch
