"""The TorchX catalogue (components.py), installed so that `torchx builtins` lists it."""
