"""Numerical parity with transformers' DeepseekV2ForCausalLM on the same weights (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from moe_train import DeepseekV2ForCausalLM
from moe_train.models.deepseek_v2.state_dict_adapter import ours_to_hf
from tests.conftest import hf_reference, tiny_config

TOL = 1e-4

CASES = {
    # name: (config overrides, moe_implementation, expert_in_one_shard)
    "q_lora_int-group_limited-yarn-dense1-shard4": (dict(), "shard", 4),
    "q_lora_null-greedy-dense0-shard1": (
        dict(q_lora_rank=None, topk_method="greedy", first_k_dense_replace=0),
        "shard",
        1,
    ),
    "q_lora_null-group_limited-dense1-all_in_one": (dict(q_lora_rank=None), "shard", 8),
    "greedy-dense1-shard2": (dict(topk_method="greedy"), "shard", 2),
    "no_rope_scaling-dense0-origin": (dict(rope_scaling=None, first_k_dense_replace=0), "origin", None),
    "q_lora_int-group_limited-origin": (dict(), "origin", None),
}


def hf_grads_by_checkpoint_key(hf_model, cfg) -> dict[str, torch.Tensor]:
    """transformers 5 fuses experts into (E, 2F, D) / (E, D, F); split them into checkpoint keys."""
    out = {}
    F_ = cfg.moe_intermediate_size
    for name, p in hf_model.named_parameters():
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e in range(p.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = p.grad[e, :F_]
                out[f"{prefix}{e}.up_proj.weight"] = p.grad[e, F_:]
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(p.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = p.grad[e]
        else:
            out[name] = p.grad
    return out


def our_grads_by_checkpoint_key(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        for key, slot in ours_to_hf(name, model.config, model.layout):
            out[key] = slot.view(p.grad)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_grads_match_transformers(case, tmp_path):
    overrides, impl, shard = CASES[case]
    cfg = tiny_config(**overrides)
    hf = hf_reference(cfg)
    hf.save_pretrained(tmp_path)
    ours = DeepseekV2ForCausalLM.from_pretrained(str(tmp_path), moe_implementation=impl, expert_in_one_shard=shard)
    ours.eval()

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
    assert worst[0] <= TOL, f"gradient of {worst[1]} differs by {worst[0]}"
    # The comparison is meaningful only if gradients actually reached every expert.
    assert sum(g.abs().sum().item() > 0 for k, g in our_grads.items() if ".experts." in k) > 0


def test_yarn_scaling_is_exercised():
    """The tiny config uses yarn with factor > 1, so the parity cases above cover mscale and ramp."""
    cfg = tiny_config()
    assert cfg.rope_scaling["type"] == "yarn" and cfg.rope_scaling["factor"] > 1
    assert cfg.softmax_scale != cfg.qk_head_dim**-0.5
