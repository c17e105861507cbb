r"""What do two images of the procedural data have to share for a model to call them alike:
the object or the background?

For each of `--images` held-out procedural images x_i, two composites are rendered
(`ShapesTextures.composite`): o_i, the object of x_i (shape, texture, colours, pose) on the
background of another image x_j, and b_i, the object of x_j on the background of x_i. A model
that matches images by their object finds cos(f(x_i), f(o_i)) > cos(f(x_i), f(b_i)); one that
matches them by their background finds the opposite. f is the last block's cls token or mean
patch token, normalised like a LayerNorm without affine parameters (the probing features).
Retrieval: among all 2n composites, does x_i's nearest neighbour have x_i's object or x_i's
background (each appears in two composites)?

  python scripts/diagnose_shortcuts.py --models moco_v3_demo,simmim_demo --images 512

Prints JSON: per model and feature, the share of images whose object composite is nearer, the
mean cosines, and the retrieval shares. Untrained copies (`random:<name>`) are the baseline.
"""
import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from clmim.analysis.probing import normalised  # noqa: E402
from clmim.checkpoints import registry  # noqa: E402
from clmim.data import preprocess  # noqa: E402
from clmim.data.synthetic import ShapesTextures  # noqa: E402
from clmim.models.vit import forward_with_states  # noqa: E402


@functools.lru_cache(maxsize=None)
def _last_state(vit):
  """The jit-compiled last-block state of `vit`: one per architecture, so that every call of
  `features` with it (each model, each image set) reuses one trace and compile."""
  return jax.jit(lambda p, x: forward_with_states(vit, p, x)[0][-1])


def features(model, images, batch=128):
  """{"cls", "mean_tokens"}: [n, D] normalised last-block features."""
  mean = np.asarray(preprocess.resolve_stats(model.preprocessing.get("mean", "half"), "mean",
                                             "model"), np.float32)
  std = np.asarray(preprocess.resolve_stats(model.preprocessing.get("std", "half"), "std",
                                            "model"), np.float32)
  run = _last_state(model.vit)
  out = {"cls": [], "mean_tokens": []}
  for start in range(0, len(images), batch):
    z = run(model.params, (images[start:start + batch] - mean) / std)
    out["cls"].append(np.asarray(normalised(z[:, 0])))
    out["mean_tokens"].append(np.asarray(normalised(z[:, 1:].mean(1))))
  return {k: np.concatenate(v) for k, v in out.items()}


def unit(v):
  return v / np.linalg.norm(v, axis=1, keepdims=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="moco_v3_demo,simmim_demo")
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--untrained", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--version", type=int, default=3,
                      help="procedural data version (the one the models were trained on)")
  args = parser.parse_args()
  names = [n for n in args.models.split(",") if n]
  specs = names + ([f"random:{n}" for n in names] if args.untrained else [])
  report = {"images": args.images, "version": args.version, "models": {}}
  for spec in specs:
    model = registry.resolve(spec)
    size = model.vit.image_size
    data = ShapesTextures(size, "validation", args.images, version=args.version)
    n = args.images
    donor = (np.arange(n) + 1) % n  # another image, never itself (and no pair swaps back)
    originals = np.stack([data[i]["image"] for i in range(n)])
    object_kept = np.stack([data.composite(i, int(donor[i])) for i in range(n)])
    background_kept = np.stack([data.composite(int(donor[i]), i) for i in range(n)])
    f_x, f_o, f_b = (features(model, x) for x in (originals, object_kept, background_kept))
    entry = {}
    for kind in ("cls", "mean_tokens"):
      x, o, b = unit(f_x[kind]), unit(f_o[kind]), unit(f_b[kind])
      cos_o, cos_b = (x * o).sum(1), (x * b).sum(1)
      # Candidate c has the object of image objects[c] and the background of backgrounds[c].
      objects = np.concatenate([np.arange(n), donor])
      backgrounds = np.concatenate([donor, np.arange(n)])
      nearest = np.argmax(x @ np.concatenate([o, b]).T, axis=1)
      entry[kind] = {
          "object_nearer": float(np.mean(cos_o > cos_b)),
          "mean_cos_object_kept": float(cos_o.mean()),
          "mean_cos_background_kept": float(cos_b.mean()),
          "retrieves_same_object": float(np.mean(objects[nearest] == np.arange(n))),
          "retrieves_same_background": float(np.mean(backgrounds[nearest] == np.arange(n)))}
    report["models"][model.name] = entry
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
