"""Blocks shared by every model family: norms, SwiGLU MLP, grouped experts, varlen attention, losses,
the key-map machinery, and the family spec registry.  Pure single-device PyTorch."""
