r"""How much do MoCo's two views of one training image agree, as a model sees them?

Instance discrimination can only start learning from what a positive pair shares more than a
random pair does. For each `--views` entry (an `augment.second_view` of the MoCo config, "" =
the same image) this renders `--images` training pairs of the procedural data, augments each
side as MoCo v3's trainer does (`configs/pretrain_moco_v3.py`'s augment: crop, flip, jitter,
grey, blur, solarise), and measures, on the raw pixels and on each model's last-block features
(cls token and mean patch token, normalised as the probes are):

  margin  mean cos(view 1 of i, view 2 of i) - mean cos(view 1 of i, view 2 of j != i),
          after centring each side over the batch;
  top1    share of images whose view 2 is the nearest to their view 1 among all n.

On untrained copies (`random:<spec>`, the default) this is the signal a run starts from: a
second view whose margin is near 0 gives the contrastive loss nothing to climb (docs/miniature.md
shows such runs staying at chance).

  python scripts/view_agreement.py --models random:moco_v3_demo --version 3 \
      --views ",redraw:background+colours,restyle"

Prints JSON.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from clmim.checkpoints import registry  # noqa: E402
from clmim.data.augment import contrastive_view  # noqa: E402
from clmim.data.synthetic import ShapesTextures, parse_second_view, training_stream  # noqa: E402
from clmim.errors import ClmimError  # noqa: E402
from diagnose_shortcuts import features  # noqa: E402


def agreement(first: np.ndarray, second: np.ndarray) -> dict:
  """margin and top1 (module docstring) of row-aligned feature sets [n, D]."""
  a, b = first - first.mean(0), second - second.mean(0)
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  b = b / np.linalg.norm(b, axis=1, keepdims=True)
  cos = a @ b.T
  n = len(cos)
  positive = np.trace(cos) / n
  negative = (cos.sum() - np.trace(cos)) / (n * n - n)
  return {"margin": round(float(positive - negative), 4),
          "top1": round(float(np.mean(cos.argmax(1) == np.arange(n))), 4)}


def augmented_pairs(data: ShapesTextures, second_view: str, augment, n: int, seed: int):
  """(view 1, view 2) [n, S, S, 3] in [0, 1]: n training images and their second views after
  MoCo's augmentation."""
  stream = training_stream(data, n, start_step=seed, prefetch=1, second_view=second_view)
  batch = next(stream)
  stream.close()
  sources = (batch["image"], batch.get("second", batch["image"]))
  keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  return tuple(np.asarray(contrastive_view(k, jnp.asarray(x), augment, i))
               for i, (k, x) in enumerate(zip(keys, sources)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="random:moco_v3_demo",
                      help="comma-separated model specs (e.g. moco_v3_demo, random:moco_v3_demo)")
  parser.add_argument("--views", default=",restyle,redraw:background+colours",
                      help="comma-separated second views ('' = the same image)")
  parser.add_argument("--version", type=int, default=3,
                      help="procedural data version (3: the demo models' data)")
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  from configs.pretrain_moco_v3 import get_config
  augment = get_config("demo").augment
  views = args.views.split(",")
  try:
    for view in views:
      parse_second_view(view)
    models = [registry.resolve(spec) for spec in args.models.split(",") if spec]
    size = {m.vit.image_size for m in models} or {32}
    if len(size) > 1:
      raise ClmimError(f"--models have different image sizes {sorted(size)}; give one size.")
    data = ShapesTextures(size.pop(), "train", 50000, version=args.version)
  except ClmimError as e:
    sys.exit(f"view_agreement: {e}")
  report = {"images": args.images, "version": args.version, "views": {}}
  for view in views:
    first, second = augmented_pairs(data, view, augment, args.images, args.seed)
    entry = {"pixels": agreement(first.reshape(len(first), -1), second.reshape(len(second), -1))}
    for model in models:
      f1, f2 = features(model, first), features(model, second)
      entry[model.name] = {kind: agreement(f1[kind], f2[kind]) for kind in f1}
    report["views"][view or "same image"] = entry
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
