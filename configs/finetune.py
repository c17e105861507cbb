r"""Supervised fine-tuning of a pretrained ViT (clmim/train/finetune.py), the MAE/BEiT recipe.

  python -m clmim.main --config configs/finetune.py --workdir runs/ft_moco
  python -m clmim.main --config configs/finetune.py --workdir runs/ft_simmim \
      --config.init_encoder=simmim_demo
  python -m clmim.main --config configs/finetune.py:vitb16 --workdir runs/ft_mae_b16 \
      --config.data.data_dir=/data/tensorflow_datasets

Variants (the string after ':'):
  demo (default): the shipped moco_v3_demo encoder fine-tuned on the procedural images' shape
    labels (4 classes, version 3), 1,000 steps at batch 64; held-out accuracy on 1,000
    validation images. `--config.init_encoder=simmim_demo` fine-tunes the SimMIM model, and
    `--config.init_encoder=''` trains the same ViT from scratch (the baseline that says what
    pretraining added). The recipe is MAE's scaled to a 6-block, 32 px ViT: lr 1e-3 at batch
    64 (MAE: 5e-4 x batch/256 for 100 ImageNet epochs), layer decay 0.75 (MAE ViT-B: 0.65 for
    12 blocks), crops (0.35, 1) (MAE: (0.08, 1), which at 32 px often crops the object away).
  runlocal: a seconds-long smoke run of the demo recipe (a 2-block ViT from scratch), named
    finetune_demo_runlocal.
  vitb16: MAE's ViT-B/16 ImageNet-1k fine-tuning (He et al., 2022, Table 9 / main_finetune.py)
    from the official MAE encoder (`mae_vitb16`, downloaded on first use): batch 1024, lr 5e-4
    x 1024/256 = 2e-3, AdamW (0.9, 0.999), weight decay 0.05, layer decay 0.65, 100 epochs
    (125,114 steps) with 5 warm-up epochs, cosine to 1e-6, drop path 0.1, Mixup 0.8, CutMix
    1.0, label smoothing 0.1, global pooling (mean + LayerNorm), head init std 2e-5, no
    gradient clipping; TFDS imagenet2012 (prepared as array_record), validation at crop 0.875.
    Departures from the official code: no RandAugment (rand-m9-mstd0.5-inc1) and no random
    erasing (0.25), the two augmentations clmim does not implement; the random resized crop is
    taken from the image already resized and centre-cropped to 224 px on the host, not from the
    full-resolution image; the pooled tokens have passed the encoder's final LayerNorm (MAE
    drops it when it pools). Expect a lower top-1 than MAE's 83.6 % by an amount nobody has
    measured yet.
"""
from clmim import config_lib


def get_config(arg: str = "demo"):
  """Returns the locked ConfigDict for variant `arg` ("demo", "runlocal" or "vitb16")."""
  config = config_lib.pretrain_base(arg, name="finetune_demo",
                                    objective="finetune", family="other",
                                    variants=("demo", "runlocal", "vitb16"))
  config.mode = "finetune"
  config.init_encoder = "moco_v3_demo"
  # With an init_encoder its architecture is used and only model.drop_path applies; config.model
  # is the architecture of a run from scratch (init_encoder="").
  config.model = config_lib.demo_model(drop_path=0.1)
  config.total_steps = 1000
  config.warmup_steps = 100
  config.lr = 1e-3
  config.beta2 = 0.999
  config.weight_decay = 0.05
  config.grad_clip = 0.0
  config.final_lr_fraction = 0.001
  config.log_every = 50
  config.checkpoint_every = 250
  config.keep_checkpoints = 3
  config.finetune = dict(
      label="shape",            # what is classified: synthetic "shape" or "texture"; real
                                #   sources (image_folder, tfds) "label", their class label
      pool="mean",              # classifier input: "mean" of the patch tokens + a LayerNorm
                                #   (MAE's global pool) or the "cls" token
      head_init_std=2e-5,       # std of the head's truncated-normal initial weights (MAE's)
      layer_decay=0.75,         # layer-wise lr decay: block i gets lr x decay^(depth - i)
                                #   (1 = none); see clmim/train/finetune.py
      label_smoothing=0.1,      # smoothed one-hot targets (0 = hard labels)
      mixup_alpha=0.8,          # Mixup's Beta(alpha, alpha) (0 = no Mixup)
      cutmix_alpha=1.0,         # CutMix's Beta(alpha, alpha) (0 = no CutMix)
      switch_prob=0.5,          # with both on: the chance a step uses CutMix instead of Mixup
      crop_scale=(0.35, 1.0),   # random resized crop area range (then a random flip)
      eval_every=250,           # steps between validation passes (a multiple of log_every;
                                #   0 = only at the end); results in metrics.jsonl
      eval_images=1000,         # held-out images validated (0 = the whole set; synthetic > 0)
      eval_split="validation",  # tfds: the held-out split (synthetic: always "validation")
      eval_path="",             # image_folder: folder of held-out images, the same classes
      eval_crop_pct=0.875,      # image_folder / tfds held-out images: shorter side to
                                #   image_size / eval_crop_pct, then a centre crop
  )
  if arg == "vitb16":
    config.name = "finetune_mae_vitb16"
    config.init_encoder = "mae_vitb16"
    config.model = config_lib.demo_model(variant="B/16", drop_path=0.1)
    config.data.image_size = 224
    config.data.source = "tfds"
    config.data.tfds_name = "imagenet2012"
    config.data.mean = config.data.std = "imagenet"
    config.batch_size = 1024
    config.lr = 2e-3
    config.total_steps = 125114     # 100 epochs of 1,281,167 images
    config.warmup_steps = 6256      # 5 epochs
    config.final_lr_fraction = 5e-4  # cosine to 1e-6
    config.log_every = 100
    config.checkpoint_every = 2000
    config.finetune.label = "label"
    config.finetune.layer_decay = 0.65
    config.finetune.crop_scale = (0.08, 1.0)
    config.finetune.eval_every = 10000
    config.finetune.eval_images = 0
  elif arg == "runlocal":  # finish() cuts the model to 2 blocks: no shipped encoder fits it
    config.init_encoder = ""
    config.finetune.eval_every = 0
    config.finetune.eval_images = 64
  if arg == "runlocal":  # a seconds-long model must not take the demo model's name
    config.name += "_runlocal"
  return config_lib.finish(config, arg)
