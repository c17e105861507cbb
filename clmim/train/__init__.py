"""clmim.train."""
