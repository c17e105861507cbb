"""clmim: what do self-supervised Vision Transformers learn? Contrastive vs masked image modeling.

A JAX/Flax (linen) reproduction of Park et al., ICLR 2023. See README.md.
"""

__version__ = "0.1.0"
