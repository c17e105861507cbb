r"""MoCo v3's demo training step: clmim against an equivalent PyTorch implementation, side by side
in one process on the same CPU.

The step is the demo recipe's (configs/pretrain_moco_v3.py:demo_stage1 with both views made from
the one image): two augmented views of each image (random resized crop, flip, colour jitter,
grayscale, blur, solarise, made from the images in memory), the online ViT + projector and the
predictor on each view, the momentum ViT + projector on each, the symmetric InfoNCE (× 2τ), the
gradient, global-norm clipping, AdamW (no decay on vectors, the cls token and the positions; the
patch projection and the sin-cos table frozen) and the momentum update. clmim runs it as the
trainer does (`clmim.train.trainer.make_update`, jit-compiled, on one device). The PyTorch
version is written here from the same definitions (the ViT of benchmarks/torch_reference.py,
BatchNorm MLPs, the augmentations as batched tensor ops, torch.optim.AdamW, `_foreach` EMA), in
two forms: "pytorch", the official code's (timm's ViT runs every token through the last block,
though the projector reads the cls token only), and "pytorch_cls_only", whose last block computes
the cls token's query, attention, projection and MLP alone, as clmim's MoCo v3 does
(`ViT(cls_only=True)`). The second shows how much of clmim's speed is that skipped work and how
much is the libraries.

Before timing, all three are checked to be the same network and loss: PyTorch is loaded with
clmim's initial parameters and each computes the loss and gradients of the same un-augmented pair
of views (the images and their mirror images); the JSON reports the loss differences and the
largest relative gradient differences. Then each runs --steps steps per timed call, alternating,
--repeats times (the first call of each, untimed, compiles / warms up).

  python benchmarks/moco_step_vs_pytorch.py [--batch 64] [--steps 5] [--repeats 5] [--depth 6]
      [--all_tokens]

--all_tokens adds a fourth step: clmim with every token through the last block (the
`EncoderWithProjector(cls_only=False)` form), so that what the skipped work buys clmim itself is
timed in the same run (cls_only_speedup_in_clmim).

Prints one JSON object: images/s and seconds per step of each, clmim's speed over each PyTorch
form's (clmim_speedup: over the official form's; ratios of the medians), the same speed-ups
repeat by repeat (paired_clmim_speedup: the median of the per-repeat ratios, its bootstrap 95 %
interval, and in how many repeats clmim was the faster), the checks, the machine.
"""
import argparse
import copy
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from clmim import host_memory  # noqa: E402
from clmim.data.synthetic import ShapesTextures  # noqa: E402
from clmim.train import moco_v3, objectives, trainer  # noqa: E402
from configs import pretrain_moco_v3  # noqa: E402
from torch_reference import (  # noqa: E402
    TorchViT, load_average, load_clmim_params, paired_speedup, run_record,
    time_interleaved)

host_memory.keep_freed_memory()  # as training runs do (clmim/main.py), before JAX starts

LUMA = torch.tensor([0.299, 0.587, 0.114])
TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


# --- PyTorch: the model ----------------------------------------------------------------------

class TorchBatchNormMLP(nn.Module):
  """Linear (no bias) -> BatchNorm -> ReLU, repeated; the last BatchNorm without affine."""

  def __init__(self, num_layers, in_dim, hidden_dim, out_dim):
    super().__init__()
    layers = []
    for i in range(num_layers):
      last = i == num_layers - 1
      layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim,
                              bias=False))
      layers.append(nn.BatchNorm1d(out_dim if last else hidden_dim, eps=1e-5, momentum=0.1,
                                   affine=not last))
      if not last:
        layers.append(nn.ReLU())
    self.layers = nn.Sequential(*layers)

  def forward(self, x):
    return self.layers(x)


class TorchEncoderWithProjector(nn.Module):
  """ViT -> final-normed cls token -> projector. cls_only: the last block computes the cls
  token's row alone, as clmim's MoCo v3 does; False: every token, as the official code does."""

  def __init__(self, vit, width, hidden_dim, out_dim, cls_only=False):
    super().__init__()
    self.encoder = vit
    self.projector = TorchBatchNormMLP(3, width, hidden_dim, out_dim)
    self.cls_only = cls_only

  def forward(self, x):
    return self.projector(self.encoder(x, cls_only=self.cls_only)[:, 0])


def load_mlp(module, params, stats):
  """clmim BatchNormMLP params / batch_stats -> the torch MLP (Linear weights transposed)."""
  state, linears = {}, 0
  for index, layer in enumerate(module.layers):
    if isinstance(layer, nn.Linear):
      state[f"layers.{index}.weight"] = np.asarray(params[f"linear_{linears}"]["kernel"]).T
      linears += 1
    elif isinstance(layer, nn.BatchNorm1d):
      name = f"bn_{linears - 1}"
      if layer.affine:
        state[f"layers.{index}.weight"] = np.asarray(params[name]["scale"])
        state[f"layers.{index}.bias"] = np.asarray(params[name]["bias"])
      state[f"layers.{index}.running_mean"] = np.asarray(stats[name]["mean"])
      state[f"layers.{index}.running_var"] = np.asarray(stats[name]["var"])
      state[f"layers.{index}.num_batches_tracked"] = np.asarray(0)
  module.load_state_dict({k: torch.from_numpy(np.array(v, order="C")) for k, v in state.items()})


def build_torch_moco(objective, params, state, cls_only=False):
  """Online encoder + projector, predictor and momentum copy, loaded with clmim's values."""
  vit_cfg, cfg = objective.encoder, objective.config.moco
  vit = TorchViT(vit_cfg.width, vit_cfg.depth, vit_cfg.num_heads, vit_cfg.mlp_dim,
                 vit_cfg.patch_size, vit_cfg.image_size)
  online = TorchEncoderWithProjector(vit, vit_cfg.width, cfg.hidden_dim, cfg.out_dim, cls_only)
  predictor = TorchBatchNormMLP(2, cfg.out_dim, cfg.hidden_dim, cfg.out_dim)
  params, state = jax.device_get((params, state))
  load_clmim_params(online.encoder, params["online"]["encoder"])
  load_mlp(online.projector, params["online"]["projector"], state["batch_stats"]["online"]["projector"])
  load_mlp(predictor, params["predictor"], state["batch_stats"]["predictor"])
  momentum = copy.deepcopy(online)
  load_clmim_params(momentum.encoder, state["momentum"]["encoder"])
  load_mlp(momentum.projector, state["momentum"]["projector"],
           state["batch_stats"]["momentum"]["projector"])
  for p in momentum.parameters():
    p.requires_grad_(False)
  for p in (online.encoder.patch_embed.weight, online.encoder.patch_embed.bias,
            online.encoder.pos_embed):  # MoCo v3's frozen patch projection, the fixed table
    p.requires_grad_(False)
  return online.train(), predictor.train(), momentum.train()


def torch_contrastive(queries, keys, temperature):
  queries = nn.functional.normalize(queries, dim=1)
  keys = nn.functional.normalize(keys, dim=1)
  logits = queries @ keys.T / temperature
  labels = torch.arange(queries.shape[0])
  return nn.functional.cross_entropy(logits, labels) * 2 * temperature


def torch_loss(online, predictor, momentum, views, temperature):
  queries = [predictor(online(v)) for v in views]
  with torch.no_grad():
    keys = [momentum(v) for v in views]
  return (torch_contrastive(queries[0], keys[1], temperature)
          + torch_contrastive(queries[1], keys[0], temperature))


# --- PyTorch: the views (batched tensor ops, NCHW in [0, 1]) ----------------------------------

def _uniform(gen, n, low, high):
  return torch.rand(n, generator=gen) * (high - low) + low


def _per_image(mask):
  return mask.view(-1, 1, 1, 1)


def torch_crop_flip(gen, images, scale):
  batch, _, height, width = images.shape
  area = _uniform(gen, batch, *scale)
  aspect = torch.exp(_uniform(gen, batch, math.log(3 / 4), math.log(4 / 3)))
  crop_w = torch.clamp(torch.sqrt(area * aspect), max=1.0)  # as fractions of the side
  crop_h = torch.clamp(torch.sqrt(area / aspect), max=1.0)
  left = torch.rand(batch, generator=gen) * (1 - crop_w)
  top = torch.rand(batch, generator=gen) * (1 - crop_h)
  flip = torch.where(torch.rand(batch, generator=gen) < 0.5, -1.0, 1.0)
  theta = torch.zeros(batch, 2, 3)
  theta[:, 0, 0], theta[:, 0, 2] = crop_w * flip, (left + crop_w / 2) * 2 - 1
  theta[:, 1, 1], theta[:, 1, 2] = crop_h, (top + crop_h / 2) * 2 - 1
  grid = nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
  return nn.functional.grid_sample(images, grid, mode="bilinear", align_corners=False)


def _grayscale(images):
  return (images * LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(images)


def torch_colour(gen, images, aug):
  batch = images.shape[0]
  factor = lambda s: _uniform(gen, batch, 1 - s, 1 + s).view(-1, 1, 1, 1)
  out = images * factor(aug.brightness)
  mean = _grayscale(out)[:, :1].mean(dim=(2, 3), keepdim=True)
  out = (out - mean) * factor(aug.contrast) + mean
  gray = _grayscale(out)
  out = (out - gray) * factor(aug.saturation) + gray
  angle = 2 * math.pi * _uniform(gen, batch, -aug.hue, aug.hue).view(-1, 1, 1)
  yiq = torch.einsum("ij,bjhw->bihw", TO_YIQ, out)
  i = yiq[:, 1] * torch.cos(angle) - yiq[:, 2] * torch.sin(angle)
  q = yiq[:, 1] * torch.sin(angle) + yiq[:, 2] * torch.cos(angle)
  out = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(TO_YIQ), torch.stack([yiq[:, 0], i, q], 1))
  out = out.clamp(0, 1)
  apply = _per_image(torch.rand(batch, generator=gen) < aug.jitter_prob)
  return torch.where(apply, out, images)


def torch_blur(gen, images, prob, sigma, radius=3):
  batch, _, height, width = images.shape
  sigmas = _uniform(gen, batch, *sigma)
  taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
  weights = torch.exp(-0.5 * (taps[None] / sigmas[:, None]) ** 2)
  weights = (weights / weights.sum(1, keepdim=True)).view(batch, 1, -1, 1, 1)
  padded = nn.functional.pad(images, (radius,) * 4, mode="reflect")
  rows = sum(weights[:, :, t] * padded[:, :, t:t + height] for t in range(2 * radius + 1))
  cols = sum(weights[:, :, t] * rows[:, :, :, t:t + width] for t in range(2 * radius + 1))
  return torch.where(_per_image(torch.rand(batch, generator=gen) < prob), cols, images)


def torch_view(gen, images, aug, view):
  out = torch_crop_flip(gen, images, tuple(aug.crop_scale))
  out = torch_colour(gen, out, aug)
  gray = _per_image(torch.rand(out.shape[0], generator=gen) < aug.grayscale_prob)
  out = torch.where(gray, _grayscale(out), out)
  out = torch_blur(gen, out, aug.blur_prob[view], tuple(aug.blur_sigma))
  solarize = _per_image(torch.rand(out.shape[0], generator=gen) < aug.solarize_prob[view])
  out = torch.where(solarize & (out >= 0.5), 1.0 - out, out)
  return (out - 0.5) / 0.5  # data.mean = data.std = "half"


class TorchMocoStep:
  """One PyTorch training step of the demo recipe (see the module docstring)."""

  def __init__(self, config, online, predictor, momentum, seed=0):
    self.config, self.online, self.predictor, self.momentum = config, online, predictor, momentum
    trainable = [(n, p) for module in (online, predictor)
                 for n, p in module.named_parameters() if p.requires_grad]
    self.params = [p for _, p in trainable]
    decay = [p for n, p in trainable if p.ndim > 1 and "cls_token" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim > 1 and "cls_token" not in n)]
    self.optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, config.beta2), eps=1e-8, foreach=True)
    self.online_params = list(online.parameters())
    self.momentum_params = list(momentum.parameters())
    self.gen = torch.Generator().manual_seed(seed)
    self.step_count = 0

  def __call__(self, images_nchw):
    cfg = self.config
    views = [torch_view(self.gen, images_nchw, cfg.augment, i) for i in range(2)]
    loss = torch_loss(self.online, self.predictor, self.momentum, views, cfg.moco.temperature)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True)
    self.optimizer.step()
    m = float(moco_v3.momentum_at(self.step_count, cfg.total_steps, cfg.moco.momentum))
    with torch.no_grad():
      torch._foreach_mul_(self.momentum_params, m)
      torch._foreach_add_(self.momentum_params, self.online_params, alpha=1 - m)
    self.step_count += 1
    return float(loss.detach())


# --- The comparison ---------------------------------------------------------------------------

def same_network_check(objective, params, state, images, torch_models):
  """Loss and gradients of one un-augmented pair (the images, their mirrors) in clmim and in
  each PyTorch version, torch_models {name: (online, predictor, momentum)}: the official form's
  ("pytorch") loss, loss difference and largest relative gradient differences, and each other
  form's differences under "<name>_loss_abs_diff" and "<name>_gradient_relative_diff"."""
  nhwc = jnp.asarray((images - 0.5) / 0.5)
  views = [nhwc, nhwc[:, :, ::-1]]
  temperature = objective.config.moco.temperature

  def loss_fn(p):
    return objective.loss_on_views(p, state, views, jax.random.PRNGKey(0), 0)[0]

  ours, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  ours = float(ours)
  torch_views = [torch.from_numpy(np.asarray(v).transpose(0, 3, 1, 2).copy()) for v in views]
  result = {"loss_clmim": ours}
  for name, (online, predictor, momentum) in torch_models.items():
    online.zero_grad()
    predictor.zero_grad()
    theirs = torch_loss(online, predictor, momentum, torch_views, temperature)
    theirs.backward()
    pairs = {  # clmim gradient leaf, torch parameter
        "encoder/block_0/mlp/fc1/kernel": (grads["online"]["encoder"]["block_0"]["mlp"]["fc1"]
                                           ["kernel"], online.encoder.blocks[0].mlp.fc1.weight),
        "encoder/block_0/attn/qkv/kernel": (grads["online"]["encoder"]["block_0"]["attn"]["qkv"]
                                            ["kernel"], online.encoder.blocks[0].attn.qkv.weight),
        "projector/linear_2/kernel": (grads["online"]["projector"]["linear_2"]["kernel"],
                                      online.projector.layers[6].weight),
        "predictor/linear_1/kernel": (grads["predictor"]["linear_1"]["kernel"],
                                      predictor.layers[3].weight),
    }
    gradient_differences = {}
    for leaf, (ours_grad, torch_param) in pairs.items():
      a, b = np.asarray(ours_grad).T, torch_param.grad.numpy()
      gradient_differences[leaf] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    theirs = float(theirs.detach())
    prefix = "" if name == "pytorch" else f"{name}_"
    if name == "pytorch":
      result["loss_pytorch"] = theirs
    result[f"{prefix}loss_abs_diff"] = abs(ours - theirs)
    result[f"{prefix}gradient_relative_diff"] = gradient_differences
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=5, help="training steps per timed call")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--depth", type=int, default=0, help="ViT blocks (0 = the demo's 6)")
  parser.add_argument("--all_tokens", action="store_true",
                      help="also time clmim with every token through the last block "
                           "(clmim_all_tokens), as the official code computes it")
  args = parser.parse_args(argv)
  started, load_at_start = time.time(), load_average()
  config = pretrain_moco_v3.get_config("demo_stage1")
  config.unlock()
  config.batch_size = args.batch
  if args.depth:
    config.model.depth = args.depth
  objective = objectives.load(config)
  train_state, tx, schedule = trainer.initial_state(config, objective)
  images = ShapesTextures(config.data.image_size, "train", args.batch, 0,
                          version=config.data.version).batch(range(args.batch))["image"]
  # "pytorch" is the official formulation (every token through the last block); "pytorch_cls_only"
  # skips the patch tokens' rows of the last block as clmim does, to show what that alone buys.
  torch_models = {name: build_torch_moco(objective, train_state["params"], train_state["state"],
                                         cls_only=name.endswith("cls_only"))
                  for name in ("pytorch", "pytorch_cls_only")}
  check = same_network_check(objective, train_state["params"], train_state["state"], images,
                             torch_models)

  device = jax.devices()[0]
  jax_images = jax.device_put(jnp.asarray(images), device)
  rng = jax.random.PRNGKey(0)
  losses = {}

  def clmim_steps(name, objective):
    update = jax.jit(trainer.make_update(objective, tx, schedule), donate_argnums=(0,))
    # A copy each: the update donates its state, and device_put would not copy.
    state = {"train": jax.device_put(jax.tree.map(jnp.copy, train_state), device),
             "bad": jax.device_put(jnp.asarray(-1, jnp.int32), device), "count": 0}

    def run():
      for _ in range(args.steps):
        state["train"], state["bad"], metrics = update(
            state["train"], state["bad"], jax_images, jax.random.fold_in(rng, state["count"]))
        state["count"] += 1
      losses[name] = float(metrics["loss"])  # waits for the last step
    return run

  clmim_runs = {"clmim": clmim_steps("clmim", objective)}
  if args.all_tokens:  # clmim with every token through the last block, as the official code
    all_tokens = objectives.load(config)
    all_tokens.online = all_tokens.online.clone(cls_only=False)
    clmim_runs["clmim_all_tokens"] = clmim_steps("clmim_all_tokens", all_tokens)

  torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

  def torch_steps(name):
    torch_step = TorchMocoStep(config, *torch_models[name])

    def run():
      for _ in range(args.steps):
        losses[name] = torch_step(torch_images)
    return run

  times = time_interleaved({**clmim_runs, **{name: torch_steps(name) for name in torch_models}},
                           args.repeats)
  per_step = {name: median / args.steps for name, (median, _) in times.items()}
  result = {
      "benchmark": "moco_step_vs_pytorch",
      "config": "configs/pretrain_moco_v3.py:demo_stage1 (views from the one image)",
      "batch": args.batch, "depth": objective.encoder.depth, "image_size": config.data.image_size,
      "steps_per_call": args.steps, "repeats": args.repeats,
      "seconds_per_step": {k: round(v, 4) for k, v in per_step.items()},
      "images_per_s": {k: round(args.batch / v, 1) for k, v in per_step.items()},
      "clmim_speedup": round(per_step["pytorch"] / per_step["clmim"], 3),
      "clmim_speedup_vs_pytorch_cls_only": round(
          per_step["pytorch_cls_only"] / per_step["clmim"], 3),
      **({"cls_only_speedup_in_clmim": round(per_step["clmim_all_tokens"] / per_step["clmim"],
                                             3)} if args.all_tokens else {}),
      # The same ratios repeat by repeat, with a bootstrap interval: the VM's noise is +-10-15 %
      # per call, so a median ratio alone cannot say whether a few per cent is a margin.
      "paired_clmim_speedup": {
          name: paired_speedup(times["clmim"][1], times[name][1])
          for name in times if name != "clmim"},
      "all_seconds": {k: [round(t, 3) for t in ts] for k, (_, ts) in times.items()},
      "final_loss": losses,
      "same_network_check": check,
      **run_record(load_at_start, started),
  }
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  host_memory.run_with_tcmalloc()  # as `python -m clmim.main` training runs do; may restart
  main()
