"""The decoder every family shares: embedding, pre-norm residual layers (attention, then a dense MLP or
an MoE block), final norm and the LM head; packed rows and segments; the output type.

Shapes: B batch, T tokens, D hidden, V vocabulary.

A family's model extends ``CausalLM``: it builds layer ``i`` (a ``DecoderLayer`` of its attention and
its MLP or MoE block) and the rotary embedding its attention takes (``rotary``); this class runs them.
Attention modules are called ``attn(x, rope, cu_seqlens, max_seqlen)`` and keep their kernel in an
``inner_attention`` submodule; MoE blocks are called ``mlp(x, segment_T)`` and return ``(out, balance
loss or None, tokens per expert)``; dense MLPs ``mlp(x)``.  Submodules are registered in the order the
forward runs them (ZeRO-3's prefetch and the planner's unit trace follow that order).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.loss import LMHead, causal_lm_loss
from moe_train.models.common.norm import RMSNorm

# Our parameter names of the decoder around the layers' attention and MLP, equal to the HF keys.
DECODER_KEYS = [
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    "model.layers.{}.input_layernorm.weight",
    "model.layers.{}.post_attention_layernorm.weight",
]


class CausalLMOutput(NamedTuple):
    """A NamedTuple, so DeepSpeed's ZeRO-3 hooks find the tensors in it."""

    logits: torch.Tensor | None  # (B, T, V); None when the loss came from ``targets`` (never materialised)
    loss: torch.Tensor | None = None  # labels: token-mean cross entropy (shifted inside); targets: the CE sum
    aux_loss: torch.Tensor | None = None  # sum of the MoE balance losses (training only)
    expert_load: torch.Tensor | None = None  # (moe layers, E) tokens routed to each expert


class DecoderLayer(nn.Module):
    """x + attention(norm(x)), then + mlp(norm(x)); ``is_moe``: the MLP is an MoE block."""

    def __init__(self, hidden_size: int, eps: float, attention: nn.Module, mlp: nn.Module, is_moe: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.mlp = mlp
        self.is_moe = is_moe

    def forward(self, x, rope, cu_seqlens, max_seqlen, segment_T):
        x = x + self.self_attn(self.input_layernorm(x), rope, cu_seqlens, max_seqlen)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, aux, load = self.mlp(h, segment_T)
            return x + out, aux, load
        return x + self.mlp(h), None, None


class Decoder(nn.Module):
    """``embed_tokens``, ``layers``, ``norm``: the HF ``model.`` prefix."""

    def __init__(self, cfg: Any, layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        # padding_idx as the families' code: that row gets no gradient (null in the official configs).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        nn.init.normal_(self.embed_tokens.weight, std=cfg.initializer_range)
        self.layers = nn.ModuleList(layer(i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def segments(B: int, T: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Each token's sequence, flattened (B*T,): its packed sample, or its row when there is no cu_seqlens."""
    if cu_seqlens is None:
        return torch.arange(B, device=device).repeat_interleave(T)
    return torch.searchsorted(cu_seqlens[1:], torch.arange(T, device=device), right=True)


class CausalLM(nn.Module):
    """A family's causal LM: ``config`` (its ``HFConfig``), ``layout`` (the routed experts' memory layout).

    ``forward(input_ids, position_ids=None, cu_seqlens=None, labels=None, max_seqlen=None,
    segment_ids=None, targets=None)``: a packed row is ``input_ids`` of shape (1, T) with
    ``cu_seqlens`` marking sample boundaries; positions then restart at 0 in every sample unless
    ``position_ids`` is given.  ``segment_ids`` (T,) gives each token's sample (-1: padding) when the
    row is a slice of a longer one (sequence parallelism); by default it follows from ``cu_seqlens``.
    ``targets`` (already shifted labels, -100 ignored) makes ``loss`` their cross-entropy sum, computed
    chunk by chunk without ever building the (T, V) logits (what the trainer uses); ``labels`` gives
    the HF-style mean with logits.
    """

    def __init__(self, config: Any, layout: ExpertLayout, layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.config, self.layout = config, layout
        self.model = Decoder(config, layer)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, config.initializer_range)

    def rotary(self, position_ids: torch.Tensor) -> Any:
        """What every layer's attention takes as ``rope``, for (B, T) positions."""
        raise NotImplementedError

    def aux_loss(self, per_layer: list[Any]) -> torch.Tensor | None:
        """The balance loss from what the MoE layers returned (training only): DeepSeek's blocks return
        each layer's own loss, summed here; a family whose loss couples the layers (Switch-style, over
        every layer's routing) returns statistics and combines them in its override."""
        return torch.stack(per_layer).sum() if per_layer else None

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        segment_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        B, T = input_ids.shape
        device = input_ids.device
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        segment_T = segments(B, T, cu_seqlens, device) if segment_ids is None else segment_ids.to(device)
        if position_ids is None:
            if cu_seqlens is not None:
                position_ids = (torch.arange(T, device=device) - cu_seqlens[segment_T]).unsqueeze(0)
            else:
                position_ids = torch.arange(T, device=device).unsqueeze(0).expand(B, T)
        rope = self.rotary(position_ids.expand(B, T))
        x = self.model.embed_tokens(input_ids)
        aux_losses, loads = [], []
        for layer in self.model.layers:
            x, aux, load = layer(x, rope, cu_seqlens, max_seqlen, segment_T)
            if aux is not None:
                aux_losses.append(aux)
            if load is not None:
                loads.append(load)
        hidden = self.model.norm(x)
        if targets is not None:
            logits, loss = None, self.lm_head(hidden, targets)
        else:
            logits = self.lm_head(hidden)
            loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(
            logits=logits,
            loss=loss,
            aux_loss=self.aux_loss(aux_losses),
            expert_load=torch.stack(loads).detach() if loads else None,
        )
