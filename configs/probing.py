r"""Per-layer linear probing: what each block can tell apart, and shape vs texture.

A ridge probe per block and feature (cls token, mean patch token), fitted on training images
and tested on held-out ones (clmim/analysis/probing.py, docs/analyses/probing.md). On the
procedural data it probes the shape label and the texture label and, on cue-conflict images
(shape of one class, texture of another), measures the shape bias per block.

Embedded default (demo MoCo v3 + SimMIM and untrained copies; probes fitted on 4,000
procedural training images, tested on 1,000 held-out ones and 1,000 cue-conflict images):

  python -m clmim.main --config configs/probing.py

On ImageNet (official ViT-B/16 checkpoints; the probes are fitted on a labelled training folder
and tested on the validation folder; docs/analyses/probing.md, "Memory and time"):

  python -m clmim.main --config configs/probing.py --config.models=moco_v3_vitb16,simmim_vitb16 \
      --config.data.source=image_folder --config.data.path=/data/imagenet/val \
      --config.probe_data.path=/data/imagenet/train --config.probe_data.num_images=0 \
      --config.data.max_images_per_class=0 --config.data.num_images=0 --config.batch_size=64

With a cue-conflict folder (the 16-class style-transfer set; its classes must be class folders
of the training images): add --config.probe_data.cue_conflict_path=/data/cue-conflict.

Variants (after ':'): demo (default), runlocal (256 training and 64 test images, no untrained
copies). Every field is documented in clmim/config_lib.py (analysis_base) and the README.
"""
from clmim import config_lib


def get_config(arg: str = "demo"):
  """Returns the locked ConfigDict for variant `arg`."""
  # 1,000 test images: a top-1 of 0.5 is then known to about ±0.016 (one standard error).
  return config_lib.analysis_base(arg, name="probing", analyses="probing", num_images=1000)
