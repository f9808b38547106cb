"""Peak memory per rank of a full fine-tune under DeepSpeed ZeRO, for any registered model family.

``predict_memory(model, layout, workload, zero, world_size)`` is a pure function of the model config and
its expert layout, the sequence/precision settings, the ZeRO settings and the world size, so a measured
run can be held against it.  What it knows of the model comes from the family's ``ModelSpec``
(``models/common/costs.py``): the units ZeRO-3 gathers and the bytes each layer saves for backward.
It returns the bytes live in three phases of a step and takes the largest:

* ``loss``: end of the forward / start of the backward.  Checkpointed layer inputs (or, without
  activation checkpointing, every tensor the layers save for backward), the logits and their
  fp32 loss tensors, and the ZeRO-3 parameters still gathered.
* ``layer``: the backward of the top MoE layer.  With activation checkpointing the layer is
  recomputed, so its saved tensors sit on top of the checkpoints; ZeRO-3 holds the gathered
  weights and the full-size grads in flight.
* ``step``: the optimizer step: the flattened gradient of one ZeRO sub-group and the AdamW
  temporaries, on top of the model states.

Every term counts tensors the code allocates, from first principles: the model states as
DeepSpeed 0.19 lays them out, the tensors autograd saves for each op of our model code, and
DeepSpeed's gather/release schedule replayed over the module trace of a step.  On CPU the fp32
run is held against a real 2-rank ZeRO-3 run (``tests/test_plan.py``): the prediction is of the
memory above the process's baseline once torch and DeepSpeed are imported, which RSS follows
when glibc hands freed blocks back (MALLOC_MMAP_THRESHOLD_ pinned; its default dynamic threshold
keeps freed tensors of up to 32 MiB in the heap, +50% RSS there).

Symbols: T tokens per rank (micro_batch * max_length / sp), S max_length, D hidden, H heads,
V vocabulary, L layers, E routed experts, K experts per token, F moe_intermediate_size,
b bytes per element of the compute dtype (2 bf16, 4 fp32).  GB in this package means GiB
(2**30 bytes), the unit nvidia-smi and torch.cuda report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from moe_train.engine.deepspeed_config import auto_buckets, offloads
from moe_train.models import spec_of
from moe_train.models.common.costs import Unit, norm_bytes
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.lora import LoraConfig
from moe_train.models.common.loss import chunk_tokens
from moe_train.parallel.dims import ParallelDims
from moe_train.plan.lora import adapters, with_adapters

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
    # flash: flash-attn's varlen kernel; sdpa: torch's scaled_dot_product_attention on each packed
    # sample (4-D inputs, v padded: its flash kernel on CPU); neither keeps an S x S tensor.
    # eager: HF's S x S scores + 4D mask.
    attention: str = "flash"
    activation_checkpointing: bool = True
    dtype: str = "bf16"  # compute dtype; fp32 means no bf16 copies (the CPU run)
    sp: int = 1  # sequence-parallel degree (Ulysses: each rank holds S/sp tokens, H/sp heads in attention)
    # cuda | cpu.  cpu: no CUDA context, NCCL buffers or allocator margin, and torch's AdamW takes its
    # single-tensor path (foreach kernels are CUDA-only), which holds two temporaries per step.
    device: str = "cuda"
    # LoRA adapters on a frozen base (``plan/lora.py``); None: full fine-tuning.
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention={self.attention!r} is unknown; use one of {list(ATTENTIONS)}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype={self.dtype!r} is unknown; use one of {list(DTYPE_BYTES)}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device={self.device!r} is unknown; use 'cuda' or 'cpu'")
        if self.attention == "eager" and self.varlen:
            raise ValueError("eager attention takes a 4D mask, not cu_seqlens: use --no-varlen, or flash/sdpa")

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def tokens_per_rank(self) -> int:
        """A micro step's tokens over the SP group, the row padded to a multiple of sp as the trainer pads it."""
        return -(-self.micro_batch_size * self.max_length // self.sp)


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
        """Read a DeepSpeed config; "auto" takes the values the trainer fills in."""
        z = ds.get("zero_optimization", {})
        auto = {k.removeprefix("zero_optimization."): v for k, v in auto_buckets(hidden_size).items()}

        def num(key: str, default: int) -> int:
            v = z.get(key, default)
            return auto[key] if v == "auto" else int(v)

        return cls(
            stage=int(z.get("stage", 0)),
            offload_optimizer=offloads(ds, "optimizer"),
            offload_param=offloads(ds, "param"),
            prefetch_bucket_size=num("stage3_prefetch_bucket_size", cls.prefetch_bucket_size),
            max_live_parameters=num("stage3_max_live_parameters", cls.max_live_parameters),
            max_reuse_distance=num("stage3_max_reuse_distance", cls.max_reuse_distance),
            param_persistence_threshold=num("stage3_param_persistence_threshold", cls.param_persistence_threshold),
            reduce_bucket_size=num("reduce_bucket_size", cls.reduce_bucket_size),
            sub_group_size=num("sub_group_size", cls.sub_group_size),
        )


# ---------------------------------------------------------------------------- parameters
def model_units(cfg: Any, layout: ExpertLayout) -> tuple[Unit, list[list[Unit]], list[Unit]]:
    """(embedding, units of each layer (the family's ``layer_units``), final norm + lm_head).  Memoised
    (``--search`` asks for the same model thousands of times): callers must not change the lists."""
    key = (repr(cfg), layout)
    if key not in _UNITS:
        if len(_UNITS) > 256:
            _UNITS.clear()
        D, V = cfg.hidden_size, cfg.vocab_size
        units = spec_of(cfg).layer_units
        layers = [units(cfg, layout, i) for i in range(cfg.num_hidden_layers)]
        _UNITS[key] = Unit("embed_tokens", V * D), layers, [Unit("norm", D), Unit("lm_head", V * D)]
    return _UNITS[key]


_UNITS: dict[tuple, tuple[Unit, list[list[Unit]], list[Unit]]] = {}


def memo(cache: dict, key: tuple, compute: Any) -> Any:
    """``cache[key]``, computed once: the search asks the same question of one model thousands of times."""
    if key not in cache:
        if len(cache) > 256:
            cache.clear()
        cache[key] = compute()
    return cache[key]


_SUMS: dict[tuple, int] = {}


def count_params(cfg: Any) -> int:
    def total() -> int:
        embed, layers, head = model_units(cfg, ExpertLayout())
        return embed.numel + sum(u.numel for layer in layers for u in layer) + sum(u.numel for u in head)

    return memo(_SUMS, (repr(cfg), "params"), total)


def persistent_numel(cfg: Any, layout: ExpertLayout, threshold: int) -> int:
    """Parameters under ZeRO-3's persistence threshold: whole on every rank, never gathered."""

    def total() -> int:
        embed, layers, head = model_units(cfg, layout)
        return sum(u.numel for u in [embed, *(u for layer in layers for u in layer), *head] if u.numel < threshold)

    return memo(_SUMS, (repr(cfg), layout, threshold), total)


def gather_key(zero: ZeroSettings) -> ZeroSettings:
    """The ZeRO settings the gather schedule depends on: offloading moves the partitions, not the gathers."""
    return dataclasses.replace(zero, offload_optimizer=False, offload_param=False)


# ---------------------------------------------------------------------------- ZeRO-3 working set
def simulate_gathers(trace: list[Unit], zero: ZeroSettings) -> list[int]:
    """Gathered numel live at each step of a module trace, following DeepSpeed's coordinator
    once it has recorded the trace of a step.

    At each step the module's parameters are gathered; then entries are taken off the front of
    the queue of upcoming trace entries, and gathered if not live, while the numel prefetched is
    below min(prefetch bucket, max live - numel live), so at least one module when there is room.
    After use a module is released unless it comes back within ``max_reuse_distance`` numel of
    trace, or the prefetch queue has already passed its next use.  Units below the persistence
    threshold never leave the rank and are not part of the trace.
    """
    return gather_schedule(trace, zero)[0]


@dataclass(frozen=True)
class Gathers:
    """What the coordinator all-gathers at one step of the trace, before the module runs."""

    on_demand: Unit | None  # the module itself, when it was not live (the step waits for it)
    prefetched: tuple[Unit, ...]  # upcoming modules whose gathers start now, behind the module's compute


def gather_schedule(trace: list[Unit], zero: ZeroSettings) -> tuple[list[int], list[Gathers]]:
    """(gathered numel live at each step, the gathers issued at each step): ``simulate_gathers``
    with the gathers it issues, which the speed model times."""
    n = len(trace)
    prefix = [0]
    for u in trace:
        prefix.append(prefix[-1] + u.numel)
    next_use, seen = [n] * n, {}
    for i in range(n - 1, -1, -1):
        next_use[i] = seen.get(trace[i].name, n)
        seen[trace[i].name] = i
    live: dict[str, int] = {}
    total, queue = 0, 0
    passed: dict[str, int] = {}  # unit -> latest trace position the prefetch queue took it off for
    out, issued = [], []
    for step, unit in enumerate(trace):
        on_demand = None
        if unit.name not in live:
            live[unit.name] = unit.numel
            total += unit.numel
            on_demand = unit
        queue = max(queue, step + 1)
        budget = min(zero.prefetch_bucket_size, zero.max_live_parameters - total)
        fetched, prefetched = 0, []
        while queue < n and fetched < budget:
            ahead = trace[queue]
            passed[ahead.name] = queue
            if ahead.name not in live:
                live[ahead.name] = ahead.numel
                total += ahead.numel
                fetched += ahead.numel
                prefetched.append(ahead)
            queue += 1
        out.append(total)
        issued.append(Gathers(on_demand, tuple(prefetched)))
        reuse = next_use[step]
        if reuse < n and prefix[reuse] - prefix[step + 1] < zero.max_reuse_distance:
            continue
        if passed.get(unit.name, -1) <= step:
            total -= live.pop(unit.name)
    return out, issued


@dataclass(frozen=True)
class StepTrace:
    """The modules ZeRO-3 gathers in one micro step, in order, and the pass of each entry."""

    units: list[Unit]
    passes: list[str]  # forward | recompute | backward, per entry
    loss: slice  # lm_head's forward and backward
    top: slice  # the backward (with its recompute) of the top layer
    head: list[Unit]  # the traced final norm / lm_head
    top_layer: list[Unit]  # the traced units of the top layer
    # The rank's own expert shards ``zero3.keep_whole`` takes out of the trace (``experts_whole``), each
    # once: gathered at their layer's forward (a view over one rank) and kept to the optimizer step.
    whole: list[Unit] = dataclasses.field(default_factory=list)


def local_unit(u: Unit, layout: ExpertLayout, num_experts: int | None, ep: int) -> bool:
    """Whether rank 0 of an EP group of ``ep`` holds unit ``u``: every unit but the routed-expert
    shards outside its E/ep experts (``--ep`` needs the shard layout)."""
    if ep == 1 or u.expert is None:
        return True
    return u.expert < layout.num_shards(num_experts) // ep


def experts_whole(world_size: int, ep: int, hold: bool, zero: ZeroSettings) -> bool:
    """Whether ``zero3.keep_whole`` takes a rank's own expert shards out of ZeRO-3's per-module fetch and
    release: under ``--ep`` always when their expert-data-parallel group is the rank alone (M = world/ep
    = 1: the "gather" is a view of the partition), and over M > 1 ranks with ``--hold-experts`` (one
    all-gather per step, kept to the optimizer step).  Never under parameter offload, where the trainer
    keeps DeepSpeed's fetch (the partition is not on the device; ``--ep`` refuses offload anyway)."""
    return ep > 1 and zero.stage >= 3 and not zero.offload_param and (hold or world_size == ep)


def step_trace(
    cfg: Any, layout: ExpertLayout, work: Workload, zero: ZeroSettings, ep: int = 1, whole: bool = False
) -> StepTrace:
    """The module trace of a whole step: the forward, lm_head's backward, then each layer's
    backward from the top (a recompute of the layer first with activation checkpointing), the
    embedding last.  Units under the persistence threshold are not traced; with expert
    parallelism (``ep`` > 1) a rank traces only its own expert shards, and none of them when they are
    kept whole (``whole``, see ``experts_whole``: DeepSpeed's hooks are off them), which the trace
    returns apart."""
    embed, layers, head = model_units(cfg, layout)
    if work.lora is not None:
        ad = adapters(cfg, layout, work.lora)
        layers = [with_adapters(layer, ad.layers[i]) for i, layer in enumerate(layers)]

    def traced(units: list[Unit], tag: str) -> list[Unit]:
        return [  # Unit(...) rather than dataclasses.replace: a 671B trace has ~100k entries
            Unit(f"{tag}.{u.name}", u.numel, u.tensors, u.expert, u.attention_kernel)
            for u in units
            if u.numel >= zero.param_persistence_threshold and local_unit(u, layout, cfg.num_experts, ep)
        ]

    emb, lm = traced([embed], "embed"), traced(head, "head")
    per_layer = [traced(layer, str(i)) for i, layer in enumerate(layers)]
    top_layer, kept = per_layer[-1], []  # the top layer's gradients include its experts' either way
    if whole:
        kept = [u for layer in per_layer for u in layer if u.expert is not None]
        per_layer = [[u for u in layer if u.expert is None] for layer in per_layer]
    units = emb + [u for layer in per_layer for u in layer] + lm
    passes = ["forward"] * len(units)
    loss = slice(len(units) - len(lm), len(units) + len(lm))
    units += lm[::-1]
    passes += ["backward"] * len(lm)
    top = slice(len(units), len(units) + len(per_layer[-1]) * (2 if work.activation_checkpointing else 1))
    for layer in per_layer[::-1]:
        if work.activation_checkpointing:
            units += layer
            passes += ["recompute"] * len(layer)
        units += layer[::-1]
        passes += ["backward"] * len(layer)
    units += emb
    passes += ["backward"] * len(emb)
    return StepTrace(units, passes, loss, top, lm, top_layer, kept)


def _gathered(
    cfg: Any, layout: ExpertLayout, work: Workload, zero: ZeroSettings, ep: int = 1, whole: bool = False
) -> dict[str, dict[str, int]]:
    """Peak gathered parameter numel around the loss and in the backward of the top layer, and the
    largest full-size gradient in flight there, replaying the module trace of a whole step
    (``step_trace``).  With a reuse distance larger than the model, every weight gathered in the
    forward stays gathered until its backward.  ``whole``: the rank's own expert shards are out of the
    trace, and ``held`` is their numel (``experts_whole``).  Cached: it depends on the model, the ZeRO
    settings and activation checkpointing only, and ``--search`` asks for it many times."""
    key = (repr(cfg), layout, work.activation_checkpointing, gather_key(zero), ep, work.lora, whole)
    if key not in _GATHERED:
        if len(_GATHERED) > 256:
            _GATHERED.clear()
        _GATHERED[key] = _replay_gathered(cfg, layout, work, zero, ep, whole)
    return _GATHERED[key]


_GATHERED: dict[tuple, dict[str, dict[str, int]]] = {}


def _per_layer(units: list[Unit]) -> dict[str, int]:
    """Numel of traced units by layer (their names start with the layer's index)."""
    out: dict[str, int] = {}
    for u in units:
        layer = u.name.split(".", 1)[0]
        out[layer] = out.get(layer, 0) + u.numel
    return out


def _replay_gathered(
    cfg: Any, layout: ExpertLayout, work: Workload, zero: ZeroSettings, ep: int, whole: bool
) -> dict[str, dict[str, int]]:
    t = step_trace(cfg, layout, work, zero, ep, whole)
    live = simulate_gathers(t.units, zero)
    head_grads = max((u.numel for u in t.head), default=0)
    top_grads = max((u.numel for u in t.top_layer), default=0)
    if work.lora is not None:  # only the adapters get gradients; the head has none
        top = adapters(cfg, layout, work.lora).layers[-1]
        head_grads = 0
        top_grads = max(
            (top[u.name.split(".", 1)[1]].numel for u in t.top_layer if u.name.split(".", 1)[1] in top), default=0
        )
    return {
        "loss": {"params": max(live[t.loss], default=0), "grads": head_grads},
        "layer": {"params": max(live[t.top], default=0), "grads": top_grads},
        "held": {"params": sum(u.numel for u in t.whole), "layer": max(_per_layer(t.whole).values(), default=0)},
    }


# ---------------------------------------------------------------------------- activations
def layer_activations(cfg: Any, work: Workload, i: int) -> dict[str, float]:
    """Bytes decoder layer ``i`` saves for backward on one rank, by part, and its backward transients:
    the family's per-token count (``ModelSpec.layer_activations``, counted op by op from the model code)
    times the rank's tokens."""
    per_token = spec_of(cfg).layer_activations(cfg, i, work.bytes, work.max_length, work.attention)
    return {part: v * work.tokens_per_rank for part, v in per_token.items()}


_ACTIVATIONS: dict[tuple, list[dict[str, float]]] = {}


def all_layer_activations(cfg: Any, work: Workload) -> list[dict[str, float]]:
    """``layer_activations`` of every layer, memoised on what they depend on."""
    key = (repr(cfg), work.bytes, work.max_length, work.attention, work.tokens_per_rank)
    return memo(_ACTIVATIONS, key, lambda: [layer_activations(cfg, work, i) for i in range(cfg.num_hidden_layers)])


def head_activations(cfg: Any, work: Workload) -> float:
    """Outside the layers: the final norm and the lm_head input, the embedding's int64 indices and
    the rotary tables shared by the layers."""
    D, b = cfg.hidden_size, work.bytes
    rope = spec_of(cfg).attention(cfg).rope_bytes
    return work.tokens_per_rank * (norm_bytes(D, b) + D * b + 8 + rope)


def attention_mask_bytes(work: Workload) -> float:
    """HF's eager path builds a (B, 1, S, S) additive mask in the compute dtype; flash and sdpa
    take cu_seqlens (varlen) or is_causal and build none.  With SP the mask covers the full S."""
    if work.attention != "eager":
        return 0.0
    return work.micro_batch_size * work.max_length**2 * work.bytes


def logits_bytes(cfg: Any, work: Workload) -> float:
    """The trainer's chunked LM head (``models/common/loss.py``) never holds (T, V) logits: while it
    runs, one chunk's (C, V) fp32 buffer (plus the chunk in the compute dtype when that is narrower);
    from its forward to its backward, the gradients it computed: (T, D) in the compute dtype and the
    (V, D) weight gradient in fp32."""
    T, V, D, b = work.tokens_per_rank, cfg.vocab_size, cfg.hidden_size, work.bytes
    C = min(T, chunk_tokens(V, torch.float32 if b == 4 else torch.bfloat16))
    weight_grad = V * D * 4 if work.lora is None else 0  # a frozen head computes no weight gradient
    return C * V * (4 + (b if b != 4 else 0)) + T * D * b + weight_grad


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


def dispatch_rows(cfg: Any, work: Workload, ep: int) -> dict[str, int]:
    """Token rows one rank's experts receive for one MoE layer under expert parallelism: T*K with
    balanced routing; N*T*min(K, E/N) under the worst skew a dropless all-to-all allows (every
    token of the N ranks of the group sends every expert it can to this rank's E/N)."""
    T, K = work.tokens_per_rank, cfg.experts_per_token
    return {"balanced": T * K, "worst_case": ep * T * min(K, cfg.num_experts // ep)}


def predict_memory(
    model: Any,
    layout: ExpertLayout,
    work: Workload,
    zero: ZeroSettings,
    world_size: int,
    ep: int = 1,
    hold: bool = False,
) -> MemoryEstimate:
    """Peak bytes on one rank of a ``world_size`` ZeRO run; see the module docstring.

    ``ep`` > 1 (expert parallelism): the partitions hold the same bytes per rank (E/N experts
    over world/N ranks), ZeRO-3 gathers only the rank's own expert shards, and the backward of
    the top layer also holds the worst-case dispatch (``dispatch_rows``) beyond the balanced rows
    the activation terms count: the received rows, the expert outputs and the GEMM intermediates,
    so that a skewed batch cannot run out of memory where a balanced one fits.  The rank's own
    shards are out of ZeRO-3's gather schedule when ``experts_whole``: over M = world/ep = 1 rank they
    cost nothing beyond their partition (views of it); with ``hold`` (``--hold-experts``) over M > 1
    ranks every layer's are live from their forward to the optimizer step, whose release-all comes
    before its gradient copy and Adam (DeepSpeed's ``step`` partitions all parameters first): the
    ``held_experts`` term of the loss and layer phases, their full weights in the compute dtype."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    ParallelDims(world_size, work.sp, ep, hold_experts=hold).validate(model, layout, None)  # the trainer's rules
    b = work.bytes
    P = count_params(model)
    persistent = persistent_numel(model, layout, zero.param_persistence_threshold) if zero.stage >= 3 else 0
    N = world_size

    # Model states.  The weights (ZeRO-3: a partition, plus the whole of each persistent
    # parameter) and a flat gradient partition in the compute dtype; the optimizer's fp32 master
    # partition and Adam's m and v.  DeepSpeed keeps the master copy even when the weights are
    # fp32 (stage 1/2 clone it; stage 3 compares a torch.device with a device name, never equal).
    # With LoRA the frozen base holds only its weights; the adapters (A numel) hold all four states.
    optim_per_param = 12 if zero.stage >= 1 or b < 4 else 8
    A = 0
    if work.lora is not None:
        ad = adapters(model, layout, work.lora)
        A = ad.numel
        persistent += ad.persistent_numel(zero.param_persistence_threshold) if zero.stage >= 3 else 0
    trained = A if work.lora is not None else P
    params = (P + A) * b / N + persistent * b if zero.stage >= 3 else (P + A) * b
    grads = trained * b / N if zero.stage >= 2 else trained * b
    optim = trained * optim_per_param / N if zero.stage >= 1 else trained * optim_per_param
    cpu = 0.0
    if zero.offload_param and zero.stage >= 3:
        cpu += (P + A) * b / N
        params = persistent * b
    if zero.offload_optimizer:
        cpu += optim + trained * 4 / N  # fp32 grads live with the optimizer on the host
        optim, grads = 0.0, 0.0
    static = {"params": params, "grads": grads, "optimizer_states": optim}
    if zero.stage >= 3:  # the contiguous-gradients bucket, allocated once
        static["reduce_bucket"] = zero.reduce_bucket_size * b

    # Activations: all layers' saved tensors (or their checkpointed inputs) until the loss; in
    # the backward of the top layer the head's are freed, and the MLP backward runs before the
    # attention backward, whose S x S gradients replace the MLP tensors it has freed.
    L = model.num_hidden_layers
    T = work.tokens_per_rank
    acts = all_layer_activations(model, work)
    if work.lora is not None:  # each adapter's rank-R intermediate, kept for its B's gradient
        ad = adapters(model, layout, work.lora)
        acts = [{**a, "adapters": ad.saved_per_token(i) * T * b} for i, a in enumerate(acts)]
    top = acts[-1]

    def saved(a: dict[str, float]) -> float:
        return a["attention"] + a["attention_scores"] + a["mlp"] + a["moe_dispatch"] + a.get("adapters", 0.0)

    if work.activation_checkpointing:
        kept = L * T * model.hidden_size * b  # each layer's input
        recompute = {
            "layer_recompute": top["attention"] + top["mlp"] + top.get("adapters", 0.0),
            "attention_scores": top["attention_scores"],
            "moe_dispatch": top["moe_dispatch"],
        }
    else:
        kept = sum(saved(a) for a in acts)
        recompute = {}
    in_flight = {
        "backward_transients": max(
            top["mlp_grad_transients"], top["attention_grad_transients"] - top["mlp"] - top["moe_dispatch"]
        )
    }

    # ZeRO-3: the gathered weights and the full-size gradient in flight.
    if zero.stage >= 3:
        whole = experts_whole(world_size, ep, hold, zero)
        g = _gathered(model, layout, work, zero, ep, whole)
        gathered_loss = {"gathered_params": g["loss"]["params"] * b, "gathered_grads": g["loss"]["grads"] * b}
        gathered_layer = {"gathered_params": g["layer"]["params"] * b, "gathered_grads": g["layer"]["grads"] * b}
        if whole and world_size > ep:  # over one rank the kept weights are the partition itself
            gathered_loss["held_experts"] = gathered_layer["held_experts"] = g["held"]["params"] * b
            # DeepSpeed's coalesced gather fills one flat buffer for a layer's experts, then copies each
            # parameter out of it: twice one layer's worth for a moment, the last layer's just before the loss.
            gathered_loss["held_gather_copy"] = g["held"]["layer"] * b
    else:
        gathered_loss = gathered_layer = {}

    mask = attention_mask_bytes(work)
    act_key = "checkpointed_inputs" if work.activation_checkpointing else "saved_activations"
    phases = {
        "loss": {
            **static,
            **gathered_loss,
            act_key: kept + head_activations(model, work),
            "attention_mask": mask,
            "logits": logits_bytes(model, work),
        },
        "layer": {**static, **gathered_layer, act_key: kept, "attention_mask": mask, **recompute, **in_flight},
        "step": {**static},
    }
    if ep > 1:
        rows = dispatch_rows(model, work, ep)
        per_row = (3 * model.hidden_size + 4 * model.expert_intermediate_size) * b
        phases["layer"]["ep_dispatch_skew"] = (rows["worst_case"] - rows["balanced"]) * per_row
    # Optimizer step, one ZeRO sub-group (ZeRO-3) or partition (ZeRO-1/2) at a time: its
    # gradients flattened into one fp32 tensor, and torch AdamW's temporaries for the update
    # denominator: one with the CUDA foreach kernels, two on CPU's single-tensor path
    # (exp_avg_sq.sqrt() and its quotient are live together).
    if not zero.offload_optimizer:
        partition = trained / N if zero.stage >= 1 else trained
        group = min(zero.sub_group_size, partition) if zero.stage >= 3 else partition
        phases["step"]["fp32_grad_copy"] = group * 4
        phases["step"]["adam_temporaries"] = group * 4 * (2 if work.device == "cpu" else 1)
    if work.device == "cuda":
        for terms in phases.values():
            terms["fragmentation"] = FRAGMENTATION * sum(terms.values())
            terms["cuda_context_nccl"] = CUDA_RUNTIME_BYTES
    return MemoryEstimate(phases=phases, cpu_bytes=cpu, params=P + A)
