r"""MAE pretraining of a small ViT on the procedural shapes x textures images (He et al., 2022).

  python -m clmim.main --config configs/pretrain_mae.py --workdir runs/mae_demo

The demo recipe scales the official ViT-B/16 one (mask ratio 0.75, per-patch normalised pixel
targets, AdamW beta2 0.95, weight decay 0.05, crops (0.2, 1) + flip, fixed sin-cos positions,
timm blocks) down to the demo ViT: a decoder of width 64, depth 2, 4 heads (ViT-B's: 512, 8,
16), lr 1e-3 at batch 64 for 10,000 steps (the official 1.5e-4 x batch/256 is for 800 epochs of
ImageNet), 300 warm-up steps. No MAE demo checkpoint ships yet.
A seconds-long smoke run: configs/pretrain_mae.py:runlocal (named mae_demo_runlocal). Its
export keeps the decoder: `<workdir>/export?decoder=1` runs the decoder analysis on it.
Variants (the string after ':'): demo (default), runlocal, vitb16.

vitb16: the official ViT-B/16 ImageNet-1k recipe (He et al., 2022; main_pretrain.py with
`--model mae_vit_base_patch16 --norm_pix_loss --mask_ratio 0.75 --epochs 800 --warmup_epochs 40
--blr 1.5e-4 --weight_decay 0.05`, batch 4096): lr 1.5e-4 x 4096/256 = 2.4e-3, AdamW (0.9,
0.95), no gradient clipping, 800 epochs (250,228 steps) with 40 warm-up epochs, cosine to 0;
fixed sin-cos positions in encoder and decoder; decoder 512 wide, 8 blocks, 16 heads; crops
(0.2, 1) + flip. Departures from the official code: the crop is taken from the image resized
and centre-cropped to 224 px on the host (bilinear, not bicubic), not from the full-resolution
image; the patch-embedding kernel starts from flax's LeCun normal (MAE: Xavier-uniform over
the flattened kernel) and the cls token from N(0, 1e-6^2) (MAE: N(0, 0.02^2)).
"""
from clmim import config_lib


def get_config(arg: str = "demo"):
  """Returns the locked ConfigDict for variant `arg` ("demo", "runlocal" or "vitb16")."""
  config = config_lib.pretrain_base(arg, name="mae_demo", objective="mae", family="mim",
                                    variants=("demo", "runlocal", "vitb16"))
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
  if arg == "vitb16":
    config.name = "mae_vitb16"
    config.model = config_lib.demo_model(variant="B/16", block_style="timm",
                                         position_embedding="sincos")
    config_lib.imagenet_recipe(config, batch_size=4096, epochs=800, warmup_epochs=40,
                               base_lr=1.5e-4, lr_batch=256)
    config.final_lr_fraction = 0.0
    config.grad_clip = 0.0
    config.mae.update(decoder_width=512, decoder_depth=8, decoder_heads=16,
                      decoder_mlp_dim=2048)
  if arg == "runlocal":  # a seconds-long model must not take the demo model's name
    config.name += "_runlocal"
  return config_lib.finish(config, arg)
