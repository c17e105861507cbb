r"""What the demo ViT can learn about the procedural images when it is given the labels.

A self-supervised model's probe is only as good as what its architecture can pick up at all:
this trains the demo encoder (config `configs/pretrain_moco_v3.py:demo`'s ViT) end to end with
a linear head on its mean patch token, on the shape or the texture label, and prints the
held-out top-1 along the way as JSON. docs/miniature.md quotes its numbers.

  python scripts/supervised_ceiling.py --target shape --steps 6000 --lr 3e-4

Every argument has a --help line. On 2 CPU cores a step takes ~0.4 s (batch 64); with
--workers N the images are rendered in N processes (for a GPU host).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from clmim.data.synthetic import ShapesTextures, training_stream  # noqa: E402
from clmim.train.common import build_encoder, normalise  # noqa: E402
from configs import pretrain_moco_v3  # noqa: E402


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--target", choices=("shape", "texture"), default="shape")
  parser.add_argument("--steps", type=int, default=6000, help="optimisation steps")
  parser.add_argument("--batch", type=int, default=64, help="images per step")
  parser.add_argument("--lr", type=float, default=3e-4, help="AdamW peak learning rate")
  parser.add_argument("--patch", type=int, default=4, help="patch side in pixels (32 px images)")
  parser.add_argument("--version", type=int, default=3,
                      help="procedural data version (3: the demo models' data)")
  parser.add_argument("--evaluations", type=int, default=6, help="held-out checks during training")
  parser.add_argument("--held_out", type=int, default=1000,
                      help="held-out (validation) images each check classifies")
  parser.add_argument("--workers", type=int, default=1, help="rendering processes")
  parser.add_argument("--out", default="", help="also write the JSON here")
  return parser.parse_args()


def main():
  args = parse_args()
  config = pretrain_moco_v3.get_config("demo")
  config.unlock()
  config.model.patch_size = args.patch
  encoder = build_encoder(config)
  size = config.data.image_size
  train = ShapesTextures(size, "train", config.data.num_train_images, version=args.version)
  held_out = ShapesTextures(size, "validation", args.held_out,
                            version=args.version).batch(range(args.held_out))
  params = {"encoder": encoder.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"],
            "head": {"w": jnp.zeros((encoder.width, 4)), "b": jnp.zeros(4)}}
  warmup = min(300, args.steps // 10)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps),
                   weight_decay=0.05)
  opt_state = tx.init(params)

  def logits(params, images):
    tokens = encoder.apply({"params": params["encoder"]}, normalise(images, config.data))
    return tokens[:, 1:].mean(1) @ params["head"]["w"] + params["head"]["b"]

  @jax.jit
  def step(params, opt_state, images, labels):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        logits(p, images), labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  accuracy = jax.jit(lambda p, x, y: (logits(p, x).argmax(-1) == y).mean())
  stream = training_stream(train, args.batch, workers=args.workers)
  every = max(1, args.steps // args.evaluations)
  curve, started = [], time.time()
  for i in range(args.steps):
    batch = next(stream)
    params, opt_state, loss = step(params, opt_state, batch["image"], batch[args.target])
    if (i + 1) % every == 0 or i + 1 == args.steps:
      top1 = float(accuracy(params, held_out["image"], held_out[args.target]))
      curve.append({"step": i + 1, "loss": round(float(loss), 4), "held_out_top1": top1,
                    "elapsed_s": round(time.time() - started, 1)})
      print(json.dumps(curve[-1]), flush=True)
  stream.close()
  result = {"args": vars(args), "device": str(jax.devices()[0].platform), "curve": curve}
  print(json.dumps(result, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
