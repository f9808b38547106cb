"""DeepSeek V2 decoder in plain single-device PyTorch.

Shapes: B batch, T tokens, D hidden, V vocabulary, E routed experts.
Loading and saving HF checkpoints is ``moe_train.checkpoint`` (which also provides
``DeepseekV2ForCausalLM.from_pretrained`` / ``save_pretrained``); this module reads no files.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from moe_train.models.common.loss import LMHead, causal_lm_loss
from moe_train.models.common.mlp import SwiGLUMLP
from moe_train.models.common.norm import RMSNorm
from moe_train.models.deepseek_v2.attention import MLAttention
from moe_train.models.deepseek_v2.config import DeepseekV2Config
from moe_train.models.deepseek_v2.moe import MoE
from moe_train.models.deepseek_v2.rope import rope_cos_sin


class CausalLMOutput(NamedTuple):
    """A NamedTuple, so DeepSpeed's ZeRO-3 hooks find the tensors in it."""

    logits: torch.Tensor | None  # (B, T, V); None when the loss came from ``targets`` (never materialised)
    loss: torch.Tensor | None = None  # labels: token-mean cross entropy (shifted inside); targets: the CE sum
    aux_loss: torch.Tensor | None = None  # sum of the MoE balance losses (training only)
    expert_load: torch.Tensor | None = None  # (moe layers, E) tokens routed to each expert


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekV2Config, layer_idx: int, attn_backend: str, moe_cls: type = MoE) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, attn_backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = (
            moe_cls(cfg) if self.is_moe else SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range)
        )

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, segment_T):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, aux, load = self.mlp(h, segment_T)
            return x + out, aux, load
        return x + self.mlp(h), None, None


class DeepseekV2Model(nn.Module):
    def __init__(self, cfg: DeepseekV2Config, attn_backend: str, moe_cls: type = MoE) -> None:
        super().__init__()
        # padding_idx as DeepSeek's code: that row gets no gradient (null in the official configs).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        nn.init.normal_(self.embed_tokens.weight, std=cfg.initializer_range)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, attn_backend, moe_cls) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def segments(B: int, T: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Each token's sequence, flattened (B*T,): its packed sample, or its row when there is no cu_seqlens."""
    if cu_seqlens is None:
        return torch.arange(B, device=device).repeat_interleave(T)
    return torch.searchsorted(cu_seqlens[1:], torch.arange(T, device=device), right=True)


class DeepseekV2ForCausalLM(nn.Module):
    """DeepSeek V2 with routed experts stored as shards (default) or one module per expert.

    ``forward(input_ids, position_ids=None, cu_seqlens=None, labels=None, max_seqlen=None,
    segment_ids=None, targets=None)``: a packed row is ``input_ids`` of shape (1, T) with
    ``cu_seqlens`` marking sample boundaries; positions then restart at 0 in every sample unless
    ``position_ids`` is given.  ``segment_ids`` (T,) gives each token's sample (-1: padding) when the
    row is a slice of a longer one (sequence parallelism); by default it follows from ``cu_seqlens``.
    ``targets`` (already shifted labels, -100 ignored) makes ``loss`` their cross-entropy sum, computed
    chunk by chunk without ever building the (T, V) logits (what the trainer uses); ``labels`` gives
    the HF-style mean with logits.
    """

    moe_cls: type = MoE  # the MoE block (DeepSeek V3 reuses this decoder with its own router)

    def __init__(self, config: DeepseekV2Config, attn_backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.model = DeepseekV2Model(config, attn_backend, self.moe_cls)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, config.initializer_range)

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
        cos, sin = rope_cos_sin(self.config, position_ids.expand(B, T))
        x = self.model.embed_tokens(input_ids)
        aux_losses, loads = [], []
        for layer in self.model.layers:
            x, aux, load = layer(x, cos, sin, cu_seqlens, max_seqlen, segment_T)
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
            aux_loss=torch.stack(aux_losses).sum() if aux_losses else None,
            expert_load=torch.stack(loads).detach() if loads else None,
        )
