r"""The CL + MIM hybrid, L = (1 - λ) L_SimMIM + λ L_MoCo v3, on the procedural images
(clmim/train/hybrid.py; the paper's Sec. 5 found λ = 0.5-ish beating either alone on ImageNet).

  python -m clmim.main --config configs/pretrain_hybrid.py --config.hybrid.weight=0.5 \
      --workdir runs/hybrid_0.5

The demo variant is MoCo v3's first demo stage (configs/pretrain_moco_v3.py:demo_stage1: its
views, curriculum, schedule, lr 1e-3, weight decay 0.1, projector and predictor) on an encoder
with SimMIM's mask token, plus SimMIM's demo masking (config.simmim). λ = 0 trains the SimMIM
branch alone on MoCo's architecture (timm blocks, sin-cos positions, frozen patch embedding),
λ = 1 MoCo v3 alone: the sweep's ends differ from the SimMIM demo model's BEiT-style ViT.
The λ sweep (one model per λ of config.sweep.weights, then probes, NMI and ΔlogA of all of them
and a figure against λ; clmim/jobs/sweep.py):

  python -m clmim.main --config configs/pretrain_hybrid.py --config.mode=sweep --workdir runs/sweep

A seconds-long smoke run: configs/pretrain_hybrid.py:runlocal (named hybrid_demo_runlocal).
Variants (the string after ':'): demo (default), runlocal, vitb16.

vitb16: a ViT-B/16 ImageNet-1k hybrid. The paper's authors did not publish their hybrid's
code or full recipe (a shared backbone, a ViT decoder for the MIM branch, a momentum ViT for
MoCo; a "short schedule"); this variant is MoCo v3's vitb16 recipe (configs/pretrain_moco_v3.py:
batch 4096, lr 2.4e-3, weight decay 0.1, momentum encoder, projector, predictor, views) for
100 epochs (31,279 steps, 10 warm-up epochs) on an encoder with a mask token, plus SimMIM's
vitb16 masking (32 px blocks, ratio 0.6, crops (0.67, 1)) and λ = 0.4, the best linear probe of
the paper's Fig. 12. Departures: MoCo v3's (see that file), and the MIM branch's head is
SimMIM's linear pixel head, not a ViT decoder.
"""
from clmim import config_lib
from configs import pretrain_moco_v3


def get_config(arg: str = "demo"):
  """Returns the locked ConfigDict for variant `arg` ("demo", "runlocal" or "vitb16")."""
  variants = {"demo": "demo_stage1", "runlocal": "runlocal", "vitb16": "vitb16"}
  if arg not in variants:
    raise ValueError(f"Unknown config variant {arg!r}; expected one of {tuple(variants)}.")
  config = pretrain_moco_v3.get_config(variants[arg])
  config.unlock()
  config.name = "hybrid_demo" + ("_runlocal" if arg == "runlocal" else "")
  config.objective = "hybrid"
  config.family = "other"          # neither CL nor MIM: figures colour it apart (the sweep's
                                   #   λ = 0 and λ = 1 models are "mim" and "cl")
  config.model.use_mask_token = True
  config.simmim = dict(
      mask_patch=8,            # mask block side in pixels (2x2 tokens at patch 4)
      mask_ratio=0.6,          # fraction of blocks masked
      crop_scale=(0.67, 1.0),  # the MIM branch's random resized crop area range
  )
  config.hybrid = dict(
      weight=0.5,              # λ in [0, 1]: L = (1 - λ) L_MIM + λ L_CL
  )
  config.sweep = dict(         # --config.mode=sweep only (clmim/jobs/sweep.py)
      weights=(0.0, 0.25, 0.5, 0.75, 1.0),  # the λ values, one model each
      analyses="probing,nmi,fourier",       # run over every λ's export and an untrained copy
      num_images=512,          # held-out procedural images per model
      num_train_images=4000,   # probes' training images
      seeds=1,                 # training seeds per λ (config.seed, +1, ...); > 1: sweep.json
                               #   and sweep.png report the mean and the spread over seeds
  )
  if arg == "vitb16":
    config.name = "hybrid_vitb16"
    config_lib.imagenet_recipe(config, batch_size=4096, epochs=100, warmup_epochs=10,
                               base_lr=1.5e-4, lr_batch=256)
    config.simmim.mask_patch = 32
    config.hybrid.weight = 0.4
  if arg == "runlocal":
    config.sweep.weights = (0.0, 1.0)
    config.sweep.num_images = 64
    config.sweep.num_train_images = 256
  config.lock()
  return config
