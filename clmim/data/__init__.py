"""clmim.data."""
