r"""Robustness to noise: the top-1 drop of a probed classifier under frequency-band and white noise.

The classifier is the linear probe of the last block's mean patch token (clmim/analysis/
robustness.py, docs/analyses/robustness.md); noise of one frequency band (centres 0.1π ..
0.9π, equal energy) or white noise is added to every test image, and the drop in top-1 is
plotted per band (Park & Kim's Fourier-noise plot) and per strength.

Embedded default (demo MoCo v3 + SimMIM and untrained copies; probe fitted on 4,000 procedural
training images, tested on 1,000 held-out ones):

  python -m clmim.main --config configs/robustness.py

On ImageNet (the probe is fitted on a labelled training folder):

  python -m clmim.main --config configs/robustness.py \
      --config.models=moco_v3_vitb16,simmim_vitb16 \
      --config.data.source=image_folder --config.data.path=/data/imagenet/val \
      --config.probe_data.path=/data/imagenet/train --config.data.max_images_per_class=0 \
      --config.probe_data.num_images=0 --config.data.num_images=10000 --config.batch_size=64

Options (config.analysis_options.robustness.*): target, block, feature, bands, band_width,
band_rms, white_rms, seed. Variants (after ':'): demo (default), runlocal (256 training and 64
test images, no untrained copies).
"""
from clmim import config_lib


def get_config(arg: str = "demo"):
  """Returns the locked ConfigDict for variant `arg`."""
  # 1,000 test images: a top-1 of 0.5 is then known to about ±0.016 (one standard error).
  return config_lib.analysis_base(arg, name="robustness", analyses="robustness", num_images=1000)
