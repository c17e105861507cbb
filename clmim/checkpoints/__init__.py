"""clmim.checkpoints."""
