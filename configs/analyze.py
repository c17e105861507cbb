r"""Any set of analyses, named in the config argument: `configs/analyze.py:<analyses>[:<variant>]`.

  python -m clmim.main --config configs/analyze.py                       # the paper's three
  python -m clmim.main --config configs/analyze.py:fourier               # one
  python -m clmim.main --config configs/analyze.py:nmi,attention_distance:runlocal

<analyses> is a comma-separated list of clmim/analysis/ modules (README, "Analyses"); without it,
the paper's three headline analyses: attention distance, NMI (+ attention entropy) and Fourier
ΔlogA. <variant> is demo (the default: the demo MoCo v3 + SimMIM and untrained copies, 512
procedural images, no download) or runlocal (64 images, no untrained copies). The workdir
prefix (config.name) is the analyses' names. The paper's setting (official ViT-B/16 checkpoints
on ImageNet val; README "The paper's comparison on ImageNet" explains the data fields):
  python -m clmim.main --config configs/analyze.py --config.models=moco_v3_vitb16,simmim_vitb16 \
      --config.data.source=image_folder --config.data.path=/data/imagenet/val \
      --config.data.max_images_per_class=12 --config.data.num_images=0 \
      --config.data.interpolation=bilinear --config.batch_size=16
Every field is documented in clmim/config_lib.py (analysis_base) and the README.
"""
from clmim import config_lib

HEADLINE = "attention_distance,nmi,fourier"
VARIANTS = ("demo", "runlocal")


def get_config(arg: str = ""):
  """Returns the locked ConfigDict for `arg` = "[<analyses>][:<variant>]" (either part may be
  left out, in either order)."""
  analyses, variant = "", "demo"
  for part in (p for p in arg.split(":") if p):
    if part in VARIANTS:
      variant = part
    elif analyses:
      raise ValueError(f"configs/analyze.py:{arg}: expected '<analyses>[:<variant>]' with "
                       f"<variant> one of {VARIANTS}; got two lists of analyses.")
    else:
      analyses = part
  analyses = analyses or HEADLINE
  name = "analyze" if analyses == HEADLINE else analyses.replace(",", "+")
  return config_lib.analysis_base(variant, name=name, analyses=analyses)
