"""DeepSpeed ZeRO applied to a model from outside: the one module that knows DeepSpeed's internals.

- ``build``: construct the model under ``deepspeed.zero.Init`` so that no rank ever holds a full
  parameter (ZeRO-3), or plainly (ZeRO-0/1/2), and check the partitions' dtype.
- ``partition``: the flat element range of a parameter this rank owns, which the checkpoint loader
  fills from byte ranges of the safetensors files.
- ``gathered_parameters``: every parameter in full, one at a time, for the streamed HF export.
- ``apply_activation_checkpointing``: recompute each decoder layer in backward.
- ``coalesce_gathers``: one ZeRO-3 gather per dense block of a layer instead of one per linear.
- ``initialize``: ``deepspeed.initialize`` with the trainer's optimizer and schedule.
- ``optimizer_ranges`` and friends: each rank's fp32 master weights and Adam moments per parameter, as
  views into DeepSpeed's flat partitions, for the topology-free training checkpoint (no pickles).
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def is_zero3(ds_config: dict[str, Any]) -> bool:
    return ds_config.get("zero_optimization", {}).get("stage", 0) == 3


def build(
    factory: Callable[[], nn.Module], ds_config: dict[str, Any], dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """``factory()`` partitioned from the start under ZeRO-3, else materialised on ``device``."""
    import deepspeed

    zero3 = is_zero3(ds_config)
    # dtype comes from the config's bf16 block: an explicit dtype= is ignored on CPU by
    # DeepSpeed 0.19 (operator precedence in Init._set_dtype), which silently gave bf16 weights.
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero3, mem_efficient_linear=False):
        model = factory()
    if not zero3:
        return model.to(device=device, dtype=dtype)
    wrong = {p.ds_tensor.dtype for p in model.parameters()} - {dtype}
    if wrong:
        raise ValueError(
            f"ZeRO-3 partitions are {sorted(map(str, wrong))}, expected {dtype}; set the DeepSpeed "
            'config\'s "bf16": {"enabled": "auto"} (or match the recipe\'s dtype)'
        )
    return model


def partition(param: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(this rank's flat partition, its first element) of a ZeRO-3 parameter; None if not partitioned."""
    ds_tensor = getattr(param, "ds_tensor", None)
    if ds_tensor is None:
        return None
    return ds_tensor.data, ds_tensor.ds_numel * dist.get_rank(group=param.ds_process_group)


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's shape as the model defines it (ZeRO-3 keeps it in ``ds_shape``)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def gathered(param: torch.Tensor):
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    return contextlib.nullcontext()


def gathered_together(params: list[torch.Tensor]):
    """All of ``params`` in full at once (a LoRA module's base weight and its adapters); a collective."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def gathered_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter, gathered one at a time; a collective on every rank.

    The tensor is valid only until the next item is asked for (its gather is then released).
    """
    for name, param in model.named_parameters():
        with gathered(param):
            yield name, param.data


def apply_activation_checkpointing(layers: nn.ModuleList) -> None:
    """Wrap each layer so its activations are recomputed in backward (non-reentrant, ZeRO-3 safe:
    the recompute calls the module again, so DeepSpeed's hooks gather its parameters again).

    The wrapper adds ``_checkpoint_wrapped_module.`` to parameter names; the key map strips it.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def coalesce_gathers(layers: nn.ModuleList, routed: set[nn.Module]) -> int:
    """Make each dense block of a decoder layer (attention, dense MLP, router, shared experts) one
    ZeRO-3 gather unit; returns how many units were made.

    DeepSpeed fetches a module's own parameters at its pre-forward and pre-backward hooks, one
    all-gather (and one Python hook round) per module.  A "z3 leaf" is fetched whole by one
    coalesced all-gather and its children get no hooks: MLA's 4 projections become 1 gather and
    the 3 SwiGLU linears 1, in forward and in backward, which cuts collectives, kernel launches and
    hook work on a GPU as on a CPU.  The routed experts (``routed``: the modules holding them, and
    their shards) never go into a unit: their shards already are one gather each, and a unit over
    them would hold all of a layer's experts gathered at once instead of one shard.  The live
    gathered bytes grow at most to a whole attention block (a few linears of the layer), never to
    the experts.
    """
    from deepspeed.utils import set_z3_leaf_module

    made = 0

    def visit(module: nn.Module) -> None:
        nonlocal made
        for child in module.children():
            if child in routed:
                continue
            if any(m in routed for m in child.modules()):
                visit(child)  # the MoE block: coalesce its router and shared experts, not its experts
            elif next(child.parameters(), None) is not None:
                set_z3_leaf_module(child, True)
                made += 1

    for layer in layers:
        visit(layer)
    return made


def initialize(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, ds_config: dict[str, Any]
) -> tuple[Any, Any]:
    """The DeepSpeed engine and its scheduler (the process group already exists)."""
    import deepspeed

    with _muon_unimported():
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
    if is_zero3(ds_config):
        keep_whole(engine)
    return engine, scheduler


_MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


@contextlib.contextmanager
def _muon_unimported() -> Iterator[None]:
    """DeepSpeed 0.19's ``initialize`` imports its Muon optimizer only to ask whether ours is one
    (``is_zero_supported_optimizer``, the ZeRO optimizers' ``isinstance`` checks); importing it runs
    ``torch.compile`` on Muon's kernels, which loads torch._inductor: ~1 s of CPU in every rank of every
    run.  Ours is torch's AdamW or DeepSpeed's CPU Adam, never Muon, so while ``initialize`` runs that
    module is a class nothing is an instance of: every answer DeepSpeed gets is the one the real class
    gives.  Afterwards the real module imports as usual (nothing here stays in ``sys.modules``)."""
    if _MUON in sys.modules:  # already imported for real: nothing to save
        yield
        return
    stand_in = types.ModuleType(_MUON, "moe_train's stand-in while deepspeed.initialize runs")
    stand_in.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})
    sys.modules[_MUON] = stand_in
    try:
        yield
    finally:
        if sys.modules.get(_MUON) is stand_in:
            del sys.modules[_MUON]


# ---------------------------------------------------------------- local experts kept whole through a step
WHOLE = "moe_train_zero3_whole"  # a module attribute: its parameters stay gathered from forward to the step


def mark_whole(module: nn.Module) -> None:
    """Every parameter under ``module`` is to stay whole from its first use in a step to the optimizer step
    (the local experts: always when their expert-data-parallel group is this rank alone, with
    ``--hold-experts`` over a larger group); ``keep_whole`` takes them out of ZeRO-3's fetch/release."""
    setattr(module, WHOLE, True)


def keep_whole(engine: Any) -> int:
    """Take the parameters of every ``mark_whole`` module out of ZeRO-3's per-module fetch and release;
    returns how many modules lost DeepSpeed's hooks.

    DeepSpeed 0.19.8 fetches a module's parameters at its forward and again at its backward, and frees
    them after each, with four hooks per module every layer (and an autograd Function around every
    output and input).  For the local experts that costs:
    - over a group of one rank (``--ep N`` on N ranks), where a partition is the whole parameter, the hooks
      alone: the "gather" only points ``param.data`` at the partition (and on a GPU synchronises the stream);
    - over a group of M > 1 ranks (``--hold-experts``), a second all-gather of every expert shard per layer,
      in backward, of bytes the forward had already fetched.
    Its own way to keep a parameter, ``ds_persist``, does not fit: persistent parameters are re-gathered
    after every step by the sequential all-gather, which copies them into a new buffer even over one rank,
    and are never freed (twice the experts' memory over one rank; their full weights at all times).

    Here the module's hooks are removed, and one forward pre-hook of ours (``_fetch_whole``) makes each
    released parameter whole: over one rank ``param.data`` views the partition (no copy); over M ranks one
    coalesced all-gather of DeepSpeed's own fetches the module's parameters, once per step (forward), and
    the backward uses them as they are.  Either way it marks them ``AVAILABLE`` (else ZeRO-3's parameter
    getter, active during the engine's forward, would register them as external parameters of the enclosing
    module and gather a copy).  Only the optimizer step's release-all (also before a checkpoint load, and an
    export's ``GatheredParameters`` exit) frees them; the next forward fetches them again, so a step never
    computes with weights older than the last update.  The partition is what the optimizer updates, and the
    gradient hooks (on the parameters, not the modules) still reduce-scatter the gradients over the group,
    so the optimizer, clipping and the training checkpoints see them as before.  The cost over M > 1 ranks:
    the local experts of every layer are live at once, from their forward to the step (their full weights;
    ``moe-train plan --hold-experts`` counts them)."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    roots = [m for m in engine.module.modules() if getattr(m, WHOLE, False)]
    if offload is None or not roots:
        return 0
    # Under parameter offload the partition lives in host memory (or on NVMe) and a quantized partition is
    # not the weight: neither can feed the device's GEMM as it is, so DeepSpeed's fetch (a copy) stays.
    if offload.offload_device is not None or getattr(offload, "zero_quantized_weights", False):
        return 0
    modules = {m for root in roots for m in root.modules()}
    params = [p for root in roots for p in root.parameters()]
    # DeepSpeed's own hook handles on these modules (pre/post forward and the backward wrappers).
    dicts = {id(getattr(m, kind)) for m in modules for kind in ("_forward_pre_hooks", "_forward_hooks")}
    for handles in (offload.forward_hooks, offload.backward_hooks):
        mine = [h for h in handles if id(h.hooks_dict_ref()) in dicts]
        for h in mine:
            h.remove()
            handles.remove(h)
    # Small ones may have been made persistent (param_persistence_threshold): ours are kept another way.
    persistent = engine.optimizer.persistent_parameters
    for p in params:
        if getattr(p, "ds_persist", False):
            p.ds_persist = False
            if any(q is p for q in persistent):
                persistent.pop(next(i for i, q in enumerate(persistent) if q is p))
        if p.ds_status.name != "NOT_AVAILABLE":
            p.partition()
    for root in roots:
        root.register_forward_pre_hook(_fetch_whole)
    return len(modules)


def whole_bytes(model: nn.Module) -> int:
    """Bytes of the ``mark_whole`` parameters at their full size (live from forward to step when held)."""
    roots = [m for m in model.modules() if getattr(m, WHOLE, False)]
    return sum(p.ds_numel * p.element_size() for root in roots for p in root.parameters())


def _fetch_whole(module: nn.Module, _args: Any) -> None:
    """Every released parameter under ``module`` made whole (``keep_whole``): a view of its partition over a
    group of one rank, else one coalesced all-gather over its group (every rank of it runs this forward)."""
    batches: dict[tuple[int, torch.dtype], list[nn.Parameter]] = {}
    for p in module.parameters():
        if p.ds_status.name != "AVAILABLE":  # one coalesced gather per group and dtype (DeepSpeed's rule)
            batches.setdefault((id(p.ds_process_group), p.dtype), []).append(p)
    for released in batches.values():
        if dist.get_world_size(group=released[0].ds_process_group) > 1:
            released[0].all_gather_coalesced(released).wait()  # DeepSpeed's gather: sets data and AVAILABLE
            continue
        for p in released:
            p.data = p.ds_tensor.data.narrow(0, 0, p.ds_numel).view(p.ds_shape)
            p.ds_status = type(p.ds_status).AVAILABLE


# ---------------------------------------------------------------- optimizer partitions (training checkpoints)
# The Adam moments a training checkpoint keeps per parameter (torch AdamW and DeepSpeed's CPU Adam name
# them alike); the fp32 master weights are the third kind, "master".
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class OwnedRange:
    """The elements [start, start + n) of one parameter's row-major flattening that this rank owns, as
    1-D views of its fp32 master weights and Adam moments (padding excluded)."""

    name: str
    shape: tuple[int, ...]
    start: int
    tensors: dict[str, torch.Tensor]  # "master", "exp_avg", "exp_avg_sq" -> (n,) views

    @property
    def n(self) -> int:
        return self.tensors["master"].numel()


def _zero_optimizer(engine: Any) -> Any:
    opt = engine.optimizer
    if not hasattr(opt, "fp32_partitioned_groups_flat") and not hasattr(opt, "single_partition_of_fp32_groups"):
        raise ValueError(
            "training checkpoints need a ZeRO-2 or ZeRO-3 DeepSpeed config (got a plain optimizer); "
            "use --deepspeed deepspeed_zero3 or --save-steps 0"
        )
    if getattr(opt, "swap_optimizer", False) or getattr(opt, "params_in_nvme_and_cpu", False):
        raise ValueError("training checkpoints do not support NVMe offload; offload to cpu or use --save-steps 0")
    inner = opt.optimizer
    if any(g.get("amsgrad") for g in inner.param_groups) or not hasattr(inner, "state"):
        raise ValueError(
            f"training checkpoints hold Adam/AdamW state only, not {type(inner).__name__} "
            "(or amsgrad); use the trainer's AdamW"
        )
    return opt


def _flat_groups(opt: Any) -> list[torch.Tensor]:
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return opt.fp32_partitioned_groups_flat
    return opt.single_partition_of_fp32_groups


def optimizer_ranges(engine: Any, create_state: bool = False) -> list[OwnedRange]:
    """Every parameter's owned range on this rank, in ``named_parameters`` order (ZeRO-2 or ZeRO-3).

    The optimizer's state appears at its first step; ``create_state`` makes it (zeros, step 0) so a
    checkpoint can be loaded into a fresh engine."""
    opt = _zero_optimizer(engine)
    inner = opt.optimizer
    flats = _flat_groups(opt)
    for flat in flats:
        if create_state and not inner.state.get(flat):
            step = 0 if hasattr(inner, "ds_opt_adam") else torch.tensor(0.0, dtype=torch.float32)
            inner.state[flat] = {"step": step, **{k: torch.zeros_like(flat) for k in MOMENTS}}
    out = []
    stage3 = hasattr(opt, "fp32_partitioned_groups_flat")
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:  # frozen (a LoRA base): no master copy, no moments
            continue
        if stage3:
            group, offset, _ = opt.grad_position[opt.get_param_id(p)]
            start = p.ds_tensor.ds_numel * dist.get_rank(group=p.ds_process_group)
            n = max(0, min(p.ds_tensor.ds_numel, p.ds_numel - start))
        else:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:  # none of this parameter lives in this rank's partition
                continue
            group = mapping.param_group_index
            offset, n = mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel
            start = mapping.lp_fragment_address.start
        flat = flats[group]
        views = {"master": flat.narrow(0, offset, n)}
        state = inner.state.get(flat) or {}
        views.update({k: state[k].narrow(0, offset, n) for k in MOMENTS if k in state})
        out.append(OwnedRange(name, full_shape(p), start, views))
    return out


def optimizer_step_count(engine: Any) -> int:
    """Adam's step count (bias correction); 0 before the first step."""
    opt = _zero_optimizer(engine)
    for flat in _flat_groups(opt):
        state = opt.optimizer.state.get(flat)
        if state and "step" in state:
            return int(state["step"])
    return 0


def set_optimizer_step_count(engine: Any, step: int) -> None:
    opt = _zero_optimizer(engine)
    for flat in _flat_groups(opt):
        state = opt.optimizer.state[flat]
        if torch.is_tensor(state["step"]):
            state["step"].fill_(float(step))
        else:
            state["step"] = int(step)


def begin_load(engine: Any) -> None:
    """Before writing master weights into a live engine: release ZeRO-3's gathered parameters."""
    if hasattr(engine.optimizer, "checkpoint_event_prologue"):
        engine.optimizer.checkpoint_event_prologue()


def finish_load(engine: Any) -> None:
    """After the master weights were written: the working (bf16/fp32) weights follow them on every rank."""
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        for i in range(len(opt.fp32_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(i)  # copy fp32 -> partition (a no-op when aliased)
        opt.checkpoint_event_epilogue()  # re-gathers the persistent (small, never partitioned away) parameters
    else:
        opt.update_lp_params()  # ZeRO-2: each rank's fp32 partition -> its bit16 share, then all-gather


def set_engine_step(engine: Any, step: int, grad_accum: int) -> None:
    """DeepSpeed's own counters, as an uninterrupted run would have them."""
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()
    engine.micro_steps = step * grad_accum
