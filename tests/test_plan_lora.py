"""`moe-train plan --lora-rank R`: LoRA's memory and speed terms against the model the trainer builds, the
full fine-tuning terms they replace, a real 2-rank ZeRO-3 LoRA run, and the 236B answer."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from moe_train.cli import main
from moe_train.engine.metrics import active_matmul_params
from moe_train.models.common.lora import LoraConfig, LoraExpertShard, LoraLinear, apply_lora
from moe_train.models.deepseek_v2.config import DeepseekV2Config
from moe_train.models.deepseek_v2.model import DeepseekV2ForCausalLM
from moe_train.plan import load_deepspeed_config, model_config, model_layout, workload
from moe_train.plan.lora import adapters
from moe_train.plan.memory import Workload, ZeroSettings, count_params, model_units, predict_memory
from moe_train.plan.speed import DEVICES, flops_per_token, predict_speed
from moe_train.recipes import get_recipe
from tests.conftest import TINY_LAYOUT
from tests.launch import check, cpu_env, free_port
from tests.plan_measure_worker import measured_memory, memory_table
from tests.test_plan import WIDE_TINY, WIDE_TINY_LAYOUT, WORKER

V2 = "deepseek_v2_chat_full_alpaca_e3"
LORA = LoraConfig(rank=4, alpha=8.0)


def _hand_count(cfg, layout, lora) -> int:
    """Adapter numel from the shapes of a real (CPU) model's adapted modules: R (I + O) per linear, and
    per expert of a shard R (D + 2F) + R (F + D)."""
    model = apply_lora(DeepseekV2ForCausalLM(cfg, layout), lora)
    R, total = lora.rank, 0
    for m in model.modules():
        if isinstance(m, LoraLinear):
            total += R * (m.in_features + m.out_features)
        elif isinstance(m, LoraExpertShard):
            S, F2, D = m.gate_up_proj.shape
            total += S * (R * (D + F2) + R * (F2 // 2 + D))
    return total


def test_adapters_are_the_trainers():
    cfg = DeepseekV2Config.from_name("tiny")
    ad = adapters(cfg, TINY_LAYOUT, LORA)
    assert ad.numel == _hand_count(cfg, TINY_LAYOUT, LORA)
    attention_only = adapters(cfg, TINY_LAYOUT, dataclasses.replace(LORA, targets=("attention",)))
    assert 0 < attention_only.numel < ad.numel
    assert not any(a.routed for layer in attention_only.layers for a in layer.values())


def test_lora_model_states_hold_no_base_gradient_or_optimizer_state():
    """The tiny CPU run under ZeRO-3: the base's and adapters' fp32 weights (a partition each), and only the
    adapters' gradient, master copy and Adam moments; the step's flat gradient and AdamW temporaries are
    the adapters' too.  Everything that depends on the base's size alone is the full run's."""
    cfg = DeepseekV2Config.from_name("tiny")
    zero = ZeroSettings.from_ds_config(
        {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 1000}},
        cfg.hidden_size,
    )
    work = Workload(max_length=256, attention="sdpa", dtype="fp32", device="cpu", activation_checkpointing=False)
    full = predict_memory(cfg, TINY_LAYOUT, work, zero, world_size=2)
    lora = predict_memory(cfg, TINY_LAYOUT, dataclasses.replace(work, lora=LORA), zero, world_size=2)
    P, A = count_params(cfg), _hand_count(cfg, TINY_LAYOUT, LORA)
    assert lora.phases["step"] == {
        "params": (P + A) * 4 / 2,
        "grads": A * 4 / 2,
        "optimizer_states": A * 12 / 2,
        "reduce_bucket": 4000,
        "fp32_grad_copy": A * 4 / 2,
        "adam_temporaries": A * 8 / 2,
    }
    # gathered: the adapters travel with their modules; the head computes no weight gradient
    assert lora.phases["loss"]["gathered_params"] == (P + A) * 4
    assert lora.phases["loss"]["logits"] == full.phases["loss"]["logits"] - cfg.vocab_size * cfg.hidden_size * 4
    assert lora.phases["loss"]["gathered_grads"] == 0
    # activations: the full run's plus each adapter's rank-R intermediate, per token or routed row
    K, L = cfg.experts_per_token, cfg.num_hidden_layers
    model = apply_lora(DeepseekV2ForCausalLM(cfg, TINY_LAYOUT), LORA)
    linears = sum(isinstance(m, LoraLinear) for m in model.modules())
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(L))
    extra = 256 * 4 * LORA.rank * (linears + 2 * K * moe_layers)
    assert lora.phases["loss"]["saved_activations"] - full.phases["loss"]["saved_activations"] == pytest.approx(extra)


def test_frozen_gemms_take_two_thirds_of_their_full_flops():
    """FLOPs per token: a frozen weight's backward is its input gradient only, so the base's GEMMs cost 4
    (not 6) x N_active, plus 6 x the adapters one token multiplies; and the ZeRO-3 timeline, which adds
    the trace's module GEMMs one by one, charges the same compute."""
    cfg = DeepseekV2Config.from_name("tiny")
    work = Workload(max_length=256, attention="sdpa", dtype="fp32", device="cpu", activation_checkpointing=False)
    lora_work = dataclasses.replace(work, lora=LORA)
    N = active_matmul_params(cfg)
    ad = adapters(cfg, TINY_LAYOUT, LORA)
    (full_model, full_hw), (lora_model, lora_hw) = (flops_per_token(cfg, w, TINY_LAYOUT) for w in (work, lora_work))
    assert full_hw - lora_hw == pytest.approx(2 * N - 6 * ad.active_numel(cfg))
    assert full_model - lora_model == pytest.approx(2 * N - 6 * ad.active_numel(cfg))
    # every module traced (the timeline times the modules ZeRO-3 gathers; the tiny ones are under the default)
    zero = ZeroSettings.from_ds_config(
        {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}, cfg.hidden_size
    )
    device = DEVICES["a100"]
    full, lora = (predict_speed(cfg, TINY_LAYOUT, w, zero, 2, 1, device) for w in (work, lora_work))
    rate = device.peak_tflops * 1e12 * device.calibration.gemm_efficiency
    _, layers, head = model_units(cfg, TINY_LAYOUT)  # the timeline charges the norms' weights as GEMMs too
    norms = sum(u.numel for u in [*(u for layer in layers for u in layer), *head] if u.name.endswith("norm"))
    assert (full.compute_s - lora.compute_s) * rate / work.tokens_per_rank == pytest.approx(
        2 * (N + norms) - 6 * ad.active_numel(cfg), rel=1e-9
    )
    assert lora.comm_bytes < full.comm_bytes  # only the adapters' gradients are reduce-scattered


def test_236b_lora_r16_fits_on_8_gpus_and_16_with_headroom_where_full_needs_64():
    """The issue's question: DeepSeek V2 236B, LoRA rank 16, 8k tokens per GPU, 80 GB GPUs (memory verdicts
    as ``plan`` gives them; the speed at 16 GPUs beats the full job's on 64)."""
    recipe = get_recipe(V2).replace(max_length=8192)
    cfg, layout = model_config(recipe), model_layout(recipe, model_config(recipe))
    zero = ZeroSettings.from_ds_config(load_deepspeed_config(recipe.deepspeed), cfg.hidden_size)
    full_work = workload(recipe)
    lora_work = workload(recipe.replace(lora_rank=16))

    def gb(work, gpus):
        return predict_memory(cfg, layout, work, zero, gpus).per_gpu_gb

    assert gb(lora_work, 4) > 80 > gb(lora_work, 8) > 0.9 * 80  # fits on 8, under the 10% headroom
    assert gb(lora_work, 16) < 0.9 * 80
    assert gb(full_work, 32) > 80 > gb(full_work, 64)
    full_states = predict_memory(cfg, layout, full_work, zero, 16).phases["step"]["optimizer_states"]
    assert predict_memory(cfg, layout, lora_work, zero, 16).phases["step"]["optimizer_states"] < 0.01 * full_states
    lora16 = predict_speed(cfg, layout, lora_work, zero, 16, 2, DEVICES["a100"], recipe.grad_accum)
    full64 = predict_speed(cfg, layout, full_work, zero, 64, 8, DEVICES["a100"], recipe.grad_accum)
    assert lora16.tgs > full64.tgs


def test_cli_plans_and_searches_lora():
    runner = CliRunner()
    args = ["plan", "tiny", "--gpus", "2", "--gpu-mem-gb", "80", "--lora-rank", "4"]
    res = runner.invoke(main, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["fits"] and out["workload"]["lora"]["rank"] == 4
    assert out["params"] == count_params(model_config(get_recipe("tiny"))) + _hand_count(
        model_config(get_recipe("tiny")),
        model_layout(get_recipe("tiny"), model_config(get_recipe("tiny"))),
        LoraConfig(4, 16.0),
    )
    res = runner.invoke(main, args)
    assert "lora: rank 4 on attention, dense, shared_experts, experts" in res.output and "FITS" in res.output
    res = runner.invoke(main, [*args, "--search"])
    assert res.exit_code == 0, res.output
    assert " origin " not in res.output  # expert adapters need shards
    res = runner.invoke(main, [*args, "--lora-targets", "attention", "--moe-implementation", "origin"])
    assert res.exit_code == 0, res.output  # no expert adapters: the origin layout is fine


LORA_MEASURED_LENGTH = 512


@pytest.mark.slow
def test_lora_prediction_matches_a_real_zero3_cpu_run(tmp_path):
    """The wide tiny model of test_plan's real run with LoRA rank 16 on every target, 2 ranks ZeRO-3 on gloo,
    fp32, rows of 512 tokens (half test_plan's: the frozen base's GEMMs are most of the run's time, and every
    term measured the same share off at 1024): the peak and the gathered weights within 15% of the prediction
    (measured 0.4-0.7% and 0.7% off; 2% and 1% at 1024).  The split between the two other terms is looser:
    model states measure 14% above the prediction (30 MiB more resident after the first step than the
    partitions and adapter states account for; 16% at 1024) and the activations at the loss 19% below (as at
    1024), so those two are held to 25%."""
    lora = LoraConfig(rank=16, alpha=32.0)
    spec = {
        "model": WIDE_TINY,
        "layout": dataclasses.asdict(WIDE_TINY_LAYOUT),
        "max_length": LORA_MEASURED_LENGTH,
        "steps": 2,
        "lora": {"rank": lora.rank, "alpha": lora.alpha},
    }
    env = cpu_env(tmp_path, MALLOC_MMAP_THRESHOLD_="131072")  # RSS follows live memory (see test_plan)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={free_port()}", str(WORKER), str(tmp_path), json.dumps(spec)]  # fmt: skip
    check(subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300))

    cfg = DeepseekV2Config.from_name("tiny", **WIDE_TINY)
    work = Workload(
        max_length=LORA_MEASURED_LENGTH,
        attention="sdpa",
        dtype="fp32",
        device="cpu",
        activation_checkpointing=False,
        lora=lora,
    )
    zero3 = load_deepspeed_config("deepspeed_zero3")
    mem = predict_memory(cfg, WIDE_TINY_LAYOUT, work, ZeroSettings.from_ds_config(zero3, cfg.hidden_size), 2)
    loss, step = mem.phases["loss"], mem.phases["step"]
    predicted = {
        "model states": sum(step[k] for k in ("params", "grads", "optimizer_states", "reduce_bucket")),
        "gathered at loss": loss["gathered_params"],
        "activations at loss": loss["saved_activations"] + loss["logits"],
        "peak": mem.peak_bytes,
    }
    for rank in (0, 1):
        measured = measured_memory(json.loads((tmp_path / f"rank{rank}.json").read_text()))
        table = memory_table(rank, predicted, measured)
        for k in predicted:
            rel = 0.15 if k in ("peak", "gathered at loss") else 0.25
            assert measured[k] == pytest.approx(predicted[k], rel=rel), table
