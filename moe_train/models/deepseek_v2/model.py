"""DeepSeek V2 decoder in plain single-device PyTorch.

Shapes: B batch, T tokens, D hidden, V vocabulary, E routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.models.deepseek_v2.attention import MLAttention, RMSNorm, _linear
from moe_train.models.deepseek_v2.config import DeepseekV2Config
from moe_train.models.deepseek_v2.moe import MLP, MoE
from moe_train.models.deepseek_v2.rope import rope_cos_sin


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None  # token-mean cross entropy (labels shifted inside, HF convention)
    aux_loss: torch.Tensor | None = None  # sum of the MoE balance losses (training only)
    expert_load: torch.Tensor | None = None  # (moe layers, E) tokens routed to each expert


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekV2Config, layer_idx: int, attn_backend: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, attn_backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg, cfg.intermediate_size)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, segment_T):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, aux, load = self.mlp(h, segment_T)
            return x + out, aux, load
        return x + self.mlp(h), None, None


class DeepseekV2Model(nn.Module):
    def __init__(self, cfg: DeepseekV2Config, attn_backend: str) -> None:
        super().__init__()
        # padding_idx as DeepSeek's code: that row gets no gradient (null in the official configs).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        nn.init.normal_(self.embed_tokens.weight, std=cfg.initializer_range)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, attn_backend) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV2ForCausalLM(nn.Module):
    """DeepSeek V2 with routed experts stored as shards (default) or one module per expert.

    ``forward(input_ids, position_ids=None, cu_seqlens=None, labels=None)``: a packed row is
    ``input_ids`` of shape (1, T) with ``cu_seqlens`` marking sample boundaries; positions then
    restart at 0 in every sample unless ``position_ids`` is given.
    """

    def __init__(self, config: DeepseekV2Config, attn_backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.model = DeepseekV2Model(config, attn_backend)
        self.lm_head = _linear(config, config.hidden_size, config.vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        B, T = input_ids.shape
        segment_T = max_seqlen = None
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(device=input_ids.device, dtype=torch.int32)
            segment_T = torch.searchsorted(cu_seqlens[1:], torch.arange(T, device=input_ids.device), right=True)
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            if position_ids is None:
                position_ids = (torch.arange(T, device=input_ids.device) - cu_seqlens[segment_T]).unsqueeze(0)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, T)
        cos, sin = rope_cos_sin(self.config, position_ids.expand(B, T))
        x = self.model.embed_tokens(input_ids)
        aux_losses, loads = [], []
        for layer in self.model.layers:
            x, aux, load = layer(x, cos, sin, cu_seqlens, max_seqlen, segment_T)
            if aux is not None:
                aux_losses.append(aux)
            if load is not None:
                loads.append(load)
        logits = self.lm_head(self.model.norm(x))
        out = CausalLMOutput(
            logits=logits,
            aux_loss=torch.stack(aux_losses).sum() if aux_losses else None,
            expert_load=torch.stack(loads).detach() if loads else None,
        )
        if labels is not None:
            out.loss = causal_lm_loss(logits, labels)
        return out

    # ------------------------------------------------------------------ HF checkpoints
    @classmethod
    def from_pretrained(
        cls, path: str, moe_implementation: str = "shard", expert_in_one_shard: int | None = None,
        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", attn_backend: str = "auto",
        **storage_options: Any,
    ) -> "DeepseekV2ForCausalLM":
        """Load a checkpoint in the official DeepSeek V2 HF layout from a local path or fsspec URL."""
        from moe_train.checkpoint.hf_layout import load_pretrained

        return load_pretrained(cls, path, moe_implementation=moe_implementation,
                               expert_in_one_shard=expert_in_one_shard, dtype=dtype, device=device,
                               attn_backend=attn_backend, storage_options=storage_options)

    def save_pretrained(self, path: str, max_shard_size: int | str = "5GB", **storage_options: Any) -> None:
        """Write the official DeepSeek V2 HF layout (per-expert keys) to a local path or fsspec URL."""
        from moe_train.checkpoint.hf_layout import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, storage_options=storage_options)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of position t against labels[t+1] (HF convention); -100 is ignored."""
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    return F.cross_entropy(logits.float().flatten(0, -2), shifted.reshape(-1), ignore_index=-100, reduction=reduction)
