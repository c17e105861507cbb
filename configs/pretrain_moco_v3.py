r"""MoCo v3 pretraining of a small ViT on the procedural shapes x textures images.

The demo checkpoint shipped in clmim/demo_checkpoints/moco_v3_demo (version 2) was made in two
stages, the second starting from the first's export (docs/miniature.md, seventh round):

  # 1. a curriculum from two views of one image to views whose background and colours are
  #    redrawn (the object's pose and pattern shared): the run's first signal
  python -m clmim.main --config configs/pretrain_moco_v3.py:demo_stage1 \
      --workdir runs/moco_v3_demo_stage1
  # 2. from that encoder, views that share only the object's outline (pose, pattern, texture
  #    class, colours and background all redrawn): what teaches shape
  python -m clmim.main --config configs/pretrain_moco_v3.py:demo --workdir runs/moco_v3_demo

Each stage is 6,000 steps at batch 64 (2.5-3 min on one H100; ~1.7 h each on 2 CPU cores).
`demo`'s init_encoder is stage 1's export path above; point it elsewhere with
--config.init_encoder=<export>. A seconds-long smoke run: configs/pretrain_moco_v3.py:runlocal
(named moco_v3_demo_runlocal: never a shipped model's name).
Variants (the string after ':'): demo (default), demo_stage1, runlocal, vitb16.

vitb16: the official ViT-B/16 ImageNet-1k recipe (Chen et al., 2021; main_moco.py with
`--stop-grad-conv1 --moco-m-cos --moco-t=.2 --warmup-epochs=40 --epochs=300 --optimizer=adamw
--lr=1.5e-4 --weight-decay=.1`, batch 4096): lr 1.5e-4 x 4096/256 = 2.4e-3, AdamW (0.9, 0.999),
weight decay 0.1, 300 epochs (93,836 steps) with 40 warm-up epochs, cosine to 0, no gradient
clipping; momentum 0.99 -> 1 (cosine), tau 0.2, projector 768-4096-4096-256 and predictor
256-4096-256 with BatchNorm over the global batch; frozen random patch projection; fixed 2-D
sin-cos positions; both views: crops (0.08, 1), flip, colour jitter (0.4, 0.4, 0.2, 0.1) with
p 0.8, grayscale 0.2, blur 1.0 / 0.1 (sigma 0.1-2 px), solarise 0 / 0.2. Departures from the
official code: biases and norm parameters get no weight decay (clmim never decays vectors;
MoCo v3 decays every parameter); the qkv kernel is initialised as one Xavier-uniform matrix
(MoCo v3 draws q, k and v as three: clmim's bound is sqrt(2) smaller) and the patch projection with
flax's default, not MoCo v3's Xavier-uniform over its flattened kernel; the blur kernel is cut
at 3 px (torchvision's PIL blur reaches ~3 sigma = 6 px); the random resized crop is drawn once
per image, clipped to the image, where torchvision retries up to 10 times and falls back to a
centre crop; the crop is taken from the image resized and centre-cropped to 224 px on the
host, not from the full-resolution image.
"""
from clmim import config_lib

VARIANTS = ("demo", "demo_stage1", "runlocal", "vitb16")
STAGE1_EXPORT = "runs/moco_v3_demo_stage1/export"


def get_config(arg: str = "demo"):
  """Returns the locked ConfigDict for variant `arg` (one of VARIANTS)."""
  config = config_lib.pretrain_base(arg, name="moco_v3_demo", objective="moco_v3", family="cl",
                                    variants=VARIANTS)
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
                               #   factors (background, pose, texture, colours, texture_class)
                               #   drawn anew (docs/miniature.md)
      second_view_ramp=(0, 0), # (start, end) steps: the share of pairs given second_view rises
                               #   from 0 at start to 1 at end (the rest: the same image);
                               #   (0, 0) = all pairs from step 0
  )
  if arg == "demo_stage1":
    config.augment.second_view = "redraw:background+colours"
    config.augment.second_view_ramp = (300, 2000)
  if arg == "demo":
    config.init_encoder = STAGE1_EXPORT
    config.warmup_steps = 200
    config.augment.crop_scale = (0.6, 1.0)  # large crops keep the outline whole
    config.augment.second_view = "redraw:background+pose+texture+colours+texture_class"
    config.augment.second_view_ramp = (0, 1000)
  if arg == "vitb16":
    config.name = "moco_v3_vitb16"
    config.model = config_lib.demo_model(variant="B/16", block_style="timm",
                                         position_embedding="sincos")
    config_lib.imagenet_recipe(config, batch_size=4096, epochs=300, warmup_epochs=40,
                               base_lr=1.5e-4, lr_batch=256)
    config.final_lr_fraction = 0.0
    config.beta2 = 0.999
    config.grad_clip = 0.0
    config.moco.update(hidden_dim=4096, out_dim=256, momentum=0.99)
    config.augment.update(crop_scale=(0.08, 1.0), saturation=0.2, hue=0.1,
                          blur_sigma=(0.1, 2.0))
  if arg == "runlocal":  # a seconds-long model must not take the demo model's name
    config.name += "_runlocal"
  return config_lib.finish(config, arg)
