r"""The whole suite: every analysis clmim has, one report (report.md / report.html).

`decoder` is left out by default: it needs a checkpoint with a decoder. With one (e.g. the MAE
file with its decoder), add it: --config.models=mae_vitb16_full?decoder=1 and
--config.analyses=<the default list>,decoder (--print_config shows the list).

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
  # Every analysis but `decoder`, which only applies to checkpoints loaded with a decoder.
  analyses = ",".join(n for n in core.available() if n != "decoder")
  return config_lib.analysis_base(arg, name="paper", analyses=analyses)
