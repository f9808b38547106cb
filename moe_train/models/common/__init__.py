"""Blocks shared by the model families: losses, grouped expert GEMMs."""
