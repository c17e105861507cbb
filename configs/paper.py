r"""The whole suite: every analysis clmim has, one report (report.md / report.html).

Two are left out by default: `decoder` needs a checkpoint with a decoder (e.g. the MAE file with
its decoder: --config.models=mae_vitb16_full?decoder=1), and `object_attention` needs object
masks, which only the procedural data has. Add them with --config.analyses=<the default
list>,decoder (--print_config shows the list).

Embedded default (demo MoCo v3 + SimMIM and untrained copies, 512 procedural images, no download):

  python -m clmim.main --config configs/paper.py

The paper's setting (official ViT-B/16 checkpoints on ImageNet val; README "The paper's
comparison on ImageNet" explains the data fields):

  python -m clmim.main --config configs/paper.py --config.models=moco_v3_vitb16,simmim_vitb16 \
      --config.data.source=image_folder --config.data.path=/data/imagenet/val \
      --config.data.max_images_per_class=12 --config.data.num_images=0 --config.batch_size=16 \
      --config.probe_data.path=/data/imagenet/train --config.probe_data.num_images=20000

(the probes of `probing` and `robustness` are fitted on probe_data.path: labelled training
images with the classes of data.path; docs/analyses/probing.md).

Variants (after ':'): demo (default), runlocal (64 images, no untrained copies). Every field
is documented in clmim/config_lib.py (analysis_base) and the README; each analysis' options
(config.analysis_options.<name>.*) in its module's docstring.
"""
from clmim import config_lib
from clmim.analysis import core


def get_config(arg: str = "demo"):
  """Returns the locked ConfigDict for variant `arg`."""
  # Every analysis but `decoder` (checkpoints loaded with a decoder only) and `object_attention`
  # (procedural data only).
  analyses = ",".join(n for n in core.available() if n not in ("decoder", "object_attention"))
  return config_lib.analysis_base(arg, name="paper", analyses=analyses)
