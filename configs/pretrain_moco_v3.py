r"""MoCo v3 pretraining of a small ViT on the procedural shapes x textures images.

The demo checkpoint shipped in clmim/demo_checkpoints/moco_v3_demo was made with:

  python -m clmim.main --config configs/pretrain_moco_v3.py:demo --workdir runs/moco_v3_demo

A seconds-long smoke run: --config configs/pretrain_moco_v3.py:runlocal
Variants (the string after ':'): demo (default), runlocal.
"""
from clmim import config_lib


def get_config(arg: str = "demo"):
  """Returns the locked ConfigDict for variant `arg` ("demo" or "runlocal")."""
  config = config_lib.pretrain_base(arg, name="moco_v3_demo", objective="moco_v3", family="cl")
  config.model = config_lib.demo_model(block_style="timm", position_embedding="sincos")
  config.lr = 1e-3             # AdamW peak lr (the ViT-B recipe's 1.5e-4 x batch/256 is for 300 ep)
  config.weight_decay = 0.1
  config.moco = dict(
      hidden_dim=512,          # projector/predictor hidden width (4096 for ViT-B)
      out_dim=128,             # embedding width (256 for ViT-B)
      temperature=0.2,         # tau; each InfoNCE term is scaled by 2*tau
      momentum=0.96,           # EMA momentum at step 0, cosine to 1 (0.99 for ViT-B; slower)
      freeze_patch_embed=True, # MoCo v3's frozen random patch projection
  )
  config.augment = dict(
      crop_scale=(0.2, 1.0),   # random resized crop area range
      brightness=0.4, contrast=0.4, saturation=0.4,
      hue=0.5,                 # strong: random colours would otherwise be a shortcut
      jitter_prob=0.8,
      grayscale_prob=0.2,
      blur_prob=(1.0, 0.1),    # per view, as in BYOL/MoCo v3
      blur_sigma=(0.1, 1.0),   # pixels (at 32 px)
      solarize_prob=(0.0, 0.2),
      second_view="",          # what view 2 is rendered from: "" the same image; "background"
                               #   its object on another image's background; "restyle" the
                               #   same object with pose, background, colours and texture
                               #   parameters redrawn; "partial" each of those redrawn with
                               #   probability 1/2; "redraw:<factor>+..." only the named
                               #   factors (background, pose, texture, colours) drawn anew
                               #   (docs/miniature.md)
      second_view_ramp=(0, 0), # (start, end) steps: the share of pairs given second_view rises
                               #   from 0 at start to 1 at end (the rest: the same image);
                               #   (0, 0) = all pairs from step 0
  )
  return config_lib.finish(config, arg)
