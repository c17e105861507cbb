r"""SimMIM pretraining of a small BEiT-style ViT on the procedural shapes x textures images.

The demo checkpoint shipped in clmim/demo_checkpoints/simmim_demo (version 2) was made with:

  python -m clmim.main --config configs/pretrain_simmim.py:demo --workdir runs/simmim_demo

(10,000 steps at batch 64 on version 3 data: 2.5 min on one H100, ~1.4 h on 2 CPU cores.)

A seconds-long smoke run: --config configs/pretrain_simmim.py:runlocal
Variants (the string after ':'): demo (default), runlocal.
"""
from clmim import config_lib


def get_config(arg: str = "demo"):
  """Returns the locked ConfigDict for variant `arg` ("demo" or "runlocal")."""
  config = config_lib.pretrain_base(arg, name="simmim_demo", objective="simmim", family="mim")
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
  return config_lib.finish(config, arg)
