"""Peak memory per rank of a DeepSeek V2 full fine-tune under DeepSpeed ZeRO.

``predict_memory(model, workload, zero, world_size)`` is a pure function of the model config, the
sequence/precision settings, the ZeRO settings and the world size, so a measured run can be
held against it.  It returns the bytes live in three phases of a step and takes the largest:

* ``loss``: end of the forward / start of the backward.  Checkpointed layer inputs (or, without
  activation checkpointing, every layer's saved tensors), the logits and their fp32 loss
  tensors, the gathered ``lm_head``.
* ``layer``: the backward of one MoE layer.  With activation checkpointing the layer is
  recomputed, so its saved tensors, the MoE dispatch buffers and the gradients in flight sit on
  top of the checkpoints; ZeRO-3 holds that layer's gathered weights and their full-size grads.
* ``step``: the optimizer step (fp32 gradient copy of one ZeRO sub-group).

Symbols: T tokens per rank (micro_batch * max_length / sp), S max_length, D hidden, H heads,
V vocabulary, L layers, E routed experts, K experts per token, F moe_intermediate_size,
b bytes per element of the compute dtype (2 bf16, 4 fp32).  GB in this package means GiB
(2**30 bytes), the unit nvidia-smi and torch.cuda report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe_train.models.deepseek_v2.config import DeepseekV2Config

GiB = 2**30
ATTENTIONS = ("flash", "sdpa", "eager")
DTYPE_BYTES = {"bf16": 2, "fp32": 4}

# CUDA context, cuBLAS workspaces and NCCL channel buffers: outside the caching allocator.
CUDA_RUNTIME_BYTES = 1.0 * GiB
# Share of the allocator peak lost to fragmentation (reserved but unusable blocks).
FRAGMENTATION = 0.05


@dataclass(frozen=True)
class Workload:
    """What one rank computes per micro step."""

    max_length: int
    micro_batch_size: int = 1
    varlen: bool = True
    attention: str = "flash"  # flash | sdpa: no S x S tensor; eager: HF's S x S scores + 4D mask
    activation_checkpointing: bool = True
    dtype: str = "bf16"  # compute dtype; fp32 means no bf16 copies (the CPU run)
    sp: int = 1  # sequence-parallel degree (Ulysses: each rank holds S/sp tokens, H/sp heads in attention)
    device: str = "cuda"  # cuda | cpu (cpu: no CUDA context, NCCL buffers or allocator margin)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention={self.attention!r} is unknown; use one of {list(ATTENTIONS)}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype={self.dtype!r} is unknown; use one of {list(DTYPE_BYTES)}")
        if self.attention == "eager" and self.varlen:
            raise ValueError("eager attention takes a 4D mask, not cu_seqlens: use --no-varlen, or flash/sdpa")
        tokens = self.max_length * self.micro_batch_size
        if tokens % self.sp:
            raise ValueError(f"sp={self.sp} must divide the {tokens} tokens of a micro step")

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def tokens_per_rank(self) -> int:
        return self.micro_batch_size * self.max_length // self.sp


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO settings that shape memory; defaults are DeepSpeed's own."""

    stage: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    param_persistence_threshold: int = 100_000
    reduce_bucket_size: int = 500_000_000
    sub_group_size: int = 1_000_000_000

    @classmethod
    def from_ds_config(cls, ds: dict[str, Any], hidden_size: int) -> "ZeroSettings":
        """Read a DeepSpeed config; "auto" takes the values the HF integration fills in."""
        z = ds.get("zero_optimization", {})
        auto = {
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
            "reduce_bucket_size": hidden_size * hidden_size,
        }

        def num(key: str, default: int) -> int:
            v = z.get(key, default)
            return auto[key] if v == "auto" else int(v)

        def offloaded(key: str) -> bool:
            return (z.get(key) or {}).get("device", "none") in ("cpu", "nvme")

        return cls(
            stage=int(z.get("stage", 0)),
            offload_optimizer=offloaded("offload_optimizer"),
            offload_param=offloaded("offload_param"),
            prefetch_bucket_size=num("stage3_prefetch_bucket_size", cls.prefetch_bucket_size),
            max_live_parameters=num("stage3_max_live_parameters", cls.max_live_parameters),
            max_reuse_distance=num("stage3_max_reuse_distance", cls.max_reuse_distance),
            param_persistence_threshold=num("stage3_param_persistence_threshold", cls.param_persistence_threshold),
            reduce_bucket_size=num("reduce_bucket_size", cls.reduce_bucket_size),
            sub_group_size=num("sub_group_size", cls.sub_group_size),
        )


# ---------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Unit:
    """Parameters ZeRO-3 gathers together: the direct parameters of one leaf module."""

    name: str
    numel: int


def layer_units(cfg: DeepseekV2Config, i: int) -> list[Unit]:
    """Leaf modules of decoder layer ``i`` in forward order."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    u = [Unit("input_layernorm", D)]
    if cfg.q_lora_rank is None:
        u.append(Unit("q_proj", D * H * cfg.qk_head_dim))
    else:
        u += [Unit("q_a_proj", D * cfg.q_lora_rank), Unit("q_a_layernorm", cfg.q_lora_rank),
              Unit("q_b_proj", cfg.q_lora_rank * H * cfg.qk_head_dim)]
    u += [
        Unit("kv_a_proj_with_mqa", D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)),
        Unit("kv_a_layernorm", cfg.kv_lora_rank),
        Unit("kv_b_proj", cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
        Unit("o_proj", H * cfg.v_head_dim * D),
        Unit("post_attention_layernorm", D),
    ]
    if not cfg.is_moe_layer(i):
        return u + [Unit(f"mlp.{p}", D * cfg.intermediate_size) for p in ("gate_proj", "up_proj", "down_proj")]
    F_, E = cfg.moe_intermediate_size, cfg.n_routed_experts
    u.append(Unit("gate", E * D))
    if cfg.moe_implementation == "origin":
        u += [Unit(f"experts.{e}.{p}", D * F_) for e in range(E) for p in ("gate_proj", "up_proj", "down_proj")]
    else:  # one module per shard holding gate_up_proj (S, 2F, D) and down_proj (S, D, F)
        u += [Unit(f"experts.{s}", cfg.shard_size * 3 * D * F_) for s in range(cfg.num_shards)]
    if cfg.n_shared_experts:
        Fs = F_ * cfg.n_shared_experts
        u += [Unit(f"shared_experts.{p}", D * Fs) for p in ("gate_proj", "up_proj", "down_proj")]
    return u


def model_units(cfg: DeepseekV2Config) -> tuple[Unit, list[list[Unit]], list[Unit]]:
    """(embedding, units of each layer, final norm + lm_head)."""
    D, V = cfg.hidden_size, cfg.vocab_size
    layers = [layer_units(cfg, i) for i in range(cfg.num_hidden_layers)]
    return Unit("embed_tokens", V * D), layers, [Unit("norm", D), Unit("lm_head", V * D)]


def count_params(cfg: DeepseekV2Config) -> int:
    embed, layers, head = model_units(cfg)
    return embed.numel + sum(u.numel for layer in layers for u in layer) + sum(u.numel for u in head)


def active_matmul_params(cfg: DeepseekV2Config) -> int:
    """Weights one token multiplies through: attention, dense MLPs, gate, top-k + shared experts, lm_head."""
    total = cfg.vocab_size * cfg.hidden_size  # lm_head; the embedding is a lookup
    for i in range(cfg.num_hidden_layers):
        for u in layer_units(cfg, i):
            if "layernorm" in u.name:
                continue
            if u.name.startswith("experts."):
                continue
            total += u.numel
        if cfg.is_moe_layer(i):
            total += cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return total


# ---------------------------------------------------------------------------- ZeRO-3 working set
def simulate_gathers(trace: list[Unit], zero: ZeroSettings) -> list[int]:
    """Gathered numel live at each step of a module trace, following DeepSpeed's coordinator.

    At each step the module's parameters are gathered; then the next modules in the trace are
    prefetched while the numel in flight is below min(prefetch bucket, max live - available)
    (so at least one module when there is room); after use, parameters are released unless the
    same module comes back within ``max_reuse_distance`` numel of trace.  Units below the
    persistence threshold never leave the rank and are not part of the trace.
    """
    live: dict[str, int] = {}
    out = []
    for step, unit in enumerate(trace):
        live[unit.name] = unit.numel
        budget = min(zero.prefetch_bucket_size, zero.max_live_parameters - sum(live.values()))
        fetched, j = 0, step + 1
        while j < len(trace) and fetched < budget:
            if trace[j].name not in live:
                live[trace[j].name] = trace[j].numel
                fetched += trace[j].numel
            j += 1
        out.append(sum(live.values()))
        traversed, reused = 0, False
        for later in trace[step + 1:]:
            if traversed >= zero.max_reuse_distance:
                break
            if later.name == unit.name:
                reused = True
                break
            traversed += later.numel
        if not reused:
            del live[unit.name]
    return out


def _gathered(cfg: DeepseekV2Config, work: Workload, zero: ZeroSettings) -> dict[str, dict[str, int]]:
    """Peak gathered parameter numel and full-size gradient numel around the loss and in a MoE layer."""
    _, layers, head = model_units(cfg)

    def trace_of(units: list[Unit], tag: str) -> list[Unit]:
        return [Unit(f"{tag}.{u.name}", u.numel) for u in units if u.numel >= zero.param_persistence_threshold]

    # The last two layers (MoE layers in every named size) and the head.
    top, below = trace_of(layers[-1], "top"), trace_of(layers[max(len(layers) - 2, 0)], "below")
    lm = trace_of(head, "head")
    if work.activation_checkpointing:  # backward of a layer = recompute forward, then reverse
        bwd_top, bwd_below = top + top[::-1], below + below[::-1]
    else:
        bwd_top, bwd_below = top[::-1], below[::-1]
    trace = top + lm + lm[::-1] + bwd_top + bwd_below
    live = simulate_gathers(trace, zero)
    n0 = len(top)
    n1 = n0 + 2 * len(lm)
    loss_params = max(live[n0:n1], default=0)
    layer_params = max(live[n1:n1 + len(bwd_top)], default=0)
    return {
        "loss": {"params": loss_params, "grads": max((u.numel for u in lm), default=0)},
        "layer": {"params": layer_params, "grads": max((u.numel for u in top), default=0)},
    }


# ---------------------------------------------------------------------------- activations
def _norm_bytes(n: int, b: int) -> int:
    """RMSNorm saves its fp32 upcast (free when already fp32) and the normalised output."""
    return n * (b + (4 if b < 4 else 0))


def layer_activations(cfg: DeepseekV2Config, work: Workload, moe: bool) -> dict[str, float]:
    """Bytes one decoder layer saves for backward on one rank, by part, plus its largest tensor.

    attention (MLA): norm(D) + q path + kv path + the q/k concatenations (H*(N+R) each), v
    (padded to N+R for flash) and the attention output (twice: kernel output and the contiguous
    o_proj input).  eager additionally saves the softmax in fp32 and its cast: T*H*S scores.
    sdpa keeps 3 outputs of H*v_head_dim (per-sample kernel outputs, their concatenation, the
    o_proj input).  dense MLP: norm(D) + 4*I (gate, up, silu, product).  MoE ``mlp``: norm(D),
    the fp32 router (upcast D, scores/masked scores/top-k ~ 3E), per assignment 4F (gate_up,
    silu, product), the shared experts 4*F*n_shared; ``moe_dispatch``: per assignment 2D (the
    gathered input and the expert output) and the sort/index tensors.  ``largest`` is the biggest
    single tensor (the fp32 weighted expert output for DeepSeek V2), used for backward transients.
    """
    b, T, S = work.bytes, work.tokens_per_rank, work.max_length
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk, R, N, Vd = cfg.qk_head_dim, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    f32 = 4 if b < 4 else 0  # bytes of an extra fp32 copy; zero when the run is fp32 already

    attn = _norm_bytes(D, b) + _norm_bytes(cfg.kv_lora_rank, b) + (cfg.kv_lora_rank + R) * b
    if cfg.q_lora_rank is None:
        attn += H * qk * b
    else:
        attn += _norm_bytes(cfg.q_lora_rank, b) + H * qk * b
    attn += H * (N + Vd) * b  # kv_b output (v is a view of it)
    attn += 2 * H * qk * b + 2 * H * R * b  # q and k concatenations, rotated rope parts
    v_out = qk if work.attention == "flash" else Vd
    attn += H * (v_out * b + v_out * b + Vd * b) + H * 4  # (padded v,) kernel output, o_proj input, lse
    scores = 0.0
    scores_grad = 0.0
    if work.attention == "eager":
        per_token_scores = H * S  # a rank's T tokens x H heads x S keys (Ulysses sp trades T*sp for H/sp)
        scores = per_token_scores * (4 + (b if b < 4 else 0))  # fp32 softmax + its cast to the compute dtype
        scores_grad = per_token_scores * 8  # fp32 gradient in and out of the softmax backward

    if moe:
        K, F_, E = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_routed_experts
        Fs = F_ * (cfg.n_shared_experts or 0)
        mlp = _norm_bytes(D, b) + D * f32 + 3 * E * 4 + K * 12 + K * 4 * F_ * b + 4 * Fs * b
        dispatch = K * (2 * D * b + 3 * 8)  # gathered input, expert output, sort/index tensors
        largest = max(K * D * 4, K * 2 * F_ * b, H * qk * b)  # fp32 weighted expert output, gate_up, q
    else:
        mlp = _norm_bytes(D, b) + 4 * cfg.intermediate_size * b
        dispatch = 0
        largest = max(cfg.intermediate_size * b, H * qk * b)
    return {
        "attention": attn * T,
        "attention_scores": scores * T,
        "attention_scores_grad": scores_grad * T,
        "mlp": mlp * T,
        "moe_dispatch": dispatch * T,
        "largest": largest * T,
    }


def attention_mask_bytes(work: Workload) -> float:
    """HF's eager path builds a (B, 1, S, S) additive mask in the compute dtype; flash and sdpa
    take cu_seqlens (varlen) or is_causal and build none.  With SP the mask covers the full S."""
    if work.attention != "eager":
        return 0.0
    return work.micro_batch_size * work.max_length ** 2 * work.bytes


def logits_bytes(cfg: DeepseekV2Config, work: Workload) -> float:
    """T*V*(b + 12): logits in the compute dtype, then fp32 for the loss: the log-softmax the
    cross entropy saves, and in backward its fp32 gradient in and out (the fp32 upcast of the
    logits is freed after the forward; in an fp32 run it is the logits themselves)."""
    return work.tokens_per_rank * cfg.vocab_size * (work.bytes + 12)


# ---------------------------------------------------------------------------- the estimate
@dataclass
class MemoryEstimate:
    phases: dict[str, dict[str, float]]  # phase -> term -> bytes
    cpu_bytes: float = 0.0  # host memory per rank for offloaded states
    params: int = 0

    @property
    def totals(self) -> dict[str, float]:
        return {name: sum(terms.values()) for name, terms in self.phases.items()}

    @property
    def peak_phase(self) -> str:
        totals = self.totals
        return max(totals, key=totals.get)

    @property
    def peak_bytes(self) -> float:
        return self.totals[self.peak_phase]

    @property
    def per_gpu_gb(self) -> float:
        return self.peak_bytes / GiB

    def breakdown_gb(self, phase: str | None = None) -> dict[str, float]:
        """Terms live in ``phase`` (default: the peak phase), in GiB; they sum to its total."""
        return {k: v / GiB for k, v in self.phases[phase or self.peak_phase].items()}


def predict_memory(model: DeepseekV2Config, work: Workload, zero: ZeroSettings, world_size: int) -> MemoryEstimate:
    """Peak bytes on one rank of a ``world_size`` ZeRO run; see the module docstring."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if world_size % work.sp:
        raise ValueError(f"sp={work.sp} must divide world_size={world_size}")
    b = work.bytes
    P = count_params(model)
    embed, layers, head = model_units(model)
    all_units = [embed, *(u for layer in layers for u in layer), *head]
    persistent = sum(u.numel for u in all_units if u.numel < zero.param_persistence_threshold) if zero.stage >= 3 else 0
    N = world_size

    # Model states: the low-precision (or fp32) weights and grads, and the fp32 Adam states
    # (master copy + m + v in mixed precision; m + v when training in fp32).
    optim_per_param = 12 if b < 4 else 8
    params = (P - persistent) * b / N + persistent * b if zero.stage >= 3 else P * b
    grads = P * b / N if zero.stage >= 2 else P * b
    optim = P * optim_per_param / N if zero.stage >= 1 else P * optim_per_param
    cpu = 0.0
    if zero.offload_param and zero.stage >= 3:
        cpu += (P - persistent) * b / N
        params = persistent * b
    if zero.offload_optimizer:
        cpu += optim + P * 4 / N  # fp32 grads live with the optimizer on the host
        optim, grads = 0.0, 0.0
    static = {"params": params, "grads": grads, "optimizer_states": optim}

    # Activations.
    L = model.num_hidden_layers
    T = work.tokens_per_rank
    acts = [layer_activations(model, work, model.is_moe_layer(i)) for i in range(L)]
    top = acts[-1]

    def saved(a: dict[str, float]) -> float:
        return a["attention"] + a["attention_scores"] + a["mlp"] + a["moe_dispatch"]

    if work.activation_checkpointing:
        kept = (L + 1) * T * model.hidden_size * b  # layer inputs (+ the final norm input)
        recompute = {"layer_recompute": top["attention"] + top["mlp"], "attention_scores": top["attention_scores"],
                     "moe_dispatch": top["moe_dispatch"]}
    else:
        kept = sum(saved(a) for a in acts)
        recompute = {}
    in_flight = {"backward_transients": 2 * top["largest"] + top["attention_scores_grad"]}

    # ZeRO-3 gathered weights and their full-size gradients (plus the reduce bucket).
    if zero.stage >= 3:
        g = _gathered(model, work, zero)
        bucket = zero.reduce_bucket_size * b
        gathered_loss = {"gathered_params": g["loss"]["params"] * b, "gathered_grads": g["loss"]["grads"] * b + bucket}
        gathered_layer = {"gathered_params": g["layer"]["params"] * b,
                          "gathered_grads": g["layer"]["grads"] * b + bucket}
    else:
        gathered_loss = gathered_layer = {}

    mask = attention_mask_bytes(work)
    act_key = "checkpointed_inputs" if work.activation_checkpointing else "saved_activations"
    phases = {
        "loss": {**static, **gathered_loss, act_key: kept, "attention_mask": mask,
                 "logits": logits_bytes(model, work)},
        "layer": {**static, **gathered_layer, act_key: kept, "attention_mask": mask, **recompute, **in_flight},
        "step": {**static},
    }
    # Optimizer step: the fp32 gradient of one sub-group (ZeRO-3) or partition (ZeRO-1/2) made
    # from the low-precision gradients; an fp32 run updates in place.
    if b < 4 and not zero.offload_optimizer:
        partition = P / N if zero.stage >= 1 else P
        group = min(zero.sub_group_size, partition) if zero.stage >= 3 else partition
        phases["step"]["fp32_grad_copy"] = group * 4
    if work.device == "cuda":
        for terms in phases.values():
            terms["fragmentation"] = FRAGMENTATION * sum(terms.values())
            terms["cuda_context_nccl"] = CUDA_RUNTIME_BYTES
    return MemoryEstimate(phases=phases, cpu_bytes=cpu, params=P)
