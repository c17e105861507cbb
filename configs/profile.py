r"""Profile models against the paper: where each sits between a CL and a MIM reference.

Runs the paper's headline analyses (attention distance, NMI, Fourier, homogeneity, SVD, CKA)
and the token-norm analysis (high-norm tokens, registers) on any set of model specs and writes,
besides the report, placements.md: every model placed between the run's first CL model (0 = MIM
reference, 1 = CL reference) on each finding, with 95 % bootstrap intervals
(clmim/jobs/placements.py, README "Profiling today's models").

Embedded default (demo MoCo v3 + SimMIM as the references, their untrained copies placed
between them; 512 procedural images, no download):

  python -m clmim.main --config configs/profile.py

Today's models against the official references on ImageNet val (downloads the weights; a
model's own resolution and preprocessing come from its files):

  python -m clmim.main --config configs/profile.py \
      --config.models=moco_v3_vitb16,simmim_vitb16,hf:facebook/dinov2-with-registers-base?image_size=224,hf:openai/clip-vit-base-patch16,hf:facebook/vit-mae-base,hf:google/siglip-base-patch16-224 \
      --config.data.source=image_folder --config.data.path=/data/imagenet/val \
      --config.data.max_images_per_class=12 --config.data.num_images=0 --config.batch_size=16

Variants (after ':'): demo (default), runlocal (64 images, no untrained copies). Every field
is documented in clmim/config_lib.py (analysis_base) and the README.
"""
from clmim import config_lib

# The analyses with a CL/MIM finding that need no labelled training data, and token_norms.
PROFILE_ANALYSES = "attention_distance,nmi,fourier,homogeneity,svd,cka,token_norms"


def get_config(arg: str = "demo"):
  """Returns the locked ConfigDict for variant `arg`."""
  return config_lib.analysis_base(arg, name="profile", analyses=PROFILE_ANALYSES)
