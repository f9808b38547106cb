"""Model behaviour that does not need transformers: packing, layouts, routing, config errors."""

from __future__ import annotations

import pytest
import torch

from moe_train import DeepseekV2Config, DeepseekV2ForCausalLM
from moe_train.models.common.experts import ExpertLayout, balance_loss
from moe_train.models.deepseek_v2.state_dict_adapter import ours_to_hf
from tests.conftest import tiny_config


def copy_weights(src: DeepseekV2ForCausalLM, dst: DeepseekV2ForCausalLM) -> None:
    """Copy through the checkpoint key map, so layouts may differ."""
    src_params, dst_params = dict(src.named_parameters()), dict(dst.named_parameters())
    dst_slots = {k: s for name in dst_params for k, s in ours_to_hf(name, dst.config, dst.layout)}
    with torch.no_grad():
        for name, p in src_params.items():
            for key, slot in ours_to_hf(name, src.config, src.layout):
                dst_slots[key].view(dst_params[dst_slots[key].param]).copy_(slot.view(p))


def test_packed_samples_match_each_sample_alone():
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(tiny_config()).eval()
    samples = [torch.randint(0, 512, (n,)) for n in (7, 12, 5)]
    packed = torch.cat(samples)[None]
    cu = torch.tensor([0, 7, 19, 24], dtype=torch.int32)
    logits = model(packed, cu_seqlens=cu).logits[0]
    for s, (a, b) in zip(samples, zip(cu[:-1], cu[1:])):
        alone = model(s[None]).logits[0]
        assert (logits[a:b] - alone).abs().max() < 1e-5
    # Without boundaries the later samples see the earlier ones: the check above can fail.
    unbounded = model(packed).logits[0]
    assert (unbounded[7:19] - model(samples[1][None]).logits[0]).abs().max() > 1e-3


def test_packed_positions_restart_per_sample():
    """position_ids derived from cu_seqlens equal explicitly restarted positions."""
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 512, (1, 9))
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert torch.equal(model(ids, cu_seqlens=cu).logits, model(ids, position_ids=pos, cu_seqlens=cu).logits)


@pytest.mark.parametrize("shard", [1, 2, 8])
def test_shard_and_origin_give_identical_outputs_and_grads(shard):
    torch.manual_seed(0)
    origin = DeepseekV2ForCausalLM(tiny_config(), ExpertLayout("origin")).train()
    sharded = DeepseekV2ForCausalLM(tiny_config(), ExpertLayout("shard", shard)).train()
    copy_weights(origin, sharded)
    ids = torch.randint(0, 512, (1, 40))
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    outs = [m(ids, cu_seqlens=cu, labels=ids) for m in (origin, sharded)]
    assert (outs[0].logits - outs[1].logits).abs().max() < 1e-6
    assert torch.equal(outs[0].expert_load, outs[1].expert_load)
    assert abs(outs[0].aux_loss.item() - outs[1].aux_loss.item()) < 1e-7
    for out in outs:
        (out.loss + out.aux_loss).backward()
    g_origin = {
        k: s.view(p.grad) for n, p in origin.named_parameters() for k, s in ours_to_hf(n, origin.config, origin.layout)
    }
    g_shard = {
        k: s.view(p.grad)
        for n, p in sharded.named_parameters()
        for k, s in ours_to_hf(n, sharded.config, sharded.layout)
    }
    assert g_origin.keys() == g_shard.keys()
    for k in g_origin:
        assert (g_origin[k] - g_shard[k]).abs().max() < 1e-6, k


def test_every_shard_joins_forward_and_backward_even_without_tokens():
    """Each shard must run (and get a gradient) even when routing sends it nothing: that is
    what keeps ZeRO-3 ranks joining the same gathers."""
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(tiny_config(topk_method="greedy"), ExpertLayout("shard", 2)).train()
    calls = []
    for name, mod in model.named_modules():
        if type(mod).__name__ == "ExpertShard":
            mod.register_forward_hook(lambda m, i, o, name=name: calls.append((name, i[0].shape[0])))
    with torch.no_grad():  # route every token to experts 0 and 1 (shard 0) only
        for layer in model.model.layers:
            if layer.is_moe:
                layer.mlp.gate.weight.zero_()
                layer.mlp.gate.weight[:2] = 1.0
    ids = torch.randint(0, 512, (1, 16))
    out = model(ids, labels=ids)
    (out.loss + out.aux_loss).backward()
    n_moe = sum(layer.is_moe for layer in model.model.layers)
    assert len(calls) == n_moe * 4
    assert any(rows == 0 for _, rows in calls), "the forced routing should leave shards empty"
    for name, p in model.named_parameters():
        if ".experts." in name:
            assert p.grad is not None, f"{name} got no gradient"


def test_balance_loss_per_sample_matches_direct_formula():
    cfg = tiny_config(topk_method="greedy")
    torch.manual_seed(0)
    T, E, K = 10, cfg.n_routed_experts, cfg.num_experts_per_tok
    scores = torch.rand(T, E).softmax(-1)
    index = scores.topk(K, dim=-1).indices
    segment = torch.tensor([0] * 4 + [1] * 6)
    expected = 0.0
    for seg in (slice(0, 4), slice(4, 10)):
        n = scores[seg].shape[0]
        f = torch.stack([(index[seg] == e).sum() for e in range(E)]).float() * E / (n * K)
        expected += (f * scores[seg].mean(0)).sum() / 2
    got = balance_loss(scores, index, segment, cfg.aux_loss_alpha)
    assert abs(got.item() - expected.item() * cfg.aux_loss_alpha) < 1e-7
    # Padding (-1) is left out: appended padding tokens change nothing.
    padded = balance_loss(
        torch.cat([scores, scores[:3]]),
        torch.cat([index, index[:3]]),
        torch.cat([segment, torch.full((3,), -1)]),
        cfg.aux_loss_alpha,
    )
    assert padded.item() == got.item()


def test_seq_balance_loss_without_cu_seqlens_is_per_row():
    """DeepSeek's code takes the sequence balance loss per row of a (B, T) batch; pooling the rows differs."""
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(tiny_config()).train()
    ids = torch.randint(0, 512, (2, 9))
    batch = model(ids).aux_loss
    rows = sum(model(ids[i : i + 1]).aux_loss for i in range(2)) / 2
    assert abs(batch.item() - rows.item()) < 1e-8


def test_norm_topk_prob_normalises_weights():
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(tiny_config(norm_topk_prob=True, topk_method="greedy"))
    gate = model.model.layers[1].mlp.gate
    _, w, _ = gate(torch.randn(5, 64))
    assert torch.allclose(w.sum(-1), torch.ones(5))


def test_expert_in_one_shard_must_divide_the_expert_count():
    with pytest.raises(ValueError) as e:
        DeepseekV2ForCausalLM(tiny_config(), ExpertLayout("shard", 3))
    msg = str(e.value)
    assert "\n" not in msg and "does not divide" in msg and "[1, 2, 4, 8]" in msg


def test_named_sizes_have_the_published_parameter_counts():
    """236B / 21B active and 15.7B / 2.4B active (DeepSeek V2 paper), computed from shapes on meta."""

    def counts(name):
        cfg = DeepseekV2Config.from_name(name)
        with torch.device("meta"):
            m = DeepseekV2ForCausalLM(cfg)
        total = sum(p.numel() for p in m.parameters())
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        active = total - n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
        return total / 1e9, active / 1e9

    total, active = counts("deepseek-v2")
    assert 235 < total < 237 and 20.5 < active < 22.5
    total, active = counts("deepseek-v2-lite")
    assert 15.5 < total < 16 and 2.2 < active < 2.8


def test_grouped_gemm_fallback_matches_in_float64():
    """fp64 takes the exact expert loop (torch's grouped_mm has no fp64 kernel); same result as fp32."""
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(tiny_config()).train()
    ids = torch.randint(0, 512, (1, 24))
    out32 = model(ids, labels=ids)
    out64 = model.double()(ids, labels=ids)
    out64.loss.backward()
    assert out64.logits.dtype == torch.float64
    assert (out64.logits.float() - out32.logits).abs().max() < 1e-4
