r"""Attention distance (pixels) per layer and head.

The embedded default (the two demo models, MoCo v3 and SimMIM, plus untrained copies, on 512
held-out procedural images; no download, CPU is fine):

  python -m clmim.main --config configs/attention_distance.py

The paper's setting: the official MoCo v3 (300 ep) and SimMIM (800 ep) ViT-B/16 checkpoints,
downloaded to $CLMIM_CACHE_DIR on first use (or local files given as moco_v3:/path/file.pth.tar
and simmim:/path/file.pth), on an image folder (ImageNet val or Imagenette, one sub-folder per
class), a fixed subset of each class (here the first 12 of the 50 ImageNet val
images per class; for Imagenette, --config.data.fraction_per_class=0.015625 takes the 2^-6 the
notebooks take), resized bilinearly as the paper's code did:

  python -m clmim.main --config configs/attention_distance.py --config.models=moco_v3_vitb16,simmim_vitb16 \
      --config.data.source=image_folder --config.data.path=/data/imagenet/val \
      --config.data.max_images_per_class=12 --config.data.num_images=0 \
      --config.data.interpolation=bilinear --config.batch_size=16

Variants (the string after ':'): demo (default), runlocal (64 images, no untrained copies).
Every field is documented in clmim/config_lib.py (analysis_base) and the README.
"""
from clmim import config_lib


def get_config(arg: str = "demo"):
  """Returns the locked ConfigDict for variant `arg`."""
  return config_lib.analysis_base(arg, name="attention_distance", analyses="attention_distance")
