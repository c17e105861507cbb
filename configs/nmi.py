r"""Normalised mutual information between queries and keys (and attention entropy) per layer and head.

The embedded default (the two demo models, MoCo v3 and SimMIM, plus untrained copies, on 512
held-out procedural images; no download, CPU is fine):

  python -m clmim.main --config configs/nmi.py

The paper's setting, on an image folder (e.g. ImageNet val or Imagenette, one sub-folder per
class), the first 2^-6 of each class as in the official notebooks (~12 of 50 ImageNet val images):

  python -m clmim.main --config configs/nmi.py --config.models=/path/to/moco_ckpt,/path/to/simmim_ckpt \
      --config.data.source=image_folder --config.data.path=/data/imagenet/val \
      --config.data.max_images_per_class=12 --config.data.num_images=0

Variants (the string after ':'): demo (default), runlocal (64 images, no untrained copies).
Every field is documented in clmim/config_lib.py (analysis_base).
"""
from clmim import config_lib


def get_config(arg: str = "demo"):
  """Returns the locked ConfigDict for variant `arg`."""
  return config_lib.analysis_base(arg, name="nmi", analyses="nmi")
