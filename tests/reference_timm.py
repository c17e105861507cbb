"""timm as a test-only reference, and the generator of clmim's table of timm architectures.

timm imports torchvision, and the only torchvision wheels this project's package index offers are
CUDA builds whose compiled operators cannot register against the CPU torch the tests pin (import
fails in torchvision's fake-kernel registrations for nms / roi_align). timm's VisionTransformer
never calls those operators, so torchvision's Python code is imported with the fake-kernel
registrations of its missing `torchvision::` operators skipped, and nothing else changed; the ViT
forward the parity tests compare with is timm's own code.

Run `python tests/reference_timm.py` to rewrite clmim/checkpoints/timm_architectures.json from the
installed timm (the facts a timm hub checkpoint leaves out of its files: heads, LayerNorm epsilon,
activation, whether the position table covers the prefix tokens).
"""
import json
import os
import sys

TABLE = os.path.join(os.path.dirname(__file__), os.pardir, "clmim", "checkpoints",
                     "timm_architectures.json")


class _TorchvisionWithoutCompiledOps:
  """A meta-path finder that imports torchvision with the fake-kernel registrations of its
  missing compiled operators skipped (see the module docstring). Installed from conftest.py so
  that every import of torchvision -- timm's, and transformers' own when it finds torchvision
  installed -- goes through it; it costs nothing until torchvision is imported."""

  def find_spec(self, name, path=None, target=None):
    if name != "torchvision":
      return None
    import importlib.machinery
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None:
      return None
    exec_module = spec.loader.exec_module

    def exec_without_compiled_ops(module):
      import torch.library
      register_fake = torch.library.register_fake

      def skip_missing_vision_ops(op, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::"):
          return lambda fn: fn
        return register_fake(op, *args, **kwargs)

      torch.library.register_fake = skip_missing_vision_ops
      try:
        exec_module(module)
      finally:
        torch.library.register_fake = register_fake

    spec.loader.exec_module = exec_without_compiled_ops
    return spec


def install_torchvision_import_fix():
  """Routes later imports of torchvision through `_TorchvisionWithoutCompiledOps` (idempotent)."""
  if not any(isinstance(f, _TorchvisionWithoutCompiledOps) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionWithoutCompiledOps())


def import_timm():
  """timm (and torch), or pytest's skip when either is not installed."""
  import pytest
  install_torchvision_import_fix()
  torch = pytest.importorskip("torch")
  pytest.importorskip("torchvision")
  return pytest.importorskip("timm"), torch


def describe(model):
  """The table row of an instantiated timm model, or None when clmim's ViT cannot express it
  (hybrid stems, qk-norm, RMSNorm, parallel or differential blocks, other MLPs)."""
  import torch
  from timm.layers import GluMlp, LayerScale, Mlp, PatchEmbed
  from timm.models.vision_transformer import Attention, Block, VisionTransformer
  nn = torch.nn
  if type(model) is not VisionTransformer or type(model.patch_embed) is not PatchEmbed:
    return None
  proj = model.patch_embed.proj
  if not isinstance(model.patch_embed.norm, nn.Identity) or proj.kernel_size != proj.stride:
    return None
  norms = [model.norm_pre, model.norm]
  activations = set()
  for block in model.blocks:
    if type(block) is not Block or type(block.attn) is not Attention:
      return None
    attn, mlp = block.attn, block.mlp
    if not all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm,
                                                   mlp.norm)):
      return None
    if not all(isinstance(m, (nn.Identity, LayerScale)) for m in (block.ls1, block.ls2)):
      return None
    if type(mlp) is Mlp and type(mlp.act).__name__ in ("GELU", "GELUTanh", "QuickGELU"):
      activations.add({"GELU": "gelu", "GELUTanh": "gelu_tanh",
                       "QuickGELU": "quick_gelu"}[type(mlp.act).__name__])
    elif type(mlp) is GluMlp and type(mlp.act) is nn.SiLU and not mlp.gate_last:
      activations.add("swiglu")
    else:
      return None
    norms += [block.norm1, block.norm2]
  used = [n for n in norms if not isinstance(n, nn.Identity)]
  if any(type(n).__name__ != "LayerNorm" for n in used) or len({n.eps for n in used}) != 1 \
      or len(activations) != 1:
    return None
  return {"num_heads": model.blocks[0].attn.num_heads, "norm_epsilon": used[0].eps,
          "mlp_activation": activations.pop(), "no_embed_class": bool(model.no_embed_class),
          "global_pool": model.global_pool}


def table_from_timm():
  """{architecture: row} for every timm `vit_*` architecture clmim's ViT can express."""
  timm, torch = import_timm()
  rows = {}
  for name in timm.list_models("vit_*"):
    with torch.device("meta"):
      row = describe(timm.create_model(name, pretrained=False))
    if row:
      rows[name] = row
  return {"timm_version": timm.__version__, "architectures": rows}


if __name__ == "__main__":
  table = table_from_timm()
  rows = [f" {json.dumps(name)}: {json.dumps(row, sort_keys=True)}"
          for name, row in sorted(table["architectures"].items())]
  with open(TABLE, "w") as f:  # one architecture per line: reviewable diffs
    f.write(f'{{"timm_version": {json.dumps(table["timm_version"])},\n"architectures": {{\n'
            + ",\n".join(rows) + "\n}}\n")
  print(f"{len(table['architectures'])} architectures from timm {table['timm_version']} -> "
        f"{os.path.normpath(TABLE)}")
