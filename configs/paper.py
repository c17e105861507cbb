r"""The whole suite: every analysis clmim has, one report (report.md / report.html).

Embedded default (demo MoCo v3 + SimMIM and untrained copies, 512 procedural images, no download):

  python -m clmim.main --config configs/paper.py

The paper's setting (official ViT-B/16 checkpoints on ImageNet val; README "The paper's
comparison on ImageNet" explains the data fields):

  python -m clmim.main --config configs/paper.py --config.models=moco_v3_vitb16,simmim_vitb16 \
      --config.data.source=image_folder --config.data.path=/data/imagenet/val \
      --config.data.max_images_per_class=12 --config.data.num_images=0 --config.batch_size=16

Variants (after ':'): demo (default), runlocal (64 images, no untrained copies). Every field
is documented in clmim/config_lib.py (analysis_base) and the README; each analysis' options
(config.analysis_options.<name>.*) in its module's docstring.
"""
from clmim import config_lib
from clmim.analysis import core


def get_config(arg: str = "demo"):
  """Returns the locked ConfigDict for variant `arg`."""
  return config_lib.analysis_base(arg, name="paper", analyses=",".join(core.available()))
