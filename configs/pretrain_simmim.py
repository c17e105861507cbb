r"""SimMIM pretraining of a small BEiT-style ViT on the procedural shapes x textures images.

The demo checkpoint shipped in clmim/demo_checkpoints/simmim_demo (version 2) was made with:

  python -m clmim.main --config configs/pretrain_simmim.py:demo --workdir runs/simmim_demo

(10,000 steps at batch 64 on version 3 data: 2.5 min on one H100, ~1.4 h on 2 CPU cores.)

A seconds-long smoke run: --config configs/pretrain_simmim.py:runlocal (named
simmim_demo_runlocal: never a shipped model's name). Exports keep the pixel head:
`<workdir>/export?decoder=1` runs the decoder analysis on it.
Variants (the string after ':'): demo (default), runlocal, vitb16.

vitb16: the official ViT-B/16 ImageNet-1k recipe (Xie et al., 2022;
simmim_pretrain__vit_base__img224__800ep.yaml): batch 2048, lr 1e-4 x 2048/512 = 4e-4, AdamW
(0.9, 0.999), weight decay 0.05 (none on biases, norms, position tables, layer scales), gradient
clipping 5.0, 800 epochs (500,456 steps) with 10 warm-up epochs; BEiT blocks with layer scale
0.1, a shared relative position bias, no absolute positions, drop path 0.1; 32 px mask blocks,
ratio 0.6; crops (0.67, 1) + flip. Departures from the official code: the lr decays along a
cosine to 1 % of its peak, where SimMIM holds it and divides it by 10 at epoch 700; the warm-up
starts from 0, not from 2e-6; the crop is taken from the image resized and centre-cropped to
224 px on the host, not from the full-resolution image.
"""
from clmim import config_lib


def get_config(arg: str = "demo"):
  """Returns the locked ConfigDict for variant `arg` ("demo", "runlocal" or "vitb16")."""
  config = config_lib.pretrain_base(arg, name="simmim_demo", objective="simmim", family="mim",
                                    variants=("demo", "runlocal", "vitb16"))
  # SimMIM's ViT: BEiT blocks, shared relative position bias, layer scale 0.1, no abs. position.
  config.model = config_lib.demo_model(block_style="beit", position_embedding="none",
                                       rel_pos_bias="shared", layer_scale_init=0.1,
                                       use_mask_token=True)
  config.lr = 1e-3
  config.weight_decay = 0.05
  config.total_steps = 10000
  config.checkpoint_every = 500  # 20 checkpoints: all of them within keep_checkpoints (30)
  config.simmim = dict(
      mask_patch=8,            # mask block side in pixels (32 at 224 px; here 2x2 tokens)
      mask_ratio=0.6,          # fraction of blocks masked
      crop_scale=(0.67, 1.0),  # random resized crop area range
  )
  if arg == "vitb16":
    config.name = "simmim_vitb16"
    config.model = config_lib.demo_model(variant="B/16", block_style="beit",
                                         position_embedding="none", rel_pos_bias="shared",
                                         layer_scale_init=0.1, use_mask_token=True,
                                         drop_path=0.1)
    config_lib.imagenet_recipe(config, batch_size=2048, epochs=800, warmup_epochs=10,
                               base_lr=1e-4, lr_batch=512)
    config.beta2 = 0.999
    config.grad_clip = 5.0
    config.simmim.mask_patch = 32
  if arg == "runlocal":  # a seconds-long model must not take the demo model's name
    config.name += "_runlocal"
  return config_lib.finish(config, arg)
