"""Moving models across frameworks: PyTorch export/import and decoder, StableHLO."""
