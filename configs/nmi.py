r"""Normalised mutual information between queries and keys (and attention entropy) per layer and head.

Embedded default (demo MoCo v3 + SimMIM and untrained copies, 512 procedural images, no download):

  python -m clmim.main --config configs/nmi.py

The paper's setting (official ViT-B/16 checkpoints on ImageNet val; README "The paper's
comparison on ImageNet" explains the data fields):

  python -m clmim.main --config configs/nmi.py --config.models=moco_v3_vitb16,simmim_vitb16 \
      --config.data.source=image_folder --config.data.path=/data/imagenet/val \
      --config.data.max_images_per_class=12 --config.data.num_images=0 \
      --config.data.interpolation=bilinear --config.batch_size=16

Variants (after ':'): demo (default), runlocal (64 images, no untrained copies). Every field
is documented in clmim/config_lib.py (analysis_base) and the README.
"""
from clmim import config_lib


def get_config(arg: str = "demo"):
  """Returns the locked ConfigDict for variant `arg`."""
  return config_lib.analysis_base(arg, name="nmi", analyses="nmi")
