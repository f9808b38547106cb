"""The benchmark suite's smallest sizes, for correctness only (no timing is checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bench import moe_layer
from bench.zero3 import CollectiveCounter

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {
    "p1_vs_origin",
    "p1_vs_hf",
    "p1_gemm_fraction",
    "p1_max_abs_diff",
    "p2_collective_ratio",
    "p2_step_speedup",
    "p2_peak_gather_ratio",
    "p3_tokens_speedup",
    "p3_packing_efficiency",
    "p4_write_fraction",
    "p4_peak_rss_ratio",
    "p5_save_time_ratio",
    "p5_load_time_ratio",
    "p5_save_rss_per_partition",
    "p5_load_rss_per_partition",
    "p5_wide_save_time_ratio",
    "p5_wide_load_time_ratio",
    "p5_wide_save_rss_per_partition",
    "p5_wide_load_rss_per_partition",
    "p5_verify_fraction",
    "p5_verify_fraction_cold",
    "p5_wide_verify_fraction",
    "p5_wide_verify_fraction_cold",
}


def test_p1_layouts_agree_on_outputs_and_gradients():
    size = moe_layer.SIZES["test"]
    layers = moe_layer.build_layers(size)
    torch.manual_seed(1)
    x = torch.randn(1, size.tokens, size.hidden)
    g = torch.randn_like(x)
    grads = {}
    for name in ("shard", "origin", "hf-eager", "hf-grouped_mm"):
        layer = layers[name].train()
        xi = x.clone().requires_grad_()
        out, _ = moe_layer.layer_output(name, layer, xi)
        out.backward(g)  # the balance loss is left out: transformers' layer has none
        grads[name] = (out.detach(), xi.grad)
    for name in ("origin", "hf-eager", "hf-grouped_mm"):
        for ours, theirs in zip(grads["shard"], grads[name]):
            assert (ours - theirs).abs().max() < 1e-5, name
    # Expert weights got the same gradients in the stacked and in transformers' fused layout.
    stacked = torch.cat([m.gate_up_proj.grad for m in layers["shard"].experts])
    assert (stacked - layers["hf-grouped_mm"].experts.gate_up_proj.grad).abs().max() < 1e-5
    assert stacked.abs().sum() > 0


def test_p1_dense_reference_does_the_layers_flops():
    size = moe_layer.SIZES["test"]
    D, F, A, T, E = size.hidden, size.expert_ffn, size.assignments, size.tokens, size.experts
    routed = 3 * 2 * A * 3 * D * F
    shared = 3 * 2 * T * 3 * D * size.shared * F
    assert size.flops == routed + shared + 3 * 2 * T * D * E


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch 2.13 deprecates all_gather_into_tensor
def test_collective_counter_counts_calls_and_bytes():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    from torch.distributed import distributed_c10d

    before = (dist.all_reduce, distributed_c10d.all_gather_single)
    counter = CollectiveCounter()
    counter.install()
    try:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        x, out = torch.ones(5), torch.empty(5)
        dist.all_gather_into_tensor(out, x)
        dist.all_reduce(x)
        dist.all_reduce(x)
        # all_gather_into_tensor runs all_gather_single inside torch: counted once, as the outer call
        assert counter.calls == {"all_gather_into_tensor": 1, "all_reduce": 2}
        assert counter.bytes == {"all_gather_into_tensor": 20, "all_reduce": 40}
        counter.reset()
        assert not counter.calls
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        counter.uninstall()
    assert (dist.all_reduce, distributed_c10d.all_gather_single) == before


def test_suite_json_has_every_figure(tmp_path):
    """`python -m bench --json` at the smallest sizes: one JSON object, every figure, sane values."""
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--mode", "test", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(proc.stdout)
    assert set(figures) == FIGURES
    assert all(isinstance(v, float) and v == v for v in figures.values())
    assert figures["p1_max_abs_diff"] < 1e-5
    assert figures["p2_collective_ratio"] > 1  # shards take fewer collectives than per-expert modules
    assert figures["p2_peak_gather_ratio"] >= 1
    assert figures["p3_packing_efficiency"] > 0.9
    # The human-readable report went to stderr, with every section.
    for title in ("P1 MoE layer", "P2 ZeRO-3", "P3 packing", "P4 streamed HF export", "P5 training checkpoint"):
        assert title in proc.stderr


def test_gpu_script_dry_run_on_cpu(tmp_path):
    results = tmp_path / "RESULTS.md"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--cpu-dry-run", "--results", str(results)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = results.read_text()
    assert "CPU dry run" in text and "#### MoE layer" in text and "#### Training step" in text
    assert "attention: SDPA per sample (CPU)" in text and "GPU tests: not run in a CPU dry run" in text
    for variant in ("dense GEMM", "shard", "origin", "hf-grouped_mm"):  # the layer table
        assert f"| {variant} | " in text, variant
    assert "| hf-deepgemm | - | - | skipped: " in text  # a CUDA/bf16-only kernel says why
    # training rows: variant, tokens, ..., last loss.  shard and origin start from the same seeded
    # weights and see the same rows: same losses; transformers' model has its own init.
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(("| shard | 1", "| shard | 2", "| origin | 1", "| origin | 2", "| hf-"))
    ]
    train = {(r[0], r[1]): r for r in rows if len(r) == 9}
    for tokens in ("128", "256"):
        assert abs(float(train["shard", tokens][-1]) - float(train["origin", tokens][-1])) < 1e-3
        (hf,) = [r for (name, t), r in train.items() if name.startswith("hf-") and t == tokens]
        assert float(hf[3].replace(",", "")) > 0  # TGS of transformers' model with its fastest experts kernel
    # the goals are GPU figures: a dry run does not read as a missed goal
    assert "NOT met" not in proc.stdout + text and "not judged: a CPU dry run" in text


def _fake_wheel(directory, name, version, requires=()):
    """A minimal real wheel file: only its METADATA matters to the bundle check."""
    import zipfile

    path = directory / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


def test_gpu_bundle_check_finds_what_an_air_gapped_node_lacks(tmp_path):
    from bench import bundle

    _fake_wheel(
        tmp_path, "deepspeed", "0.19.8", ["hjson", "pydantic>=2.0.0", "torch>=2.0.0", "numpy", 'pytest; extra == "dev"']
    )
    _fake_wheel(tmp_path, "pydantic", "1.10.0")
    problems = bundle.check(tmp_path)
    assert any("hjson" in p and "not in the bundle" in p for p in problems)
    assert any("pydantic>=2.0.0" in p and "pydantic-1.10.0" in p for p in problems)
    assert not any("torch" in p or "numpy" in p or "pytest" in p for p in problems)  # the node's, or an extra
    _fake_wheel(tmp_path, "hjson", "3.1.0")
    (tmp_path / "pydantic-1.10.0-py3-none-any.whl").unlink()
    _fake_wheel(tmp_path, "pydantic", "2.14.4")
    assert bundle.check(tmp_path) == []
    _fake_wheel(tmp_path, "torch", "2.13.0")
    assert bundle.check(tmp_path) == ["torch must come from the node, not the bundle"]


@pytest.mark.slow
def test_p8_lora_benchmark_runs_at_the_test_size():
    """P8's three engines at the smallest size: PEFT trains exactly our adapters (same count), LoRA's
    optimizer and gradient bytes are the adapters' (below the full run's), and every step ran (no timing
    is checked).  One rank: neither count nor ratio depends on the partitioning, and a second process is
    half the launch's cost."""
    from bench import lora_zero3

    result = lora_zero3.run("test", ranks=1)
    assert "| peft lora |" in result.table and "| moe-train full |" in result.table
    assert 0 < result.figures["p8_lora_states_vs_full"] < 1
    rows = {line.split("|")[1].strip(): line.split("|") for line in result.table.splitlines()[2:]}
    assert rows["moe-train lora"][6] == rows["peft lora"][6]  # trained params


def test_lora_benchmark_modes_build_the_model_their_mode_names():
    """P8's model is the one its mode (and its printed description) names: layers, experts, top-k, shard size."""
    from bench import lora_zero3

    for mode in ("wide", "qwen3-wide"):
        m = lora_zero3.MODES[mode]
        cfg, layout = lora_zero3._config(mode)
        assert cfg.num_hidden_layers == m["layers"], mode
        assert (cfg.num_experts, cfg.experts_per_token) == (m["experts"], m["top_k"]), mode
        assert layout.expert_in_one_shard == m["shard"], mode
