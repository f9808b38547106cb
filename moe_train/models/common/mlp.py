"""SwiGLU feed-forward: dense layers, shared experts and each expert of the `origin` layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear(d_in: int, d_out: int, std: float, bias: bool = False) -> nn.Linear:
    """nn.Linear initialised as the DeepSeek families are: normal(0, std) weights, zero bias."""
    layer = nn.Linear(d_in, d_out, bias=bias)
    nn.init.normal_(layer.weight, std=std)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


# Our parameter names of a dense layer's MLP inside a decoder layer, equal to the HF keys.
DENSE_MLP_KEYS = ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]


class SwiGLUMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, std: float) -> None:
        super().__init__()
        self.gate_proj = linear(hidden_size, intermediate_size, std)
        self.up_proj = linear(hidden_size, intermediate_size, std)
        self.down_proj = linear(intermediate_size, hidden_size, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
