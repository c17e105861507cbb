"""clmim: what do self-supervised Vision Transformers learn? Contrastive vs masked image modeling.

A JAX/Flax (linen) reproduction of Park et al., ICLR 2023. See README.md.
"""
from clmim import host_memory as _host_memory

__version__ = "0.1.0"

# Before JAX starts its threads: XLA:CPU's per-call scratch buffer is then reused, not faulted
# in anew on every call (clmim/host_memory.py; CLMIM_HOST_MEMORY=system turns it off).
_host_memory.keep_freed_memory()
