"""Optional pretraining heads of the official checkpoints, converted for analyses that need them.

- MoCo v3 projector (`base_encoder.head.*`) and predictor (`predictor.*`): torch `_build_mlp`
  Sequentials (Linear without bias, BatchNorm1d, ReLU, ..., last BN without affine) ->
  variables {'params', 'batch_stats'} of `clmim.models.heads.BatchNormMLP`.
- SimMIM decoder (`decoder.0`, a 1x1 conv before PixelShuffle(p)) -> params of
  `clmim.models.heads.PixelHead`; the conv's output channels are ordered (c, i, j) by
  PixelShuffle and are reordered to PixelHead's (i, j, c).
- MAE decoder (`decoder_embed`, `decoder_pos_embed`, `decoder_blocks.*`, `decoder_norm`,
  `decoder_pred`, `mask_token`) -> a param tree whose blocks use clmim.models.vit.Block's names
  ({'mask_token', 'embed', 'pos_embed', 'block_{i}', 'norm', 'pred'}) plus its sizes. Its
  `pred` output is already ordered (row, col, c) like `clmim.models.heads.patchify`.
Each result is {'variables' or 'params': ..., 'config': {...}} and is strictly accounted.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from clmim.checkpoints import native
from clmim.checkpoints.convert_common import Taker, block_params
from clmim.errors import ClmimError
from clmim.models import heads as heads_lib


def _sequential_mlp(group: dict, name: str, source: str) -> dict:
  take = Taker(group, f"{source} ({name})")
  linears = sorted(int(m.group(1)) for k, v in group.items()
                   for m in [re.fullmatch(r"(\d+)\.weight", k)]
                   if m and v.ndim == 2)
  if not linears:
    raise ClmimError(f"{source}: the {name} has no Linear layers.")
  params, stats = {}, {}
  last_bn = False
  for j, i in enumerate(linears):
    out_dim, in_dim = group[f"{i}.weight"].shape
    params[f"linear_{j}"] = {"kernel": take(f"{i}.weight", (out_dim, in_dim)).T}
    bn = f"{i + 1}."
    if f"{bn}running_mean" not in group:
      if j != len(linears) - 1:
        raise ClmimError(f"{source}: the {name}'s layer {i} has no BatchNorm after it.")
      continue
    stats[f"bn_{j}"] = {"mean": take(f"{bn}running_mean", (out_dim,)),
                        "var": take(f"{bn}running_var", (out_dim,))}
    take(f"{bn}num_batches_tracked", (), optional=True)  # only counts steps
    if j == len(linears) - 1:
      last_bn = True  # MoCo's last BN has affine=False; an affine one is reported unexpected
    else:
      params[f"bn_{j}"] = take.norm(f"{i + 1}", out_dim)
  take.check(f"the {name}")
  config = {"num_layers": len(linears), "hidden_dim": group[f"{linears[0]}.weight"].shape[0],
            "out_dim": group[f"{linears[-1]}.weight"].shape[0], "last_bn": last_bn}
  module = heads_lib.BatchNormMLP(**config)
  x = jax.ShapeDtypeStruct((2, group[f"{linears[0]}.weight"].shape[1]), jnp.float32)
  expected = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False), x)
  native.check_params(expected["params"], params, f"{source} ({name})")
  native.check_params(expected.get("batch_stats", {}), stats, f"{source} ({name} batch stats)")
  return {"variables": {"params": params, "batch_stats": stats}, "config": config}


def _simmim_decoder(group: dict, fields: dict, source: str) -> dict:
  take = Taker(group, f"{source} (decoder)")
  patch, width = fields["patch_size"], fields["width"]
  out = patch * patch * 3
  weight = take("0.weight", (out, width, 1, 1))[:, :, 0, 0]
  bias = take("0.bias", (out,))
  take.check("the SimMIM decoder")
  # PixelShuffle reads channel c*p*p + i*p + j into pixel (i, j) of colour c.
  weight = weight.reshape(3, patch, patch, width).transpose(1, 2, 0, 3).reshape(out, width)
  bias = bias.reshape(3, patch, patch).transpose(1, 2, 0).reshape(out)
  return {"params": {"linear": {"kernel": np.ascontiguousarray(weight.T), "bias": bias}},
          "config": {"patch_size": patch}}


def _mae_decoder(group: dict, fields: dict, source: str) -> dict:
  take = Taker(group, f"{source} (decoder)")
  if "decoder_embed.weight" not in group or "decoder_blocks.0.mlp.fc1.weight" not in group:
    raise ClmimError(f"{source}: the MAE decoder lacks decoder_embed / decoder_blocks.")
  dim, enc_width = group["decoder_embed.weight"].shape
  depth = len({int(m.group(1)) for k in group
               for m in [re.match(r"decoder_blocks\.(\d+)\.", k)] if m})
  patch = fields["patch_size"]
  grid = fields["image_size"] // patch
  # MAE's decoders use 16 heads at every size (models_mae.py: decoder_num_heads=16).
  f = dict(width=dim, mlp_dim=group["decoder_blocks.0.mlp.fc1.weight"].shape[0],
           block_style="timm", rel_pos_bias="none", num_heads=16, layer_scale_init=None)
  params = {"mask_token": take("mask_token", (1, 1, dim)),
            "embed": take.dense("decoder_embed", dim, enc_width),
            "pos_embed": take("decoder_pos_embed", (1, grid * grid + 1, dim)),
            "norm": take.norm("decoder_norm", dim),
            "pred": take.dense("decoder_pred", patch * patch * 3, dim)}
  for i in range(depth):
    params[f"block_{i}"] = block_params(take, f"decoder_blocks.{i}.", f, grid, source)
  take.check("the MAE decoder")
  return {"params": params, "config": {"width": dim, "depth": depth, "num_heads": 16,
                                       "mlp_dim": f["mlp_dim"], "patch_size": patch}}


def convert(family: str, name: str, group: dict, fields: dict, source: str) -> dict:
  """Converts one head group of a checkpoint (see the module docstring)."""
  if family == "moco_v3" and name in ("projector", "predictor"):
    return _sequential_mlp(group, name, source)
  if family == "simmim" and name == "decoder":
    return _simmim_decoder(group, fields, source)
  if family == "mae" and name == "decoder":
    return _mae_decoder(group, fields, source)
  raise ClmimError(f"{source}: clmim does not convert the {family} {name}.")
