"""clmim.analysis."""
