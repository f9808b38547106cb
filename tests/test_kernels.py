"""The start-up line says which kernels run; slow GPU fallbacks warn or stop (checked on CPU by asking for CUDA)."""

from __future__ import annotations

import pytest
import torch

from moe_train.engine.kernels import check, kernels
from moe_train.models.common.experts import ExpertLayout, expert_kernel
from moe_train.models.deepseek_v2 import DeepseekV2Config
from tests.conftest import tiny_config
from tests.launch import check as check_proc
from tests.launch import moe_train


def test_cpu_takes_the_exact_fallbacks_without_a_warning():
    k = kernels(tiny_config(), ExpertLayout(), torch.float32, torch.device("cpu"))
    assert k.attention[0] == "sdpa-per-sample" and k.experts[0] == "grouped_mm"
    assert k.slow == [] and check(k, require_fast=True) is None
    assert "float32 on cpu" in k.line() and "deepspeed 0.19" in k.line()


def test_fp32_on_cuda_is_a_slow_expert_loop_that_stops_the_run_when_fast_kernels_are_required():
    k = kernels(
        DeepseekV2Config.from_name("deepseek-v2-lite"), ExpertLayout("shard", 8), torch.float32, torch.device("cuda")
    )
    assert k.experts[0] == "loop" and "not torch.float32; train in bf16" in k.experts[1]
    with pytest.raises(ValueError, match="slow kernels on cuda: .*experts loop.*--allow-slow-kernels"):
        check(k, require_fast=True)
    assert check(k, require_fast=False).startswith("warning: slow kernels on cuda")


def test_misaligned_bf16_widths_take_grouped_mm_padded():
    assert expert_kernel("cuda", torch.bfloat16, 2048, 1408) == (
        "grouped_mm",
        "torch.nn.functional.grouped_mm, torch.bfloat16 on cuda",
    )  # V2-Lite: aligned
    kind, why = expert_kernel("cuda", torch.bfloat16, 4096, 1407)  # DeepseekV2Config's default width
    assert kind == "grouped_mm" and "moe_intermediate_size=1407 zero-padded" in why


def test_the_trainer_prints_the_kernels_line(tmp_path):
    proc = check_proc(
        moe_train(
            [
                "train",
                "tiny",
                "--max-steps",
                "1",
                "--no-export",
                "--save-steps",
                "0",
                "--work-dir",
                str(tmp_path / "w"),
            ],
            tmp_path,
        )
    )
    line = next(ln for ln in proc.stdout.splitlines() if "kernels:" in ln)
    assert "attention sdpa-per-sample" in line and "experts grouped_mm" in line and "on cpu" in line
