"""The CUDA paths, against the CPU-tested ones: run by ``pytest -m gpu`` (``python -m bench.gpu`` does).

Each behaviour here has a CPU test too (tests/test_model.py, test_chunked_loss.py,
test_deepspeed_cpu.py); these check what only a GPU runs: the varlen attention kernels, bf16
grouped_mm, the chunked loss on CUDA, ZeRO-3 on nccl.  Skipped without CUDA.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from tests.launch import metrics, torchrun

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run `python -m bench.gpu` on one)"),
]
BF16 = {"rtol": 2e-2, "atol": 2e-2}


def varlen_kernels() -> list:
    """The flash-style kernels this install has, each as a flash_attn_varlen_func-like callable."""
    from moe_train.models.common import attention
    from moe_train.models.common.attention import torch_varlen_as_flash

    have_torch = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    return [
        pytest.param(attention.flash_attn_varlen_func, id="flash-attn",
                     marks=pytest.mark.skipif(attention.flash_attn_varlen_func is None,
                                              reason="flash-attn not installed")),
        pytest.param(torch_varlen_as_flash, id="torch-varlen",
                     marks=pytest.mark.skipif(not have_torch, reason="torch has no torch.nn.attention.varlen")),
    ]  # fmt: skip


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("kernel", varlen_kernels())
def test_varlen_kernel_matches_per_sample_sdpa_in_bf16(kernel, kv_heads, monkeypatch):
    """MLA shapes (q/k 192, v 128, padded by the model), three packed samples; outputs and grads; with
    fewer k/v heads (GQA) the kernels take them as they are and the fallback repeats them."""
    from moe_train.models.common import attention

    torch.manual_seed(0)
    T, H, D, V = 700, 4, 192, 128
    cu = torch.tensor([0, 100, 451, T], dtype=torch.int32, device="cuda")
    q = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, T, kv_heads, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, T, kv_heads, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, T, H, V, device="cuda", dtype=torch.bfloat16)
    results = {}
    for backend in ("flash", "sdpa"):
        if backend == "flash":
            monkeypatch.setattr(attention, "varlen_kernel", lambda: kernel)
        out = attention.varlen_attention(q, k, v, cu, 351, D**-0.5 * 1.1, backend)
        grads = torch.autograd.grad(out, (q, k, v), g)
        results[backend] = (out, *grads)
    for a, b in zip(results["flash"], results["sdpa"]):
        torch.testing.assert_close(a.float(), b.float(), **BF16)
    assert results["flash"][0].shape == (1, T, H, V)


def test_bf16_grouped_mm_takes_the_kernel_and_matches_the_loop():
    from moe_train.models.common import experts as moe

    torch.manual_seed(0)
    counts = torch.tensor([0, 37, 128, 5, 0, 301, 64, 1], device="cuda")  # empty and odd groups
    x = torch.randn(int(counts.sum()), 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(len(counts), 256, 512, device="cuda", dtype=torch.bfloat16) * 0.05
    assert hasattr(F, "grouped_mm") and moe._use_grouped_mm(x), "the CUDA bf16 path must take F.grouped_mm"
    out = moe._grouped_mm(x, w, counts)
    ref, start = [], 0
    for s, n in enumerate(counts.tolist()):
        ref.append(x[start : start + n].float() @ w[s].float())
        start += n
    torch.testing.assert_close(out.float(), torch.cat(ref), **BF16)


def test_bf16_shard_layer_matches_origin_on_cuda():
    """The whole MoE layer, forward and backward: grouped_mm (shard) against per-expert modules."""
    from bench.moe_layer import LayerSize, build_layers, fwd_bwd

    size = LayerSize(hidden=256, expert_ffn=128, tokens=512, experts=16, top_k=4, expert_in_one_shard=4)
    layers = {n: m.to("cuda", torch.bfloat16) for n, m in build_layers(size).items() if n in ("shard", "origin")}
    x = torch.randn(1, size.tokens, size.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    grads = {}
    for name, layer in layers.items():
        x.grad = None
        fwd_bwd(name, layer, x, g)
        grads[name] = x.grad.float()
    torch.testing.assert_close(grads["shard"], grads["origin"], rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_on_cuda_matches_the_plain_head(dtype):
    from moe_train.models.common.loss import linear_cross_entropy

    torch.manual_seed(0)
    T, D, V = 2048, 256, 32000
    h = torch.randn(T, D, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(V, D, device="cuda") * D**-0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,), device="cuda")
    labels[::5] = -100
    plain = F.cross_entropy((h @ w.T).float(), labels, ignore_index=-100, reduction="sum")
    ref = torch.autograd.grad(plain * 1e-3, (h, w))
    loss = linear_cross_entropy(h, w, labels, chunk=300)
    ours = torch.autograd.grad(loss * 1e-3, (h, w))
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else BF16
    assert abs(loss.item() - plain.item()) <= (1e-5 if dtype == torch.float32 else 2e-3) * plain.item()
    for a, b in zip(ours, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (make gpu-bundle)")
def test_one_zero3_nccl_step_matches_the_cpu_fp32_run(tmp_path):
    """tiny, ZeRO-3, bf16 on 1 GPU over nccl vs fp32 on CPU over gloo: the first losses agree."""
    from tests.launch import cpu_env

    args = ["tiny", "--deepspeed", "deepspeed_zero3", "--max-steps", "2", "--save-steps", "0", "--no-export"]
    gpu_env = cpu_env(tmp_path / "gpu", CUDA_VISIBLE_DEVICES="0")
    gpu_env.pop("DS_ACCELERATOR")
    gpu = torchrun([*args, "--work-dir", str(tmp_path / "gpu"), "--cfg-options", "dtype=bf16"], tmp_path, nproc=1,
                   env=gpu_env, timeout=240)  # fmt: skip
    assert gpu.returncode == 0, gpu.stderr[-4000:]
    cpu = torchrun([*args, "--work-dir", str(tmp_path / "cpu")], tmp_path, nproc=1, timeout=240)
    assert cpu.returncode == 0, cpu.stderr[-4000:]
    gpu_loss, cpu_loss = metrics(tmp_path / "gpu")[0]["loss"], metrics(tmp_path / "cpu")[0]["loss"]
    assert abs(gpu_loss - cpu_loss) <= 2e-2 * abs(cpu_loss), (gpu_loss, cpu_loss)
