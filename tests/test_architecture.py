"""The architecture's contracts: family registry, strict key map, canonical keys after wrapping,
counts from the meta model, the spec's costs (units, attention shape, FLOPs) pinned against the model,
checkpoint I/O outside the model, strict config, preserved export fields, the expert layout kept out of
the config."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_train.checkpoint.hf_layout import save_pretrained
from moe_train.models import families, param_counts, spec_for, spec_of
from moe_train.models.common.experts import ExpertLayout
from moe_train.models.deepseek_v2 import SPEC, DeepseekV2Config, DeepseekV2ForCausalLM
from moe_train.plan.memory import count_params
from tests.conftest import TINY_LAYOUT, hf_reference, tiny_config
from tests.launch import cpu_env


def test_registry_finds_the_family_and_refuses_others():
    assert spec_for("deepseek_v2") is SPEC is spec_of(tiny_config())
    with pytest.raises(ValueError, match="model_type='llama', which moe-train does not train; supported: deepseek_v2"):
        spec_for("llama")


def test_key_map_is_strict():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.rotary.inv_freq' has no key"):
        SPEC.ours_to_hf("model.layers.0.self_attn.rotary.inv_freq", cfg, TINY_LAYOUT)
    # wrapper segments are stripped explicitly, never exported
    assert SPEC.ours_to_hf("module.model._orig_mod.norm.weight", cfg, TINY_LAYOUT)[0][0] == "model.norm.weight"


@pytest.mark.parametrize("size", ["tiny", "deepseek-v2-lite", "deepseek-v2"])
def test_meta_model_counts_pin_the_planners_analytic_ones(size):
    cfg = DeepseekV2Config.from_name(size)
    counts = param_counts(cfg)
    assert counts.total == count_params(cfg)  # the planner's per-module units add up to the real model
    hand_count = {"tiny": 129_792, "deepseek-v2-lite": 2_451_308_544, "deepseek-v2": 20_850_769_920}
    assert counts.active_matmul == hand_count[size]  # the seed's hand-written formula, before the meta count


# The spec's costs against the model itself: every family's debug size in three layouts, and V2-Lite.
COST_CASES = [
    (spec.name, size, layout)
    for spec in families()
    for size, hub in spec.hub_ids.items()
    if hub is None
    for layout in (ExpertLayout(), TINY_LAYOUT, ExpertLayout("origin"))
] + [("deepseek_v2", "deepseek-v2-lite", ExpertLayout("shard", 8))]


def _family(name):
    return next(s for s in families() if s.name == name)


@pytest.mark.parametrize("family,size,layout", COST_CASES, ids=lambda v: getattr(v, "moe_implementation", v))
def test_units_are_the_models_modules_in_forward_order(family, size, layout):
    """``layer_units`` name every module with parameters of each decoder layer, with its numel and
    tensor count, in the order the forward calls them (ZeRO-3's trace; the planner replays it)."""
    spec = _family(family)
    cfg = spec.named_config(size)
    with torch.device("meta"):
        meta = spec.build(cfg, layout)
    for i, layer in enumerate(spec.layers(meta)):
        modules = [(n, m) for n, m in layer.named_modules() if any(True for _ in m.parameters(recurse=False))]
        real = [
            (n, sum(p.numel() for p in m.parameters(recurse=False)), len(list(m.parameters(recurse=False))))
            for n, m in modules
        ]
        units = spec.layer_units(cfg, layout, i)
        assert [(u.name, u.numel, u.tensors) for u in units] == real, f"layer {i}"
        experts = [u.expert for u in units if u.expert is not None]
        assert experts == sorted(experts) and all(".experts." in u.name for u in units if u.expert is not None)
        assert sum(u.attention_kernel for u in units) == 1
    if size == "deepseek-v2-lite":
        return
    model = spec.build(cfg, layout).eval()
    called = []
    for name, m in model.model.layers[-1].named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            m.register_forward_pre_hook(lambda m, args, name=name: called.append(name))
    model(torch.randint(0, cfg.vocab_size, (1, 12)))
    order = [u.name for u in spec.layer_units(cfg, layout, cfg.num_hidden_layers - 1)]
    assert called == order


@pytest.mark.parametrize("family", [s.name for s in families()])
def test_attention_shape_and_flops_are_what_the_model_computes(family):
    """The spec's ``AttentionShape`` is what every layer's attention kernel receives; ``train_flops`` is
    3 x the forward's matmul FLOPs (counted by torch on the origin layout, where every expert is an
    nn.Linear) plus 3 x causal attention over each sample."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = _family(family)
    cfg = spec.named_config(next(s for s, hub in spec.hub_ids.items() if hub is None))
    model = spec.build(cfg, ExpertLayout("origin")).eval()
    seen = []
    for m in model.modules():
        if isinstance(m, spec.attention_types):
            m.inner_attention.register_forward_pre_hook(lambda m, args: seen.append([a.shape for a in args[:3]]))
    T = 24
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, cfg.vocab_size, (1, T)))
    shape = spec.attention(cfg)
    assert len(seen) == shape.layers
    for q, k, v in seen:
        assert (q[2], k[2], q[3], v[3]) == (shape.heads, shape.kv_heads, shape.qk_dim, shape.v_dim)
    assert counter.get_total_flops() == 2 * param_counts(cfg).active_matmul * T  # SDPA on CPU is not counted
    causal = shape.layers * shape.heads * (shape.qk_dim + shape.v_dim) * 2 * T * T / 2
    assert spec.train_flops(cfg, [T]) == 3 * (counter.get_total_flops() + causal)
    rope = model.rotary(torch.arange(T)[None])
    assert sum(t.numel() * t.element_size() for t in rope) == shape.rope_bytes * T


def test_the_expert_layout_is_not_part_of_the_config():
    """The checkpoint schema has no layout field and the layout changes no count, key set or export."""
    cfg = tiny_config()
    assert not {"moe_implementation", "expert_in_one_shard"} & set(cfg.to_hf_dict())
    assert not {"moe_implementation", "expert_in_one_shard"} & set(cfg.schema_fields())
    keys = {
        tuple(sorted(k for n, _ in spec_of(cfg).build(cfg, layout).named_parameters()
                     for k, _ in SPEC.ours_to_hf(n, cfg, layout)))
        for layout in (ExpertLayout(), TINY_LAYOUT, ExpertLayout("origin"))
    }  # fmt: skip
    assert len(keys) == 1


_WRAPPED = textwrap.dedent("""
    import json, sys, torch, warnings
    from moe_train.engine.deepspeed_config import fill_auto, load_deepspeed_config
    from moe_train.engine.distributed import hard_exit, init_distributed
    from moe_train.engine.model import build_model
    from moe_train.checkpoint.hf_layout import expected_hf_keys, save_pretrained
    from moe_train.models.deepseek_v2 import DeepseekV2Config
    from moe_train.parallel import zero3

    from moe_train.models.common.experts import ExpertLayout
    from moe_train.parallel import ParallelDims

    info = init_distributed("none")
    cfg = DeepseekV2Config.from_name("tiny")
    ds = fill_auto(load_deepspeed_config("deepspeed_zero3"), micro_batch_size=1, grad_accum=1, world_size=1,
                   grad_clip=1.0, bf16=False, hidden_size=cfg.hidden_size)
    model = build_model(cfg, ExpertLayout("shard", 4), ParallelDims(1), ds, torch.float32, torch.device("cpu"),
                        None, seed=0, activation_checkpointing=True)
    engine, _ = zero3.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3), None, ds)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    out = engine(ids, labels=ids)
    engine.backward(out.loss + out.aux_loss)
    engine.step()
    names = [n for n, _ in engine.module.named_parameters()]
    save_pretrained(engine.module, sys.argv[1], tensors=zero3.gathered_parameters(engine.module))
    print(json.dumps({"names": names, "keys": sorted(expected_hf_keys(engine.module))}))
    hard_exit(0)
""")


@pytest.mark.slow
def test_exported_keys_are_canonical_after_wrapping(tmp_path):
    """DeepSpeed's engine and activation checkpointing add name segments; the export has exactly the HF keys."""
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPED, str(tmp_path / "hf")],
        env=cpu_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any("_checkpoint_wrapped_module" in n for n in got["names"])  # the wrapping did happen
    hf_reference(tiny_config()).save_pretrained(tmp_path / "transformers")  # transformers writes per-expert keys
    from safetensors import safe_open

    with safe_open(str(tmp_path / "transformers" / "model.safetensors"), "pt") as f:
        hf_keys = sorted(f.keys())
    assert got["keys"] == hf_keys
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == hf_keys
    # The output is a NamedTuple, which DeepSpeed's ZeRO-3 hooks walk: no warning about unknown outputs.
    assert "unknown inputs or outputs type" not in proc.stdout + proc.stderr


def test_from_pretrained_is_attached_by_the_checkpoint_package_and_models_import_no_files():
    import moe_train.models.deepseek_v2.model as model_module

    assert DeepseekV2ForCausalLM.from_pretrained.__func__.__module__ == "moe_train.checkpoint"
    source = open(model_module.__file__).read()
    assert "moe_train.checkpoint" not in source.replace("``moe_train.checkpoint``", "")


def test_export_preserves_source_fields_and_copies_remote_code(tmp_path):
    src = tmp_path / "src"
    hf_reference(tiny_config()).save_pretrained(src)
    d = json.loads((src / "config.json").read_text())
    d["auto_map"] = {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"}
    d["quantization_config"] = {"quant_method": "fp8"}  # no longer describes dequantised weights
    (src / "config.json").write_text(json.dumps(d))
    (src / "modeling_deepseek.py").write_text("# DeepSeek's remote code\n")
    model = DeepseekV2ForCausalLM.from_pretrained(str(src))
    save_pretrained(model, str(tmp_path / "out"), source_dir=str(src))
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["auto_map"] == d["auto_map"] and "quantization_config" not in out
    assert out["model_type"] == "deepseek_v2" and out["torch_dtype"] == "float32"
    assert (tmp_path / "out" / "modeling_deepseek.py").read_text() == "# DeepSeek's remote code\n"


@pytest.mark.parametrize(
    "field,value",
    [("hidden_act", "gelu"), ("attention_dropout", 0.1), ("tie_word_embeddings", True), ("pretraining_tp", 2)],
)
def test_unsupported_config_values_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r} is not supported"):
        tiny_config(**{field: value})


def test_yarn_without_original_max_position_embeddings_defaults_as_deepseek():
    from moe_train.models.common.mla import mla_rope

    rs = dict(tiny_config().rope_scaling)
    rs.pop("original_max_position_embeddings")
    positions = torch.arange(32)[None]
    default = mla_rope(tiny_config(rope_scaling=rs), positions)
    explicit = mla_rope(tiny_config(rope_scaling={**rs, "original_max_position_embeddings": 4096}), positions)
    assert all(torch.equal(a, b) for a, b in zip(default, explicit))
