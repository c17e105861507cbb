"""PyTorch parity of the checkpoint converters, one family at a time.

Each test builds a randomly initialised PyTorch reference written from the definitions in
docs/checkpoints.md (timm-style and BEiT-style blocks, attention written out so the probabilities
can be returned, exact GELU, LayerNorm eps 1e-6; BEiT: q*scale first, + relative position bias,
layer scale), saves it with torch.save in the family's official layout (prefixes, nesting,
optimizer, a yacs-like config, an argparse.Namespace), loads it through clmim and compares per
layer: attention probabilities to 1e-5 absolute, residual states to 1e-4 relative.
"""
import argparse
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clmim.checkpoints import converters, registry
from clmim.errors import ClmimError
from clmim.models import heads as heads_lib
from clmim.models.vit import Block, forward_with_states

torch = pytest.importorskip("torch")
nn = torch.nn

WIDTH, DEPTH, HEADS, MLP, PATCH, IMAGE = 128, 2, 4, 256, 8, 32  # 'mu' width: 4 heads
GRID = IMAGE // PATCH


def _rel_index(grid):
  """BEiT's relative position index, written from the formula in docs/checkpoints.md (SimMIM)."""
  rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
  coords = torch.stack([rows.flatten(), cols.flatten()])
  rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)
  table_rows = (2 * grid - 1) ** 2 + 3
  index = torch.zeros((grid * grid + 1,) * 2, dtype=torch.long)
  index[1:, 1:] = rel[..., 0] * (2 * grid - 1) + rel[..., 1]
  index[0, :], index[:, 0], index[0, 0] = table_rows - 3, table_rows - 2, table_rows - 1
  return index


def _sincos(grid, dim, row_first=True):
  """MoCo v3's table (row index first); MAE's has the two halves swapped."""
  omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
  rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                              torch.arange(grid, dtype=torch.float32), indexing="ij")
  enc = lambda p: torch.cat([torch.sin(p.flatten()[:, None] * omega),
                             torch.cos(p.flatten()[:, None] * omega)], 1)
  halves = [enc(rows), enc(cols)] if row_first else [enc(cols), enc(rows)]
  return torch.cat([torch.zeros(1, dim), torch.cat(halves, 1)])[None]


class Attention(nn.Module):
  def __init__(self, dim, heads, beit):
    super().__init__()
    self.heads, self.beit = heads, beit
    self.qkv = nn.Linear(dim, 3 * dim, bias=not beit)
    if beit:
      self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, rel_bias=None):
    b, n, c = x.shape
    if self.beit:
      bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
      qkv = nn.functional.linear(x, self.qkv.weight, bias)
    else:
      qkv = self.qkv(x)
    q, k, v = qkv.reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    scale = (c // self.heads) ** -0.5
    attn = (q * scale) @ k.transpose(-2, -1) if self.beit else (q @ k.transpose(-2, -1)) * scale
    if rel_bias is not None:
      attn = attn + rel_bias[None]
    attn = attn.softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)), attn


class TorchBlock(nn.Module):
  def __init__(self, dim, heads, mlp, beit):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads, beit)
    self.mlp = nn.Sequential()
    self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim)
    if beit:
      self.gamma_1, self.gamma_2 = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
    self.beit = beit

  def forward(self, x, rel_bias=None):
    y, attn = self.attn(self.norm1(x), rel_bias)
    x1 = x + (self.gamma_1 * y if self.beit else y)
    y = self.mlp(self.norm2(x1))
    return x1 + (self.gamma_2 * y if self.beit else y), x1, attn


class RelPosBias(nn.Module):
  def __init__(self, grid, heads):
    super().__init__()
    self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3, heads))
    self.register_buffer("relative_position_index", _rel_index(grid))

  def forward(self):
    n = self.relative_position_index.shape[0]
    table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
    return table.view(n, n, -1).permute(2, 0, 1)


class TorchViT(nn.Module):
  """timm-style (pos_embed, fused qkv bias) or BEiT-style (shared RPB, q/v bias, gammas)."""

  def __init__(self, beit=False, pos=None, mask_token=False, width=WIDTH, heads=HEADS):
    super().__init__()
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, width, PATCH, PATCH)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    if mask_token:
      self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
    if pos is not None:
      self.pos_embed = nn.Parameter(pos, requires_grad=False)
    if beit:
      self.rel_pos_bias = RelPosBias(GRID, heads)
    self.blocks = nn.ModuleList([TorchBlock(width, heads, MLP, beit) for _ in range(DEPTH)])
    self.norm = nn.LayerNorm(width, eps=1e-6)
    self.beit = beit

  def forward(self, images):
    x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
    if hasattr(self, "pos_embed"):
      x = x + self.pos_embed
    zs, attns = [x], []
    rel_bias = self.rel_pos_bias() if self.beit else None
    for block in self.blocks:
      x, x1, attn = block(x, rel_bias)
      zs += [x1, x]
      attns.append(attn)
    return self.norm(x), zs, attns


def _mlp(layers, in_dim, hidden, out_dim):
  """MoCo v3's `_build_mlp` (Linear no bias, BN, ReLU; the last BN without affine)."""
  mods = []
  for i in range(layers):
    last = i == layers - 1
    mods.append(nn.Linear(in_dim if i == 0 else hidden, out_dim if last else hidden, bias=False))
    if not last:
      mods += [nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
    else:
      mods.append(nn.BatchNorm1d(out_dim, affine=False))
  return nn.Sequential(*mods)


def _randomize(module, seed):
  """Non-trivial values everywhere (biases, norms, gammas, tables, BN statistics)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("pos_embed") and not p.requires_grad:
        continue  # fixed sin-cos tables stay as built
      if p.ndim <= 1 or "token" in name or "table" in name or "pos_embed" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.3
                + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
      else:
        p.mul_(1.5)
    for name, b in module.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
      elif name.endswith("running_var"):
        b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
  return module.eval()


def _images(seed=0):
  return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def _compare(ref, model_vit, params, images):
  """Per-layer parity; returns the worst (attention abs, state rel) errors."""
  with torch.no_grad():
    out, zs, attns = ref(images)
  x = jnp.asarray(images.numpy().transpose(0, 2, 3, 1))
  # One jitted program, as the analyses run the model (op by op, each operation compiles on
  # its own).
  (jzs, jattns), final = jax.jit(lambda p, x: (forward_with_states(model_vit, p, x),
                                               model_vit.apply({"params": p}, x)))(params, x)
  worst_attn = worst_state = 0.0
  for i, (a, b) in enumerate(zip(attns, jattns)):
    err = float(np.abs(a.numpy() - np.asarray(b)).max())
    assert err <= 1e-5, f"layer {i}: attention differs by {err}"
    worst_attn = max(worst_attn, err)
  assert len(zs) == len(jzs) == 2 * DEPTH + 1
  for i, (a, b) in enumerate(zip(zs, jzs)):
    ref_state = a.numpy()
    err = float(np.abs(ref_state - np.asarray(b)).max() / np.abs(ref_state).max())
    assert err <= 1e-4, f"state {i}: relative error {err}"
    worst_state = max(worst_state, err)
  np.testing.assert_allclose(np.asarray(final), out.numpy(), atol=1e-4 * np.abs(out.numpy()).max())
  return worst_attn, worst_state


def _adamw_state(module):
  opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
  for p in module.parameters():
    p.grad = torch.zeros_like(p)
  opt.step()
  return opt.state_dict()


@pytest.fixture
def yacs(monkeypatch):
  """A yacs-like CfgNode class importable as yacs.config.CfgNode (yacs is not installed)."""
  module = types.ModuleType("yacs.config")

  class CfgNode(dict):
    def __getattr__(self, key):
      return self[key]

  CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
  module.CfgNode = CfgNode
  monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
  monkeypatch.setitem(sys.modules, "yacs.config", module)
  return CfgNode


def _moco(path, width=WIDTH, heads=HEADS):
  class MoCo(nn.Module):
    def __init__(self):
      super().__init__()
      self.base_encoder = TorchViT(pos=_sincos(GRID, width, True), width=width, heads=heads)
      self.base_encoder.head = _mlp(3, width, 96, 48)
      self.momentum_encoder = TorchViT(pos=_sincos(GRID, width, True), width=width, heads=heads)
      self.momentum_encoder.head = _mlp(3, width, 96, 48)
      self.predictor = _mlp(2, 48, 96, 48)

  moco = _randomize(MoCo(), 1)
  torch.save({"epoch": 300, "arch": "vit_base",
              "state_dict": {f"module.{k}": v for k, v in moco.state_dict().items()},
              "optimizer": _adamw_state(moco), "scaler": {"scale": 65536.0, "_growth_tracker": 3}},
             path)
  return moco


def test_moco_v3_parity_and_heads(tmp_path):
  path = str(tmp_path / "vit-b-300ep.pth.tar")
  moco = _moco(path)
  # Family detected from the layout; timm-style files do not store the head count, and width
  # 128 is not a MoCo v3 size, so the spec says it.
  model = registry.resolve(f"{path}?num_heads={HEADS}")
  assert model.family == "cl" and model.info["method"] == "moco_v3"
  assert model.info["architecture_from"]["num_heads"] == f"user (num_heads={HEADS})"
  assert "family" not in model.info  # it would shadow Model.family in results.json
  assert model.preprocessing == {"image_size": IMAGE, "mean": "imagenet", "std": "imagenet",
                                 "interpolation": "bilinear", "crop_pct": 0.875}
  assert "row_first" in model.info["pos_embed"]
  assert model.info["dropped"]["momentum_encoder"] > 0 and model.vit.num_heads == HEADS
  _compare(moco.base_encoder, model.vit, model.params, _images())

  converted = converters.load(path, "moco_v3", with_heads=True, num_heads=HEADS)
  with torch.no_grad():
    out, _, _ = moco.base_encoder(_images())
    proj = moco.base_encoder.head(out[:, 0])
    pred = moco.predictor(proj)
  cls = jax.jit(converted.vit.apply)({"params": converted.params}, jnp.asarray(
      _images().numpy().transpose(0, 2, 3, 1)))[:, 0]
  for name, ref, x in (("projector", proj, cls), ("predictor", pred, proj.numpy())):
    head = converted.heads[name]
    got = heads_lib.BatchNormMLP(**head["config"]).apply(head["variables"], x, train=False)
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), atol=1e-4, rtol=1e-4)


def unpatchify(patches, patch_size: int, grid: int):
  """The pixels of SimMIM / MAE patch predictions, [B, N, p*p*3] -> [B, S, S, 3]: the inverse
  of `clmim.models.heads.patchify` for a square grid (test_decoder uses it too)."""
  batch = patches.shape[0]
  x = np.asarray(patches).reshape(batch, grid, grid, patch_size, patch_size, 3)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid * patch_size, grid * patch_size, 3)



def test_simmim_parity_decoder_and_config(tmp_path, yacs):
  class SimMIM(nn.Module):
    def __init__(self):
      super().__init__()
      self.encoder = TorchViT(beit=True, mask_token=True)
      self.decoder = nn.Sequential(nn.Conv2d(WIDTH, PATCH * PATCH * 3, 1), nn.PixelShuffle(PATCH))

  simmim = _randomize(SimMIM(), 2)
  config = yacs(MODEL=yacs(VIT=yacs(DEPTH=DEPTH, NUM_HEADS=HEADS, USE_SHARED_RPB=True)))
  path = str(tmp_path / "simmim_pretrain__vit_base__img224__800ep.pth")
  torch.save({"model": simmim.state_dict(), "optimizer": _adamw_state(simmim),
              "lr_scheduler": {"last_epoch": 799}, "max_accuracy": 0.0, "epoch": 799,
              "config": config}, path)
  model = registry.resolve(f"simmim:{path}")
  assert model.family == "mim" and model.preprocessing["interpolation"] == "bicubic"
  assert model.info["dropped"] == {"mask_token": 1, "decoder": 2}
  _compare(simmim.encoder, model.vit, model.params, _images(1))

  converted = converters.load(path, "simmim", with_heads=True)
  assert converted.vit.use_mask_token
  np.testing.assert_array_equal(converted.params["mask_token"],
                                simmim.encoder.mask_token.detach().numpy())
  with torch.no_grad():
    tokens, _, _ = simmim.encoder(_images(1))
    grid_tokens = tokens[:, 1:].transpose(1, 2).reshape(2, WIDTH, GRID, GRID)
    pixels = simmim.decoder(grid_tokens).numpy().transpose(0, 2, 3, 1)
  head = converted.heads["decoder"]
  patches = heads_lib.PixelHead(PATCH).apply({"params": head["params"]}, tokens[:, 1:].numpy())
  np.testing.assert_allclose(np.asarray(unpatchify(patches, PATCH, GRID)), pixels,
                             atol=1e-4, rtol=1e-4)


def test_mae_parity_and_decoder(tmp_path):
  dec_width, dec_heads = 32, 16

  class MAE(TorchViT):
    def __init__(self):
      super().__init__(pos=_sincos(GRID, WIDTH, row_first=False))
      self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_width))
      self.decoder_embed = nn.Linear(WIDTH, dec_width)
      self.decoder_pos_embed = nn.Parameter(_sincos(GRID, dec_width, False), requires_grad=False)
      self.decoder_blocks = nn.ModuleList([TorchBlock(dec_width, dec_heads, 64, False)
                                           for _ in range(2)])
      self.decoder_norm = nn.LayerNorm(dec_width, eps=1e-6)
      self.decoder_pred = nn.Linear(dec_width, PATCH * PATCH * 3)

  mae = _randomize(MAE(), 3)
  path = str(tmp_path / "mae_pretrain_vit_base_full.pth")
  torch.save({"model": mae.state_dict()}, path)
  model = registry.resolve(f"{path}?num_heads={HEADS}")
  assert model.info["method"] == "mae" and "col_first" in model.info["pos_embed"]
  _compare(mae, model.vit, model.params, _images(2))

  decoder = converters.load(path, with_heads=True, num_heads=HEADS).heads["decoder"]
  with torch.no_grad():
    latent, _, _ = mae(_images(2))
    x = mae.decoder_embed(latent) + mae.decoder_pos_embed
    for block in mae.decoder_blocks:
      x = block(x)[0]
    ref = mae.decoder_pred(mae.decoder_norm(x))[:, 1:].numpy()
  p, cfg = decoder["params"], decoder["config"]
  x = latent.numpy() @ p["embed"]["kernel"] + p["embed"]["bias"] + p["pos_embed"]
  for i in range(cfg["depth"]):
    x = Block(cfg["num_heads"], cfg["mlp_dim"]).apply({"params": p[f"block_{i}"]}, x)
  x = jax.nn.standardize(x, epsilon=1e-6) * p["norm"]["scale"] + p["norm"]["bias"]
  got = (x @ p["pred"]["kernel"] + p["pred"]["bias"])[:, 1:]
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=1e-4)


def test_dino_backbone_and_full_checkpoint(tmp_path):
  learned = lambda: torch.randn(1, GRID * GRID + 1, WIDTH) * 0.3  # random = "learned"
  teacher = _randomize(TorchViT(pos=learned()), 4)
  student = _randomize(TorchViT(pos=learned()), 5)
  backbone = str(tmp_path / "dino_vitbase16_pretrain.pth")
  torch.save(teacher.state_dict(), backbone)
  model = registry.resolve(f"{backbone}?num_heads={HEADS}")
  assert model.info["method"] == "dino" and model.info["pos_embed"] == "learned"
  _compare(teacher, model.vit, model.params, _images(3))
  untrained = registry.resolve(f"random:{backbone}?num_heads={HEADS}")
  assert untrained.family == "random" and untrained.vit == model.vit
  assert jax.tree.structure(untrained.params) == jax.tree.structure(model.params)

  head = {"mlp.0.weight": torch.randn(32, WIDTH), "mlp.0.bias": torch.randn(32),
          "last_layer.weight_g": torch.ones(100, 1), "last_layer.weight_v": torch.randn(100, 32)}
  full = str(tmp_path / "dino_vitbase16_pretrain_full_checkpoint.pth")
  torch.save({
      "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                  **{f"module.head.{k}": v for k, v in head.items()}},
      "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                  **{f"head.{k}": v for k, v in head.items()}},
      "optimizer": _adamw_state(student), "epoch": 400,
      "dino_loss": {"center": torch.zeros(1, 100)},
      "args": argparse.Namespace(arch="vit_base", patch_size=PATCH, out_dim=100)}, full)
  model = registry.resolve(f"dino:{full}?num_heads={HEADS}")
  assert model.info["dropped"] == {"head": 4} and model.info["checkpoint"]["part"] == "teacher"
  _compare(teacher, model.vit, model.params, _images(3))
  student_model = converters.load(full, "dino", dino_part="student", num_heads=HEADS)
  _compare(student, student_model.vit, student_model.params, _images(3))


def test_head_count_not_in_the_file_is_asked_for(tmp_path):
  """A width-96, 3-head MoCo v3 file: 96 is no MoCo v3 size, and timm-style files do not store
  the head count, so loading is refused until the spec says `?num_heads=3`."""
  path = str(tmp_path / "vit-tiny.pth.tar")
  moco = _moco(path, width=96, heads=3)
  with pytest.raises(ClmimError, match=r"does not store the number of attention heads and "
                                       r"width 96 is not a moco_v3 model size.*\?num_heads=N"):
    registry.resolve(f"moco_v3:{path}")
  model = registry.resolve(f"moco_v3:{path}?num_heads=3&name=tiny")
  assert model.name == "tiny" and model.vit.num_heads == 3
  assert model.info["architecture_from"]["num_heads"] == "user (num_heads=3)"
  assert model.info["architecture_from"]["width"] == "file (cls_token)"
  _compare(moco.base_encoder, model.vit, model.params, _images())
  with pytest.raises(ClmimError, match="contradict the requested variant 'S/16'"):
    registry.resolve(f"{path}?variant=S/16")


def test_beit_parity(tmp_path):
  beit = TorchViT(beit=True, mask_token=True)
  beit.lm_head = nn.Linear(WIDTH, 100)
  beit = _randomize(beit, 6)
  path = str(tmp_path / "beit_base_patch16_224_pt22k.pth")
  torch.save({"model": beit.state_dict()}, path)
  model = registry.resolve(path)
  assert model.info["method"] == "beit" and model.preprocessing["mean"] == "half"
  assert model.info["dropped"] == {"mask_token": 1, "lm_head": 2}
  _compare(beit, model.vit, model.params, _images(4))


def test_beit_v2_drops_its_cls_pretraining_layers(tmp_path):
  """BEiT v2's pretraining files add `cls_pt_layers` (the extra blocks of its patch-aggregation
  objective) beside the BEiT encoder; they are not part of the analysed encoder."""
  beit = _randomize(TorchViT(beit=True, mask_token=True), 7)
  extra = {f"cls_pt_layers.0.{k}": torch.zeros(WIDTH) for k in ("norm1.weight", "norm1.bias")}
  path = str(tmp_path / "beitv2_base_patch16_224_pt1k.pth")
  torch.save({"model": {**beit.state_dict(), **extra}}, path)
  model = registry.resolve(path)
  assert model.info["dropped"] == {"mask_token": 1, "cls_pt_layers": 2}
  _compare(beit, model.vit, model.params, _images(4))


def test_wrong_family_variant_and_accounting_errors(tmp_path):
  beit = _randomize(TorchViT(beit=True), 7)
  path = str(tmp_path / "beit.pth")
  torch.save({"model": beit.state_dict()}, path)
  with pytest.raises(ClmimError, match=r"not a moco_v3 checkpoint.*looks like a beit checkpoint"):
    registry.resolve(f"moco_v3:{path}")
  with pytest.raises(ClmimError, match=r"not a mae checkpoint.*BEiT-style"):
    converters.load(path, "mae")
  with pytest.raises(ClmimError, match=r"contradict the requested variant 'B/16': width 128 "
                                       r"\(variant 768\), depth 2 \(variant 12\)"):
    converters.load(path, "beit", variant="B/16")
  sd = beit.state_dict()
  sd.pop("blocks.1.mlp.fc2.bias")
  sd["blocks.0.attn.extra"] = torch.zeros(3)
  sd["blocks.0.attn.proj.weight"] = torch.zeros(WIDTH, WIDTH + 1)
  torch.save({"model": sd}, path)
  with pytest.raises(ClmimError, match=r"missing \['blocks.1.mlp.fc2.bias'\]; unexpected "
                                       r"\['blocks.0.attn.extra'\]; wrong shapes "
                                       r"\['blocks.0.attn.proj.weight: \(128, 129\)"):
    converters.load(path, "beit")
  sd = dict(beit.state_dict())
  sd["rel_pos_bias.relative_position_index"] = sd["rel_pos_bias.relative_position_index"].T
  torch.save({"model": sd}, path)
  with pytest.raises(ClmimError, match="differs from the standard BEiT index"):
    converters.load(path, "beit")
