"""What the planner and the metrics know of a model without building it: the units ZeRO-3 gathers, the
bytes each decoder layer saves for backward, and the shape of its attention.  A family's ``costs.py``
composes them from the helpers here for its blocks and its ``ModelSpec`` carries them; the units are
pinned against the model built on the meta device, and the attention shape against what the attention
kernel receives in a real forward (``tests/test_architecture.py``).  Pure arithmetic, no torch.

Shapes: D hidden, H heads, V vocabulary, E routed experts, K experts per token, F expert intermediate
size, b bytes per element of the compute dtype (2 bf16, 4 fp32), S max_length.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_train.models.common.experts import ExpertLayout


@dataclass(frozen=True)
class Unit:
    """Parameters ZeRO-3 gathers together: the direct parameters of one module, named by its path inside
    the decoder layer (``self_attn.kv_b_proj``, ``mlp.experts.3``); a layer's units are in forward order."""

    name: str
    numel: int
    tensors: int = 1  # parameters of the module: ZeRO-3 hooks and reduces each one
    expert: int | None = None  # a routed-expert module: its index among the layer's (shard, or expert in origin)
    attention_kernel: bool = False  # the attention kernel runs right after this module's GEMM


@dataclass(frozen=True)
class AttentionShape:
    """What the softmax attention kernels of a model compute."""

    layers: int  # decoder layers with softmax attention over the whole sample
    heads: int  # query heads
    kv_heads: int  # key/value heads the kernel receives (MLA: as many as query heads)
    qk_dim: int
    v_dim: int
    rope_bytes: int  # bytes per token of the rotary tables every layer shares (kept for backward)

    @property
    def flops_per_key(self) -> float:
        """Forward FLOPs of QK^T and PV for one (query, key) pair, summed over the layers."""
        return 2 * self.layers * self.heads * (self.qk_dim + self.v_dim)

    @property
    def exchanged_per_token(self) -> int:
        """Elements per token one Ulysses all-to-all moves: q, k, v (v counted padded to the q/k dim, as
        the kernels take it) and the output."""
        return self.heads * self.qk_dim + 2 * self.kv_heads * self.qk_dim + self.heads * self.v_dim


def linear_unit(name: str, d_in: int, d_out: int, bias: bool = False, **flags) -> Unit:
    return Unit(name, d_in * d_out + (d_out if bias else 0), 2 if bias else 1, **flags)


def swiglu_units(prefix: str, hidden_size: int, intermediate_size: int) -> list[Unit]:
    """``SwiGLUMLP`` (``models/common/mlp.py``)."""
    return [linear_unit(f"{prefix}.{p}", hidden_size, intermediate_size) for p in ("gate_proj", "up_proj", "down_proj")]


def moe_units(cfg, layout: ExpertLayout, router: int, shared: int = 0) -> list[Unit]:
    """An MoE block (``models/common/moe.py``): the router's ``router`` parameters, the routed experts
    in ``layout``, ``shared`` shared experts (one SwiGLU of their summed width)."""
    D, F, E = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts
    units = [Unit("mlp.gate", router)]
    if layout.moe_implementation == "origin":
        units += [
            Unit(f"mlp.experts.{e}.{p}", D * F, expert=e)
            for e in range(E)
            for p in ("gate_proj", "up_proj", "down_proj")
        ]
    else:  # one module per shard holding gate_up_proj (S, 2F, D) and down_proj (S, D, F)
        S = layout.shard_size(E)
        units += [Unit(f"mlp.experts.{s}", S * 3 * D * F, tensors=2, expert=s) for s in range(E // S)]
    if shared:
        units += swiglu_units("mlp.shared_experts", D, F * shared)
    return units


def mla_units(cfg) -> list[Unit]:
    """``MLAttention`` (``models/common/mla.py``); the kernel runs between ``kv_b_proj`` and ``o_proj``."""
    D, H, bias = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_bias
    if cfg.q_lora_rank is None:
        units = [linear_unit("self_attn.q_proj", D, H * cfg.qk_head_dim)]
    else:
        units = [
            linear_unit("self_attn.q_a_proj", D, cfg.q_lora_rank, bias),
            Unit("self_attn.q_a_layernorm", cfg.q_lora_rank),
            linear_unit("self_attn.q_b_proj", cfg.q_lora_rank, H * cfg.qk_head_dim),
        ]
    return units + [
        linear_unit("self_attn.kv_a_proj_with_mqa", D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias),
        Unit("self_attn.kv_a_layernorm", cfg.kv_lora_rank),
        linear_unit(
            "self_attn.kv_b_proj", cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), attention_kernel=True
        ),
        linear_unit("self_attn.o_proj", H * cfg.v_head_dim, D, bias),
    ]


def mla_shape(cfg) -> AttentionShape:
    H = cfg.num_attention_heads
    return AttentionShape(cfg.num_hidden_layers, H, H, cfg.qk_head_dim, cfg.v_head_dim, cfg.qk_rope_head_dim * 4)


# ---------------------------------------------------------------------------- activations
# Bytes per token one decoder layer saves for backward on one rank, by part, and its backward
# transients, counted op by op from the model code: autograd keeps only what a backward needs, and a
# tensor kept by several ops counts once.  Parts: "attention", "attention_scores" (eager's S x S
# softmax), "mlp", "moe_dispatch", "mlp_grad_transients", "attention_grad_transients".  ``attention``
# is the kernel: "flash" (flash-attn's varlen), "sdpa" (per-sample SDPA; neither keeps an S x S
# tensor) or "eager" (HF's S x S scores + 4D mask).


def norm_bytes(n: int, b: int) -> int:
    """RMSNorm over n saves its fp32 input (the input itself in an fp32 run, else an upcast copy),
    the normalised input in the compute dtype and the fp32 rsqrt: bytes per token."""
    return n * (4 + b) + 4


def mla_activations(cfg, b: int, max_length: int, attention: str) -> dict[str, float]:
    """The input norm and its output (the q_a/kv_a or q_proj input); with q_lora the q_a output's norm
    and the q_b input; the kv_a output's norm (in fp32 its saved input is the whole kv_a output, rope
    part included) and the kv_b input; the o_proj input H*Vd.  The rope rotation keeps only cos/sin
    (shared by the layers), the q/k concatenations nothing.  Then the kernel (flash-attn, or SDPA's
    flash kernel) keeps q, k, v padded to qk and its padded output (4*H*qk) and the fp32 logsumexp;
    eager keeps q, k, the kv_b output and HF's fp32 softmax and its cast to the compute dtype
    (``attention_scores``).  ``attention_grad_transients``: the kernel's dq, dk, dv and, for eager,
    the fp32 S x S gradients of the softmax.  Under Ulysses SP a rank holds T/sp tokens x H heads x S
    keys of eager scores (sp trades T*sp for H/sp)."""
    D, H, S = cfg.hidden_size, cfg.num_attention_heads, max_length
    qk, R, N, Vd, C = cfg.qk_head_dim, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    attn = norm_bytes(D, b) + D * b
    if cfg.q_lora_rank is not None:
        attn += norm_bytes(cfg.q_lora_rank, b) + cfg.q_lora_rank * b
    attn += norm_bytes(C, b) + (R * 4 if b == 4 else 0) + C * b
    attn += H * Vd * b
    scores = scores_grad = 0.0
    if attention in ("flash", "sdpa"):
        attn += 4 * H * qk * b + H * 4
    else:
        attn += 2 * H * qk * b + H * (N + Vd) * b
        scores, scores_grad = H * S * (4 + (b if b < 4 else 0)), H * S * 8
    return {"attention": attn, "attention_scores": scores, "attention_grad_transients": scores_grad + 3 * H * qk * b}


def moe_activations(cfg, b: int, router_extra: int = 0, shared: int = 0) -> dict[str, float]:
    """``mlp``: the post-attention norm and its output, the router's fp32 upcast of it (none in fp32),
    its softmax and top-k bookkeeping (plus ``router_extra``, e.g. group selection); per assignment 4F
    (gate_up output, silu, product); the ``shared`` shared experts 4*F*shared.  ``moe_dispatch``: per assignment
    the gathered input, the expert output and its weighted cast (3D), two int64 indices, the fp32
    weight.  ``mlp_grad_transients``: the two largest gradients at once (the fp32 weighted expert
    output, gate_up)."""
    D, K, F, E = cfg.hidden_size, cfg.experts_per_token, cfg.expert_intermediate_size, cfg.num_experts
    router = (D * 4 if b < 4 else 0) + E * 4 + E + K * 8 + router_extra
    return {
        "mlp": norm_bytes(D, b) + D * b + router + K * 4 * F * b + 4 * F * shared * b,
        "moe_dispatch": K * (3 * D * b + 2 * 8 + 4),
        "mlp_grad_transients": 2 * max(K * D * 4, K * 2 * F * b),
    }


def dense_activations(cfg, b: int) -> dict[str, float]:
    """A dense SwiGLU layer: the norm and its output, 4*I (gate, silu, up, product); its backward's two
    largest gradients."""
    I_ = cfg.intermediate_size
    return {
        "mlp": norm_bytes(cfg.hidden_size, b) + cfg.hidden_size * b + 4 * I_ * b,
        "moe_dispatch": 0,
        "mlp_grad_transients": 2 * I_ * b,
    }
