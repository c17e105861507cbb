"""clmim.models."""
