r"""MAE pretraining of a small ViT on the procedural shapes x textures images (He et al., 2022).

  python -m clmim.main --config configs/pretrain_mae.py --workdir runs/mae_demo

The demo recipe scales the official ViT-B/16 one (mask ratio 0.75, per-patch normalised pixel
targets, AdamW beta2 0.95, weight decay 0.05, crops (0.2, 1) + flip, fixed sin-cos positions,
timm blocks) down to the demo ViT: a decoder of width 64, depth 2, 4 heads (ViT-B's: 512, 8,
16), lr 1e-3 at batch 64 for 10,000 steps (the official 1.5e-4 x batch/256 is for 800 epochs of
ImageNet), 300 warm-up steps. No MAE demo checkpoint ships yet.
A seconds-long smoke run: configs/pretrain_mae.py:runlocal.
Variants (the string after ':'): demo (default), runlocal.
"""
from clmim import config_lib


def get_config(arg: str = "demo"):
  """Returns the locked ConfigDict for variant `arg` ("demo" or "runlocal")."""
  config = config_lib.pretrain_base(arg, name="mae_demo", objective="mae", family="mim")
  config.model = config_lib.demo_model(block_style="timm", position_embedding="sincos")
  config.lr = 1e-3
  config.weight_decay = 0.05
  config.total_steps = 10000
  config.mae = dict(
      mask_ratio=0.75,         # share of patches hidden from the encoder (it sees the rest only)
      norm_pix_loss=True,      # targets: each patch's pixels normalised by its own mean and std
      decoder_width=64,        # decoder embedding width (512 for ViT-B)
      decoder_depth=2,         # decoder blocks (8 for ViT-B)
      decoder_heads=4,         # decoder attention heads (16 for ViT-B)
      decoder_mlp_dim=256,     # decoder MLP hidden width (4 x width, as MAE's)
      crop_scale=(0.2, 1.0),   # random resized crop area range (then a random flip)
  )
  return config_lib.finish(config, arg)
