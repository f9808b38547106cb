"""LoRA's files: the PEFT adapter directory, the merged HF export, and the reference to the frozen base that a
LoRA training checkpoint keeps instead of the base's weights.

PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``), as PEFT 0.21 loads it onto
transformers 5's DeepseekV2/V3ForCausalLM:

- attention adapters through ``target_modules`` (a regex over the HF module paths):
  ``base_model.model.{module}.lora_A.weight`` (R, I) and ``...lora_B.weight`` (O, R), as ours.
- dense-MLP and shared-expert adapters through ``target_parameters`` on each projection's 2-D ``weight``
  (``mlp.gate_proj.weight``, ``mlp.shared_experts.up_proj.weight``, ...), same keys and shapes.  Not through
  ``target_modules``: on transformers 5 MoE models PEFT rewrites any ``gate_proj``/``up_proj``/``down_proj``
  module target into the fused experts (its v4-to-v5 conversion, with rank 2r on ``gate_up_proj``), so such
  adapters would not load.
- routed experts through ``target_parameters`` on the fused (E, 2F, D) ``gate_up_proj`` and (E, D, F)
  ``down_proj`` of ``mlp.experts``.  PEFT's ``ParamWrapper`` holds lora_A (R*E, I) whose row e*R + r is
  expert e's A row r, and lora_B (O, R*E) whose column r*E + e is expert e's B column r (see
  ``ParamWrapper.get_delta_weight``).  PEFT nests the two wrappers on the one module, gate_up_proj inside:
  its adapters are ``...mlp.experts.base_layer.lora_{A,B}.weight``, down_proj's ``...mlp.experts.lora_{A,B}.weight``.
- ``lora_dropout`` is written as 0: PEFT refuses any other value on expert parameters, and dropout does not
  act at inference.

Every function that reads a partitioned model takes ``gather(params)``, a context manager that makes those
parameters whole on every rank (``moe_train.parallel.zero3.gathered_together``): one module's, or one layer's
experts', at a time; under expert parallelism ``all_experts`` then joins the EP ranks' experts of a layer (an
all-gather over the EP group, as small as the adapters).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
import xxhash
from torch import nn

from moe_train.checkpoint.hf_layout import HFCheckpoint
from moe_train.checkpoint.safetensors_io import PlannedTensor, SafetensorsStreamWriter
from moe_train.models import spec_of
from moe_train.models.common.key_map import canonical_name
from moe_train.models.common.lora import (
    LoraConfig,
    LoraExpertShard,
    LoraLinear,
    adapted_modules,
    adapter_keys,
    apply_lora,
    is_adapter,
    target_of,
)
from moe_train.storage import redact, resolve

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
COMPLETE = "COMPLETE"
PEFT_PREFIX = "base_model.model."
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# Where PEFT's nested wrappers put each fused parameter's adapters under ``mlp.experts``.
_EXPERT_WRAPPER = {"gate_up_proj": "base_layer.", "down_proj": ""}

Gather = Callable[[list[torch.Tensor]], Any]
# A layer's (E, ...) per-expert tensor from this rank's rows of it (``parallel.distribute.all_experts``).
AllExperts = Callable[[torch.Tensor], torch.Tensor]


def _this_rank(local: torch.Tensor) -> torch.Tensor:
    return local  # no expert parallelism: a rank's shards are all the experts


def _units(model: nn.Module) -> Iterator[tuple[str, list[nn.Module]]]:
    """(canonical module path, modules) of what PEFT adapts as one unit, in model order: a ``LoraLinear``, or
    the ``LoraExpertShard``s of one layer's routed experts (under expert parallelism: this rank's)."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield canonical_name(name), [module]
        else:
            shards = list(module.children())
            if shards and all(isinstance(s, LoraExpertShard) for s in shards):
                yield canonical_name(name), shards


def _expert_factors(
    shards: list[LoraExpertShard], base: str, all_experts: AllExperts
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (R*E, I) lora_A and (O, R*E) lora_B of the fused parameter ``base`` from the shards' full
    (S, R, I) As and (S, O, R) Bs (and, through ``all_experts``, the other EP ranks')."""
    a_ERI = all_experts(torch.cat([getattr(s, f"{base.removesuffix('_proj')}_lora_A") for s in shards]))
    b_EOR = all_experts(torch.cat([getattr(s, f"{base.removesuffix('_proj')}_lora_B") for s in shards]))
    E, R, _ = a_ERI.shape
    return a_ERI.reshape(E * R, -1), b_EOR.permute(1, 2, 0).reshape(b_EOR.shape[1], R * E)


def _plan(model: nn.Module, lora: LoraConfig) -> list[PlannedTensor]:
    """Every PEFT tensor's key, dtype and full shape (from the modules' sizes: partitions have none)."""
    cfg, R = model.config, lora.rank
    out = []
    for path, modules in _units(model):
        m = modules[0]
        dtype = m.lora_A.dtype if isinstance(m, LoraLinear) else m.gate_up_lora_A.dtype
        if isinstance(m, LoraLinear):
            shapes = {"": ((R, m.in_features), (m.out_features, R))}
        else:
            E, D, F_ = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
            shapes = {
                _EXPERT_WRAPPER["gate_up_proj"]: ((R * E, D), (2 * F_, R * E)),
                _EXPERT_WRAPPER["down_proj"]: ((R * E, F_), (D, R * E)),
            }
        for wrapper, (a, b) in sorted(shapes.items(), reverse=True):  # "base_layer." (gate_up) first
            out.append(PlannedTensor(f"{PEFT_PREFIX}{path}.{wrapper}lora_A.weight", dtype, a))
            out.append(PlannedTensor(f"{PEFT_PREFIX}{path}.{wrapper}lora_B.weight", dtype, b))
    return out


def peft_tensors(
    model: nn.Module, gather: Gather, all_experts: AllExperts = _this_rank
) -> Iterator[tuple[str, torch.Tensor]]:
    """(PEFT key, full tensor) in ``_plan``'s order; a collective on every rank (one unit gathered at a time)."""
    for path, modules in _units(model):
        params = [p for m in modules for n, p in m.named_parameters() if is_adapter(n)]
        with gather(params):
            if isinstance(modules[0], LoraLinear):
                yield f"{PEFT_PREFIX}{path}.lora_A.weight", modules[0].lora_A.data
                yield f"{PEFT_PREFIX}{path}.lora_B.weight", modules[0].lora_B.data
                continue
            for base in ("gate_up_proj", "down_proj"):
                a, b = _expert_factors(modules, base, all_experts)
                yield f"{PEFT_PREFIX}{path}.{_EXPERT_WRAPPER[base]}lora_A.weight", a.data
                yield f"{PEFT_PREFIX}{path}.{_EXPERT_WRAPPER[base]}lora_B.weight", b.data


def _module_pattern(paths: list[str]) -> str | None:
    """A regex PEFT full-matches against module paths: each adapted path with its layer index generalised."""
    forms = sorted({re.sub(r"\\\.\d+\\\.", lambda _: r"\.\d+\.", re.escape(p)) for p in paths})
    return f"(?:{'|'.join(forms)})" if forms else None


def _in_layer(path: str) -> str:
    """``model.layers.3.mlp.gate_proj`` -> ``mlp.gate_proj``: a path as PEFT's target_parameters name it."""
    return re.sub(r"^.*?\blayers\.\d+\.", "", path)


def adapter_config(model: nn.Module, lora: LoraConfig, base_url: str | None) -> dict[str, Any]:
    """``adapter_config.json``: what PEFT needs to rebuild the wrappers, nothing speculative."""
    linear = [path for path, modules in _units(model) if isinstance(modules[0], LoraLinear)]
    paths = [p for p in linear if target_of(p) == "attention"]
    parameters = sorted({f"{_in_layer(p)}.weight" for p in linear if target_of(p) != "attention"})
    if any(isinstance(m[0], LoraExpertShard) for _, m in _units(model)):
        parameters += EXPERT_PARAMETERS
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": redact(base_url) if base_url else None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": _module_pattern(paths),
        "target_parameters": parameters or None,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


@torch.no_grad()
def save_adapter(
    model: nn.Module,
    url: str,
    lora: LoraConfig,
    gather: Gather,
    *,
    all_experts: AllExperts = _this_rank,
    is_writer: bool = True,
    base_url: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Stream the adapters into a PEFT adapter directory at ``url`` (COMPLETE last); a collective: every rank
    iterates, the ``is_writer`` rank writes, one gathered unit at a time."""
    fs, root = resolve(url)
    writer = None
    if is_writer:
        fs.makedirs(root, exist_ok=True)
        if fs.exists(posixpath.join(root, COMPLETE)):
            fs.rm(posixpath.join(root, COMPLETE))
        writer = SafetensorsStreamWriter(fs, posixpath.join(root, ADAPTER_WEIGHTS), _plan(model, lora))
    try:
        for key, tensor in peft_tensors(model, gather, all_experts):
            if writer is not None:
                writer.append(key, tensor)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        with fs.open(posixpath.join(root, ADAPTER_CONFIG), "w") as f:
            json.dump(adapter_config(model, lora, base_url), f, indent=2)
        with fs.open(posixpath.join(root, COMPLETE), "w") as f:
            json.dump({"files": [ADAPTER_CONFIG, ADAPTER_WEIGHTS], **(extra or {})}, f, indent=2)


def merged_parameters(model: nn.Module, gather: Gather) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of every base parameter in ``named_parameters`` order, each adapted one with its
    adapters merged in (W + scaling * B A, per expert for the routed experts); adapters are skipped.  A
    collective on every rank; for ``save_pretrained(tensors=...)``."""
    owners = {}
    for name, module, adapters in adapted_modules(model):
        for base, (a, b) in adapters.items():
            owners[f"{name}.{base}" if name else base] = (module, a, b)
    for name, param in model.named_parameters():
        if is_adapter(name):
            continue
        if name not in owners:
            with gather([param]):
                yield name, param.data
            continue
        module, a, b = owners[name]
        a, b = getattr(module, a), getattr(module, b)
        with gather([param, a, b]):
            yield name, module.merged_weight(param.data, a.data, b.data)


def checkpoint_shapes(model: nn.Module, lora: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Training-checkpoint key -> shape of every adapter of the whole model (every routed expert's, whichever
    this rank holds under EP), from the model built on the meta device: what a LoRA checkpoint must cover."""
    with torch.device("meta"):
        reference = apply_lora(spec_of(model).build(model.config, model.layout), lora)
    S = model.layout.shard_size(model.config.num_experts)
    return {
        key: slot.shape(tuple(p.shape))
        for name, p in reference.named_parameters()
        if is_adapter(name)
        for key, slot in adapter_keys(name, S)
    }


def base_reference(url: str | None, model_size: str | None, family: str, seed: int) -> dict[str, Any]:
    """What a LoRA checkpoint records of its frozen base: the URL and a cheap fingerprint (every file's
    size and safetensors header: keys, dtypes, shapes; never the weights), or the seeded named size."""
    if not url:
        return {"model_size": model_size, "family": family, "seed": seed}
    source = HFCheckpoint(url)
    h = xxhash.xxh3_64()
    total = 0
    for file, keys in source.keys_by_file():
        size = source.fs.size(posixpath.join(source.root, file))
        total += size
        h.update(json.dumps([file, size, [[k, list(source.shape(k)), str(source.dtype(k))] for k in keys]]).encode())
    return {"url": redact(url), "bytes": total, "fingerprint": h.hexdigest()}


def check_base(saved: dict[str, Any] | None, now: dict[str, Any], where: str) -> None:
    """Refuse, in one line, to resume adapters on a base other than the one they were trained on."""
    same = saved is not None and {k: v for k, v in saved.items() if k != "url"} == {
        k: v for k, v in now.items() if k != "url"
    }
    if not same:
        was = "none" if saved is None else saved.get("url") or saved.get("model_size")
        raise ValueError(
            f"{where} holds LoRA adapters of another base ({was}, fingerprint "
            f"{saved and saved.get('fingerprint')}) than {now.get('url') or now.get('model_size')} "
            f"({now.get('fingerprint')}); resume with the checkpoint's --model"
        )
