"""DeepSeek V3 family: parity with transformers' DeepseekV3ForCausalLM (fp32, CPU), the noaux_tc router,
HF round trip, aux-loss-free bias updates, block-FP8 dequantisation and MTP carry-through."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_train.checkpoint  # noqa: F401  (attaches from_pretrained / save_pretrained)
from moe_train.checkpoint.hf_layout import HFCheckpoint, load_pretrained, save_pretrained
from moe_train.models import spec_for, spec_of
from moe_train.models.deepseek_v3 import NAMED_SIZES, DeepseekV3Config, DeepseekV3ForCausalLM
from moe_train.models.deepseek_v3.moe import NoAuxRouter, update_correction_bias
from tests.conftest import randomised_hf_model
from tests.test_model_parity import hf_grads_by_checkpoint_key, our_grads_by_checkpoint_key

TOL = 1e-4

CASES = {
    # name: (config overrides, moe_implementation, expert_in_one_shard)
    "groups4_keep2-norm-dense1-shard4": (dict(), "shard", 4),
    "groups4_keep2-norm-dense1-shard1": (dict(), "shard", 1),
    "groups2_keep1-nonorm-dense0-all_in_one": (
        dict(n_group=2, topk_group=1, norm_topk_prob=False, first_k_dense_replace=0, q_lora_rank=None),
        "shard",
        8,
    ),
    "groups1-norm-dense2-shard2-no_yarn": (
        dict(n_group=1, topk_group=1, first_k_dense_replace=2, num_hidden_layers=4, rope_scaling=None),
        "shard",
        2,
    ),
    "groups4_keep2-norm-dense1-origin": (dict(), "origin", None),
}


def tiny_v3(**overrides) -> DeepseekV3Config:
    return DeepseekV3Config.from_name("tiny-v3", **overrides)


def hf_v3_reference(cfg: DeepseekV3Config, seed: int = 0):
    """transformers' DeepseekV3ForCausalLM with random weights and a random correction bias, fp32."""
    from transformers import DeepseekV3Config as HFConfig
    from transformers import DeepseekV3ForCausalLM as HFModel

    model = randomised_hf_model(HFConfig, HFModel, cfg, seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)  # comparable to the spread of the sigmoid scores: it changes selection
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_grads_match_transformers(case, tmp_path):
    overrides, impl, shard = CASES[case]
    cfg = tiny_v3(**overrides)
    hf = hf_v3_reference(cfg)
    hf.save_pretrained(tmp_path)
    ours = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), moe_implementation=impl, expert_in_one_shard=shard)
    ours.eval()
    for name, b in hf.named_buffers():
        if name.endswith("e_score_correction_bias"):
            assert torch.equal(dict(ours.named_buffers())[name], b)  # the bias was loaded, not left at zero

    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    labels = ids.clone()
    labels[:, :5] = -100
    ref = hf(input_ids=ids, labels=labels)
    out = ours(ids, labels=labels)
    logit_diff = (ref.logits - out.logits).abs().max().item()
    assert logit_diff <= TOL, f"logits differ by {logit_diff}"
    assert abs(ref.loss.item() - out.loss.item()) <= TOL

    ref.loss.backward()
    out.loss.backward()
    ref_grads = hf_grads_by_checkpoint_key(hf, cfg)
    our_grads = our_grads_by_checkpoint_key(ours)
    assert ref_grads.keys() == our_grads.keys()
    worst = max(((ref_grads[k] - our_grads[k]).abs().max().item(), k) for k in ref_grads)
    print(f"{case}: max |logit diff| {logit_diff:.2e}, max |grad diff| {worst[0]:.2e} ({worst[1]})")
    assert worst[0] <= TOL, f"gradient of {worst[1]} differs by {worst[0]}"
    assert sum(g.abs().sum().item() > 0 for k, g in our_grads.items() if ".experts." in k) > 0


def test_router_matches_transformers_and_bias_steers_selection_only():
    from transformers import DeepseekV3Config as HFConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = tiny_v3(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type", "torch_dtype")}
    ref = DeepseekV3TopkRouter(HFConfig(**d))
    ours = NoAuxRouter(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        ref.weight.normal_(0, 0.3)
        ref.e_score_correction_bias.normal_(0, 0.2)
        ours.weight.copy_(ref.weight)
        ours.e_score_correction_bias.copy_(ref.e_score_correction_bias)
    x = torch.randn(64, cfg.hidden_size)
    _, ref_w, ref_i = ref(x)
    _, w, i = ours(x)
    # Same experts and weights per token (the order inside a token's top-k is free).
    ref_i, order = ref_i.sort(dim=-1)
    i, our_order = i.sort(dim=-1)
    assert torch.equal(ref_i, i)
    torch.testing.assert_close(ref_w.gather(1, order), w.gather(1, our_order), rtol=0, atol=1e-6)
    # Only experts of the kept groups are chosen, and the weights are the unbiased scores, scaled.
    G, per = cfg.n_group, cfg.n_routed_experts // cfg.n_group
    assert all(len(set((row // per).tolist())) <= cfg.topk_group for row in i)
    scores = torch.sigmoid(x @ ours.weight.T).gather(1, i)
    torch.testing.assert_close(w.gather(1, our_order), scores / scores.sum(-1, keepdim=True) * 2.5)
    # A large bias on one expert makes every token pick it, with its unbiased weight.
    with torch.no_grad():
        ours.e_score_correction_bias.zero_()
        ours.e_score_correction_bias[5] = 10.0
    _, _, i = ours(x)
    assert (i == 5).any(dim=-1).all()
    assert G > 1


def test_router_bias_stays_fp32_when_the_model_is_cast():
    model = DeepseekV3ForCausalLM(tiny_v3()).to(torch.bfloat16)
    routers = [m for m in model.modules() if isinstance(m, NoAuxRouter)]
    assert routers and all(r.e_score_correction_bias.dtype == torch.float32 for r in routers)
    assert all(r.weight.dtype == torch.bfloat16 for r in routers)


def test_bias_update_moves_against_the_load():
    model = DeepseekV3ForCausalLM(tiny_v3())
    load = torch.tensor([[10, 0, 5, 5, 5, 5, 5, 5], [1, 2, 3, 4, 5, 6, 7, 8]])
    figures = update_correction_bias(model, load, 0.01)
    biases = [m.e_score_correction_bias for m in model.modules() if isinstance(m, NoAuxRouter)]
    torch.testing.assert_close(biases[0], torch.tensor([-0.01, 0.01, 0, 0, 0, 0, 0, 0]))
    torch.testing.assert_close(biases[1], torch.tensor([0.01] * 4 + [-0.01] * 4))
    assert figures == {"correction_bias_absmax": [0.01, 0.01]}
    update_correction_bias(model, load, 0.0)  # rate 0 disables
    torch.testing.assert_close(biases[1], torch.tensor([0.01] * 4 + [-0.01] * 4))
    with pytest.raises(ValueError, match="layers"):
        update_correction_bias(model, load[:1], 0.01)


def test_balancing_evens_out_a_skewed_router():
    """With the weights frozen, bias updates alone spread tokens that all preferred two experts."""
    cfg = tiny_v3(n_group=1, topk_group=1, num_hidden_layers=2)
    router = NoAuxRouter(cfg)
    torch.manual_seed(0)
    x = torch.randn(512, cfg.hidden_size)
    with torch.no_grad():
        router.weight.normal_(0, 0.02)
        router.weight[:2] += x.mean(0) * 3  # experts 0 and 1 win for most tokens
    model = torch.nn.Module()
    model.router = router

    def load():
        return torch.bincount(router(x)[2].reshape(-1), minlength=cfg.n_routed_experts)

    before = load()
    for _ in range(300):
        update_correction_bias(model, load()[None], 1e-3)
    after = load()
    assert before.max() > 2 * before.float().mean()
    assert after.max() < 1.5 * after.float().mean(), (before.tolist(), after.tolist())


def test_sequence_balance_loss_in_training():
    model = DeepseekV3ForCausalLM(tiny_v3()).train()
    ids = torch.randint(0, 512, (2, 17))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    out.aux_loss.backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    model = DeepseekV3ForCausalLM(tiny_v3(aux_loss_alpha=0.0)).train()
    assert model(ids, labels=ids).aux_loss is None


@pytest.mark.parametrize("impl,shard", [("shard", 4), ("origin", None)])
def test_hf_round_trip_is_bit_identical(tmp_path, impl, shard):
    cfg = tiny_v3()
    hf = hf_v3_reference(cfg)
    hf.save_pretrained(tmp_path / "src")
    model = load_pretrained(str(tmp_path / "src"), moe_implementation=impl, expert_in_one_shard=shard)
    save_pretrained(model, str(tmp_path / "out"))
    src = _tensors(tmp_path / "src")
    out = _tensors(tmp_path / "out")
    assert src.keys() == out.keys()
    assert all(torch.equal(src[k], out[k]) and src[k].dtype == out[k].dtype for k in src)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and "quantization_config" not in config


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_kimi_k2_model_type_is_read_and_kept(tmp_path):
    cfg = tiny_v3()
    hf = hf_v3_reference(cfg)
    hf.save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["model_type"] = "kimi_k2"
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    assert spec_for("kimi_k2") is spec_for("deepseek_v3")
    # A V3 config extends V2's class; the family is found by its exact type.
    from tests.conftest import tiny_config

    assert spec_of(tiny_v3()).name == "deepseek_v3" and spec_of(tiny_config()).name == "deepseek_v2"
    from moe_train import DeepseekV2ForCausalLM

    with pytest.raises(ValueError, match="DeepseekV3ForCausalLM checkpoint, not DeepseekV2ForCausalLM"):
        DeepseekV2ForCausalLM.from_pretrained(str(tmp_path / "src"))
    model = load_pretrained(str(tmp_path / "src"))
    assert spec_of(model).name == "deepseek_v3"
    save_pretrained(model, str(tmp_path / "out"))
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["model_type"] == "kimi_k2" and out["auto_map"] == config["auto_map"]


def test_named_sizes():
    from transformers import DeepseekV3Config as HFConfig

    defaults = HFConfig()
    v3 = DeepseekV3Config.from_name("deepseek-v3")
    shape_fields = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "n_shared_experts",
        "n_routed_experts",
        "routed_scaling_factor",
        "kv_lora_rank",
        "q_lora_rank",
        "qk_rope_head_dim",
        "v_head_dim",
        "qk_nope_head_dim",
        "n_group",
        "topk_group",
        "num_experts_per_tok",
        "first_k_dense_replace",
        "norm_topk_prob",
    ]
    assert {f: getattr(v3, f) for f in shape_fields} == {f: getattr(defaults, f) for f in shape_fields}
    counts = {name: moe_train.models.param_counts(DeepseekV3Config.from_name(name)) for name in NAMED_SIZES}
    # Published totals: 671B (+14B MTP, not built), ~1.04T, ~16B; active 37B / 32B / 3B.
    assert 670e9 < counts["deepseek-v3"].total < 672e9
    assert 1.02e12 < counts["kimi-k2"].total < 1.04e12
    assert 15e9 < counts["moonlight-16b-a3b"].total < 16.5e9
    assert 36e9 < counts["deepseek-v3"].active_matmul < 38e9
    assert DeepseekV3Config.from_name("kimi-k2").to_hf_dict()["model_type"] == "kimi_k2"
    from moe_train.plan.memory import count_params

    # The planner's analytic count agrees with the model built on the meta device.
    assert all(count_params(DeepseekV3Config.from_name(name)) == counts[name].total for name in NAMED_SIZES)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(scoring_func="softmax"), "sigmoid"),
        (dict(topk_method="group_limited_greedy"), "noaux_tc"),
        (dict(n_group=3), "n_group"),
        (dict(n_group=8), "at least 2 experts"),
        (dict(topk_group=5), "topk_group"),
        (dict(topk_group=1, num_experts_per_tok=3), "raise topk_group"),
        (dict(rope_interleave=False), "rope_interleave"),
        (dict(moe_layer_freq=2), "moe_layer_freq"),
        (dict(quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]}), "128"),
    ],
)
def test_config_refuses_what_is_not_implemented(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_v3(**overrides)


# ------------------------------------------------------------------------------------------ FP8
def quantise_block_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block format: e4m3 values and one fp32 scale_inv per block, w ~= q * scale_inv."""
    rows, cols = w.shape
    nr, nc = math.ceil(rows / block), math.ceil(cols / block)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(nr, nc)
    for i in range(nr):
        for j in range(nc):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            s[i, j] = tile.abs().max().clamp(min=1e-12) / 448.0
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def reference_dequantise(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The format's definition, block by block: W[i, j] = float(q[i, j]) * scale_inv[i // 128, j // 128]."""
    w = torch.empty(q.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            w[rows, cols] = q[rows, cols].to(torch.float32) * s[i, j]
    return w


def test_fp8_dequantisation_is_exact_on_partial_blocks_and_ranges(tmp_path):
    torch.manual_seed(0)
    shapes = {"a.weight": (576, 300), "b.weight": (128, 128), "c.weight": (130, 7)}  # 576 = 4.5 blocks
    tensors, reference = {}, {}
    for key, shape in shapes.items():
        q, s = quantise_block_fp8(torch.randn(shape) * 3)
        tensors[key], tensors[key + "_scale_inv"] = q, s
        reference[key] = reference_dequantise(q, s)
    tensors["norm.weight"] = torch.randn(300, dtype=torch.bfloat16)
    save_file(tensors, tmp_path / "model.safetensors")
    src = HFCheckpoint(str(tmp_path))
    assert set(src.weight_map) == {*shapes, "norm.weight"}  # the scales are consumed with their weights
    for key in shapes:
        assert src.dtype(key) == torch.float32 and tuple(src.shape(key)) == shapes[key]
        assert torch.equal(src.read(key), reference[key])
        n = reference[key].numel()
        for start, end in [(0, 1), (5, 1000), (127 * 300 + 11, 129 * 300 + 3), (n - 7, n), (n // 3, 2 * n // 3)]:
            if end <= n:
                assert torch.equal(src.read(key, start, end), reference[key].reshape(-1)[start:end]), (key, start)
    assert torch.equal(src.read("norm.weight"), tensors["norm.weight"])


def _fp8_checkpoint(tmp_path, cfg, mtp: bool):
    """A tiny V3 checkpoint in the official format: 2-D projection weights FP8 with block scales (the
    router, norms, embeddings and lm_head stay unquantised, as in DeepSeek's release), plus MTP keys."""
    hf = hf_v3_reference(cfg)
    hf.save_pretrained(tmp_path / "bf16")
    tensors = _tensors(tmp_path / "bf16")
    out = {}
    for key, t in tensors.items():
        quantised = t.dim() == 2 and ("proj" in key) and "layernorm" not in key
        if quantised:
            q, s = quantise_block_fp8(t.float())
            out[key], out[key + "_scale_inv"] = q, s
        else:
            out[key] = t
    if mtp:
        L = cfg.num_hidden_layers
        out[f"model.layers.{L}.eh_proj.weight"], out[f"model.layers.{L}.eh_proj.weight_scale_inv"] = quantise_block_fp8(
            torch.randn(cfg.hidden_size, 2 * cfg.hidden_size)
        )
        out[f"model.layers.{L}.enorm.weight"] = torch.randn(cfg.hidden_size, dtype=torch.bfloat16)
    src = tmp_path / "fp8"
    src.mkdir()
    save_file(out, src / "model.safetensors")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    config["num_nextn_predict_layers"] = 1 if mtp else 0
    (src / "config.json").write_text(json.dumps(config))
    return src, out


def test_fp8_checkpoint_loads_dequantised_and_exports_bf16_with_mtp(tmp_path):
    cfg = tiny_v3(hidden_size=160, intermediate_size=200)  # projections spanning full and partial blocks
    src, stored = _fp8_checkpoint(tmp_path, cfg, mtp=True)
    model = load_pretrained(str(src))
    assert model.config.quantization_config["quant_method"] == "fp8"
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    # Every FP8 weight equals the reference dequantisation (expert weights through the key map).
    from moe_train.models.deepseek_v3.state_dict_adapter import ours_to_hf

    checked = 0
    for name, p in params.items():
        for key, slot in ours_to_hf(name, model.config, model.layout):
            if key + "_scale_inv" in stored:
                assert torch.equal(slot.view(p.data), reference_dequantise(stored[key], stored[key + "_scale_inv"]))
                checked += 1
            else:
                assert torch.equal(slot.view(p.data), stored[key].float())
    assert checked > 20
    carried = save_pretrained(model.to(torch.bfloat16), str(tmp_path / "out"), carry_from=HFCheckpoint(str(src)))
    L = cfg.num_hidden_layers
    assert sorted(carried) == [f"model.layers.{L}.eh_proj.weight", f"model.layers.{L}.enorm.weight"]
    out = _tensors(tmp_path / "out")
    assert not any(k.endswith("_scale_inv") for k in out)
    assert torch.equal(out[f"model.layers.{L}.enorm.weight"], stored[f"model.layers.{L}.enorm.weight"])
    assert torch.equal(
        out[f"model.layers.{L}.eh_proj.weight"],
        reference_dequantise(
            stored[f"model.layers.{L}.eh_proj.weight"], stored[f"model.layers.{L}.eh_proj.weight_scale_inv"]
        ).to(torch.bfloat16),
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["num_nextn_predict_layers"] == 1
    # transformers reads the export (ignoring the MTP layer, as for the official checkpoint).
    from transformers import DeepseekV3ForCausalLM as HFModel

    hf = HFModel.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 19))
    ours = load_pretrained(str(tmp_path / "out")).eval()
    assert (hf(input_ids=ids).logits - ours(ids).logits).abs().max().item() <= TOL


def test_fp8_partitioned_load_reads_element_ranges(tmp_path):
    """load_into with a partition callback (as ZeRO-3 gives) fills each flat range exactly."""
    from moe_train.checkpoint.hf_layout import load_into

    cfg = tiny_v3(hidden_size=160, intermediate_size=200)
    src, _ = _fp8_checkpoint(tmp_path, cfg, mtp=False)
    whole = load_pretrained(str(src), expert_in_one_shard=4)
    ranks = 3
    parts = {}
    for rank in range(ranks):
        model = DeepseekV3ForCausalLM(whole.config, whole.layout)
        flats = {}

        def partition(param, rank=rank, flats=flats):
            n = math.ceil(param.numel() / ranks)
            flat = flats.setdefault(id(param), torch.zeros(n))
            return flat, rank * n

        load_into(model, HFCheckpoint(str(src)), partition=partition)
        parts[rank] = (model, flats)
    for name, p in whole.named_parameters():
        pieces = [parts[r][1][id(dict(parts[r][0].named_parameters())[name])] for r in range(ranks)]
        assert torch.equal(torch.cat(pieces)[: p.numel()], p.data.reshape(-1)), name


# ------------------------------------------------------------------------------------------ templates
def test_chat_templates_of_the_family():
    from types import SimpleNamespace

    from moe_train.data.templates import named_template
    from moe_train.data.templates import render as render_template

    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    tokens = SimpleNamespace(
        bos_token="<bos>", eos_token="<eos>", special_tokens_map={"bos_token": "<bos>", "eos_token": "<eos>"}
    )

    def render(name, messages):
        ((text, spans),) = render_template(named_template(name), [messages], tokens, ["x"])
        return text, [text[a:b] for a, b in spans]

    assert render("deepseek_v3", [{"role": "system", "content": "Be brief."}, *chat]) == (
        "<bos>Be brief.<｜User｜>Hi?<｜Assistant｜>Hello.<eos>",
        ["Hello.<eos>"],
    )
    kimi = "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
    turns = "<|im_user|>user<|im_middle|>Hi?<|im_end|><|im_assistant|>assistant<|im_middle|>Hello.<|im_end|>"
    assert render("kimi_k2", chat) == (kimi + turns, ["Hello.<|im_end|>"])
    moon = "<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
    assert render("moonlight", [{"role": "system", "content": "Be brief."}, *chat]) == (
        moon + turns,
        ["Hello.<|im_end|>"],
    )
    assert spec_for("deepseek_v3").chat_template == "deepseek_v3"


# ------------------------------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def v3_run(tmp_path_factory):
    """tiny_v3 under ZeRO-3 on 2 ranks: 6 steps, checkpoints at 3 and 6, exported."""
    from tests.launch import check, torchrun

    tmp = tmp_path_factory.mktemp("v3")
    check(
        torchrun(
            [
                "tiny_v3",
                "--deepspeed",
                "deepspeed_zero3",
                "--work-dir",
                str(tmp / "run"),
                "--max-steps",
                "6",
                "--save-steps",
                "3",
            ],
            tmp,
        )
    )
    return tmp / "run"


@pytest.mark.slow
def test_zero3_run_trains_balances_and_exports(v3_run):
    from transformers import AutoModelForCausalLM

    from tests.launch import metrics, summary

    records = [m for m in metrics(v3_run) if "loss" in m]
    assert len(records) == 6 and records[-1]["loss"] < records[0]["loss"]
    # The bias moves by the rate every step (sign is +-1 unless an expert sits exactly at the mean).
    absmax = [m["correction_bias_absmax"] for m in records]
    assert all(len(layer) == 2 for layer in absmax)
    assert absmax[0] == [0.001, 0.001] and all(0 < v <= 0.006 + 1e-9 for v in absmax[-1])
    exported = _tensors(v3_run / "hf_model")
    bias = exported["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and bias.abs().max().item() == pytest.approx(absmax[-1][0], abs=1e-6)
    hf = AutoModelForCausalLM.from_pretrained(v3_run / "hf_model", dtype=torch.float32).eval()
    ours = load_pretrained(str(v3_run / "hf_model")).eval()
    assert torch.equal(hf.model.layers[1].mlp.gate.e_score_correction_bias, bias)
    ids = torch.randint(0, 512, (1, 30))
    assert (hf(ids).logits - ours(ids).logits).abs().max() < 1e-4
    assert summary(v3_run)["losses"][0] != summary(v3_run)["losses"][-1]


@pytest.mark.slow
def test_the_export_ships_the_template_trained_with(v3_run):
    """tiny_v3 trains with the deepseek_v3 template, not its tokenizer's own (V2-style) one: the exported
    tokenizer (and each checkpoint's) renders exactly the token ids training saw."""
    from transformers import AutoTokenizer

    from moe_train.assets.build_tiny_assets import CHAT_TEMPLATE
    from moe_train.data import encode_messages

    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
    ]
    source = AutoTokenizer.from_pretrained(str(Path(__file__).parents[1] / "moe_train" / "assets" / "tiny_tokenizer"))
    assert source.chat_template == CHAT_TEMPLATE  # the tokenizer's own differs from what trains
    trained, _ = encode_messages(source, chat, "deepseek_v3")
    assert source.apply_chat_template(chat)["input_ids"] != trained
    for where in (v3_run / "hf_model", next((v3_run / "checkpoints").glob("step-*")) / "tokenizer"):
        shipped = AutoTokenizer.from_pretrained(str(where))
        assert shipped.apply_chat_template(chat)["input_ids"] == trained, where
        prompt = shipped.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<｜User｜>What is 2 + 3?<｜Assistant｜>")


GOLDEN = Path(__file__).parent / "golden" / "tiny_v3_zero3_2ranks.json"


@pytest.mark.slow
def test_losses_match_golden(v3_run):
    """Golden numbers of tiny_v3 (seed 0, 2 ranks, ZeRO-3, fp32 CPU), as tests/test_train.py keeps for tiny:
    step 1 is a pure forward of the seeded weights; later steps also carry the bias updates.
    Regenerate with MOE_TRAIN_UPDATE_GOLDEN=1 after an intended change."""
    from tests.launch import metrics, summary

    records = [m for m in metrics(v3_run) if "loss" in m]
    got = {
        "losses": summary(v3_run)["losses"],
        "step1_aux_loss": records[0]["aux_loss"],
        "correction_bias_absmax": records[-1]["correction_bias_absmax"],
    }
    if os.environ.get("MOE_TRAIN_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert abs(got["losses"][0] - golden["losses"][0]) < 1e-6
    assert abs(got["step1_aux_loss"] - golden["step1_aux_loss"]) < 1e-7
    assert len(got["losses"]) == len(golden["losses"])
    assert max(abs(a - b) for a, b in zip(got["losses"], golden["losses"], strict=True)) < 2e-3
    assert got["correction_bias_absmax"] == golden["correction_bias_absmax"]


@pytest.mark.slow
def test_resume_restores_the_correction_bias(v3_run, tmp_path):
    from tests.launch import check, summary, torchrun

    work = tmp_path / "resumed"
    args = ["tiny_v3", "--deepspeed", "deepspeed_zero3", "--work-dir", str(work), "--save-steps", "3"]
    check(torchrun([*args, "--max-steps", "3", "--no-export"], tmp_path))
    check(torchrun([*args, "--max-steps", "6", "--resume", "auto"], tmp_path))
    assert summary(work)["losses"] == summary(v3_run)["losses"]  # the whole run: 3 steps, then 3 resumed
    a, b = _tensors(v3_run / "hf_model"), _tensors(work / "hf_model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_zero3_run_from_an_fp8_checkpoint_with_mtp(tmp_path):
    """Partitioned FP8 load on 2 ranks, training, bf16/fp32 export with the MTP layer copied through."""
    from tests.launch import check, torchrun

    cfg = tiny_v3()
    src, stored = _fp8_checkpoint(tmp_path, cfg, mtp=True)
    proc = check(
        torchrun(
            [
                "tiny_v3",
                "--model",
                str(src),
                "--tokenizer",  # the synthetic checkpoint has no tokenizer of its own
                str(Path(__file__).resolve().parents[1] / "moe_train" / "assets" / "tiny_tokenizer"),
                "--deepspeed",
                "deepspeed_zero3",
                "--work-dir",
                str(tmp_path / "run"),
                "--max-steps",
                "2",
                "--save-steps",
                "0",
            ],
            tmp_path,
        )
    )
    assert "copied 2 tensors of the MTP layers unchanged (not trained)" in proc.stdout
    out = _tensors(tmp_path / "run" / "hf_model")
    L = cfg.num_hidden_layers
    assert torch.equal(out[f"model.layers.{L}.enorm.weight"], stored[f"model.layers.{L}.enorm.weight"])
    assert torch.equal(
        out[f"model.layers.{L}.eh_proj.weight"],
        reference_dequantise(
            stored[f"model.layers.{L}.eh_proj.weight"], stored[f"model.layers.{L}.eh_proj.weight_scale_inv"]
        ),
    )
    config = json.loads((tmp_path / "run" / "hf_model" / "config.json").read_text())
    assert "quantization_config" not in config
    complete = json.loads((tmp_path / "run" / "hf_model" / "COMPLETE").read_text())
    assert complete["source"] == str(src)


@pytest.mark.slow
def test_sp2_matches_sp1_with_the_bias_update(tmp_path):
    """Sequence parallelism through the family spec: same global batch, same losses, loads and biases."""
    from tests.launch import check, metrics, summary, torchrun

    common = [
        "tiny_v3",
        "--deepspeed",
        "deepspeed_zero3",
        "--max-steps",
        "3",
        "--save-steps",
        "0",
        "--max-length",
        "255",
    ]
    check(torchrun([*common, "--work-dir", str(tmp_path / "sp1")], tmp_path))
    check(
        torchrun([*common, "--work-dir", str(tmp_path / "sp2"), "--sp", "2", "--cfg-options", "grad_accum=2"], tmp_path)
    )
    sp1, sp2 = summary(tmp_path / "sp1")["losses"], summary(tmp_path / "sp2")["losses"]
    assert abs(sp1[0] - sp2[0]) < 1e-6 and max(abs(a - b) for a, b in zip(sp1, sp2, strict=True)) < 2e-5, (sp1, sp2)
    r1, r2 = ([m for m in metrics(tmp_path / d) if "loss" in m] for d in ("sp1", "sp2"))
    for a, b in zip(r1, r2, strict=True):
        assert a["expert_load"] == b["expert_load"] and a["aux_loss"] == pytest.approx(b["aux_loss"], rel=1e-5)
    b1, b2 = (_tensors(tmp_path / d / "hf_model") for d in ("sp1", "sp2"))
    biases = [k for k in b1 if k.endswith("e_score_correction_bias")]
    assert len(biases) == 2 and all(torch.equal(b1[k], b2[k]) for k in biases)


def test_recipes_follow_the_planner():
    """The 671B recipe's shard size and cluster are what `moe-train plan` picks; first_k_dense_replace=3."""
    from moe_train.plan import build_plan, model_config
    from moe_train.recipes import get_recipe

    r = get_recipe("deepseek_v3_full_alpaca_e3")
    plan = build_plan(r, gpus=256, gpu_mem_gb=80, nodes=32, device="h100")
    assert plan.memory.per_gpu_gb <= 80 and plan.suggested_expert_in_one_shard == r.expert_in_one_shard
    assert build_plan(r, gpus=128, gpu_mem_gb=80, nodes=16, device="h100").memory.per_gpu_gb > 80
    assert plan.model.first_k_dense_replace == 3 and sum(map(plan.model.is_moe_layer, range(61))) == 58
    moonlight = get_recipe("moonlight_16b_full_alpaca_e3")
    suggested = build_plan(moonlight, gpus=8, gpu_mem_gb=80, device="h100").suggested_expert_in_one_shard
    assert suggested == moonlight.expert_in_one_shard
    assert type(model_config(get_recipe("tiny_v3"))) is DeepseekV3Config
    # A known HF id resolves to its own family whatever the recipe's family field says.
    v2 = get_recipe("deepseek_v2_chat_full_alpaca_e3").replace(model="deepseek-ai/DeepSeek-V3", expert_in_one_shard=8)
    assert type(model_config(v2)) is DeepseekV3Config
