"""Expert parallelism (--ep): settings, the all-to-all dispatch under skew, and the trainer against EP=1.

The fast tests check the settings EP refuses.  The slow ones run real collectives on gloo: the
expert-parallel layer on 2 spawned processes against the whole expert stack on each rank, then the
trainer under torchrun (ZeRO-3 for real, activation checkpointing on) with --ep 2 against --ep 1 on
the same global batch, on 2 ranks (EP 2) and 4 ranks (DP 2 x EP 2), resume and the HF export.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe_train.engine.deepspeed_config import load_deepspeed_config
from moe_train.models.common.experts import ExpertLayout, ShardedExperts, dispatch_and_combine
from moe_train.parallel import expert
from moe_train.parallel.dims import ParallelDims
from tests.conftest import TINY_LAYOUT, tiny_config
from tests.launch import check, metrics, summary, torchrun

ZERO3 = load_deepspeed_config("deepspeed_zero3")


# ------------------------------------------------------------------ settings EP refuses, one line each
@pytest.mark.parametrize(
    "ep,world,layout,ds,sp,message",
    [
        (3, 4, TINY_LAYOUT, ZERO3, 1, "--ep 3 does not divide the world size 4; use one of [1, 2, 4]"),
        (3, 6, TINY_LAYOUT, ZERO3, 1, "--ep 3 does not divide the 8 routed experts; use one of [1, 2]"),
        (
            2,
            2,
            ExpertLayout("origin"),
            ZERO3,
            1,
            "--ep needs --moe-implementation shard, not 'origin' (one module per expert); use shard or --ep 1",
        ),
        (
            4,
            4,
            TINY_LAYOUT,
            ZERO3,
            1,
            "expert_in_one_shard=4 does not divide the 2 experts per rank of --ep 4; "
            "use expert_in_one_shard one of [1, 2]",
        ),
        (2, 4, TINY_LAYOUT, ZERO3, 2, "--ep 2 with --sp 2 is not supported; use --sp 1 or --ep 1"),
        (
            2,
            2,
            TINY_LAYOUT,
            load_deepspeed_config("deepspeed_zero2"),
            1,
            "--ep needs ZeRO stage 3, the DeepSpeed config has stage 2; use --deepspeed deepspeed_zero3",
        ),
        (
            2,
            2,
            TINY_LAYOUT,
            load_deepspeed_config("deepspeed_zero3_offload"),
            1,
            "--ep is not supported with ZeRO offload_param; use --deepspeed deepspeed_zero3 (no offload) or --ep 1",
        ),
    ],
    ids=["world", "experts", "origin", "shard-size", "sp", "zero2", "offload"],
)
def test_bad_settings_give_one_line_naming_the_valid_values(ep, world, layout, ds, sp, message):
    with pytest.raises(ValueError) as err:
        ParallelDims(world, sp, ep).validate(tiny_config(), layout, ds)
    assert str(err.value) == message


def test_ep1_and_valid_settings_pass():
    ParallelDims(3, 3, 1).validate(tiny_config(), ExpertLayout("origin"), {})
    ParallelDims(4, 1, 2).validate(tiny_config(), TINY_LAYOUT, ZERO3)
    ParallelDims(4, 1, 4).validate(tiny_config(), ExpertLayout("shard", 2), ZERO3)


# ------------------------------------------------------------------ the dispatch under skew, 2 processes
def _skew_worker(rank: int, init_file: str) -> None:
    """Rank 0 sends every token to expert 5 (rank 1's) and none to its own; rank 1 keeps its tokens
    on experts 4 and 6: rank 0's experts receive nothing (zero-size splits both ways) and experts 0-3
    and 7 have no token anywhere.  Outputs and gradients equal the whole stack run on each rank."""
    from moe_train.engine.distributed import hard_exit

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    edp = [dist.new_group([r]) for r in range(2)]  # every rank creates every group, in the same order
    groups = expert.EPGroups(2, "ep_size_2", dist.group.WORLD, edp[rank])
    E, S, D, F = 8, 2, 16, 8
    torch.manual_seed(0)
    full = ShardedExperts(E, S, D, F, std=0.1)
    local = expert.ExpertParallelShards(E, S, D, F, 0.1, groups)
    assert list(local) == (["0", "1"] if rank == 0 else ["2", "3"])
    for name, shard in local.items():
        shard.load_state_dict(full[int(name)].state_dict())
    T = 5
    torch.manual_seed(1 + rank)
    x = torch.randn(T, D)
    if rank == 0:  # both experts of every token on rank 1, none on rank 0
        index = torch.tensor([[5, 6]] * T)
    else:
        index = torch.tensor([[4, 6], [6, 4], [4, 6], [4, 6], [6, 4]])
    weight = torch.rand(T, 2)
    w_ref, w_ep = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    out_ref, counts = dispatch_and_combine(full, (x_ref := x.clone().requires_grad_()), w_ref, index, E)
    out, _ = dispatch_and_combine(local, (x_ep := x.clone().requires_grad_()), w_ep, index, E)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-6)
    grad = torch.randn_like(out)
    out_ref.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(x_ep.grad, x_ref.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(w_ep.grad, w_ref.grad, rtol=0, atol=1e-6)  # the router's gradient
    totals = counts.clone()
    dist.all_reduce(totals)
    for p in full.parameters():  # the whole stack's gradients summed over the ranks
        dist.all_reduce(p.grad)
    for name, shard in local.items():
        for p, q in zip(shard.parameters(), full[int(name)].parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    assert totals[:4].sum() == 0 and totals[7] == 0 and totals[5] > 0  # the skew that was meant
    _check_loading_and_forward(rank, groups)
    dist.barrier()
    dist.destroy_process_group()
    hard_exit(0)


class _Recording:
    """A tensor source that records which keys were read (around the real seeded source)."""

    def __init__(self, source) -> None:
        self.source, self.read_keys = source, set()
        self.weight_map, self.url = source.weight_map, source.url

    def keys_by_file(self):
        return self.source.keys_by_file()

    def shape(self, key):
        return self.source.shape(key)

    def dtype(self, key):
        return self.source.dtype(key)

    def read(self, key, start=0, end=None):
        self.read_keys.add(key)
        return self.source.read(key, start, end)


def _check_loading_and_forward(rank: int, groups: expert.EPGroups) -> None:
    """The loader reads the dense tensors and this rank's experts only, and the EP model's forward
    equals the whole model's on this rank's tokens."""
    from moe_train.checkpoint.hf_layout import load_into
    from moe_train.engine.weights import SeededInit
    from moe_train.models.deepseek_v2 import SPEC

    cfg = tiny_config()  # 8 experts in shards of 4: one shard per rank
    whole = SPEC.build(cfg, TINY_LAYOUT)
    load_into(whole, SeededInit(whole, seed=0))
    model = expert.apply(SPEC.build(cfg, TINY_LAYOUT), groups)
    source = _Recording(SeededInit(model, seed=0))
    load_into(model, source)
    experts_read = {int(k.split(".")[5]) for k in source.read_keys if ".mlp.experts." in k}
    assert experts_read == set(range(4 * rank, 4 * rank + 4))
    dense = {k for k in source.weight_map if ".mlp.experts." not in k}
    assert dense <= source.read_keys
    reference = dict(whole.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, reference[name]), name  # shard `experts.{rank}` holds experts 4r..4r+3
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, whole(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_skewed_routing_and_local_loading_on_two_processes(tmp_path):
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_skew_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True)


# ------------------------------------------------------------------ local experts over one rank: no ZeRO-3 hooks
def _whole_worker(rank: int, port: int, world: int) -> None:
    """EP 2 on 2 ranks: each rank's experts are partitioned over a group of one rank, so ``zero3.keep_whole``
    removes DeepSpeed's hooks from them and their ``param.data`` views the partition (no copy, never in
    DeepSpeed's fetch trace); a step still updates them through the optimizer.  On 4 ranks with
    --hold-experts (groups of 2): the same hooks, one gather in forward that backward reuses, released by
    the step, and the next forward gathers the updated weights."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    from moe_train.engine.deepspeed_config import fill_auto
    from moe_train.engine.distributed import hard_exit, init_distributed
    from moe_train.engine.model import build_model
    from moe_train.models.common.loss import causal_lm_loss
    from moe_train.parallel import zero3

    init_distributed("pytorch")
    cfg = tiny_config()
    ds = fill_auto(ZERO3, micro_batch_size=1, grad_accum=1, world_size=world, grad_clip=1.0, bf16=False, hidden_size=64)
    dims = ParallelDims(world, 1, 2, rank, hold_experts=world > 2)
    dims.validate(cfg, TINY_LAYOUT, ds)
    dims.create_groups()
    model = build_model(cfg, TINY_LAYOUT, dims, ds, torch.float32, torch.device("cpu"), None, 0, False)
    engine, _ = zero3.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-2), None, ds)
    local = [m for m in engine.module.modules() if isinstance(m, expert.ExpertParallelShards)]
    shared = [m for m in engine.module.modules() if m.__class__.__name__ == "SwiGLUMLP"]
    assert local and shared
    for m in local:  # ours only: one pre-hook on the layer's experts, nothing on its shards
        assert [h.__name__ for h in m._forward_pre_hooks.values()] == ["_fetch_whole"]
        assert not m._forward_hooks and all(not s._forward_pre_hooks and not s._forward_hooks for s in m.values())
    assert all(m._forward_pre_hooks and m._forward_hooks for m in shared)  # dense blocks keep DeepSpeed's
    params = [p for m in local for p in m.parameters()]
    before = [p.ds_tensor.clone() for p in params]
    ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(rank))

    def loss() -> torch.Tensor:
        return causal_lm_loss(engine(ids, cu_seqlens=torch.tensor([0, 32], dtype=torch.int32)).logits, ids)

    first = loss()
    forward = [p.data.data_ptr() for p in params]
    engine.backward(first)
    # backward used what the forward fetched: no second gather, no release
    assert [p.data.data_ptr() for p in params] == forward and all(p.ds_status.name == "AVAILABLE" for p in params)
    engine.step()
    assert all(p.ds_status.name == "NOT_AVAILABLE" for p in params)  # the step's release-all freed them
    with torch.no_grad():
        second = loss()
    part = dist.get_rank(group=dims.experts.edp)
    for p, b in zip(params, before, strict=True):
        assert p.ds_status.name == "AVAILABLE"  # marked so: ZeRO-3's getter does not gather a copy
        assert not torch.equal(p.ds_tensor, b)  # the optimizer updated the experts
        if world == 2:
            assert p.data.data_ptr() == p.ds_tensor.data_ptr() and p.shape == p.ds_shape  # a view, not a copy
        else:  # gathered again after the step: this rank's part of the whole is its updated partition
            n = p.ds_tensor.numel()
            assert p.shape == p.ds_shape and p.data.data_ptr() != p.ds_tensor.data_ptr()
            assert torch.equal(p.data.flatten()[part * n : (part + 1) * n], p.ds_tensor[: p.ds_numel - part * n])
    assert second.item() < first.item()
    moes = [m for m in engine.module.modules() if getattr(m, "experts", None) in local]
    assert moes and not any(getattr(m, "_external_params", None) for m in moes)  # not gathered as external
    dist.barrier()
    dist.destroy_process_group()
    hard_exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4], ids=["one-rank-groups", "hold-experts-groups-of-2"])
def test_local_experts_kept_whole_have_no_zero3_hooks_and_still_train(world):
    import torch.multiprocessing as mp

    from tests.launch import free_port

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_whole_worker, args=(free_port(), world), nprocs=world, join=True)


def test_hold_experts_refuses_quantized_weights():
    """A quantized partition is not the weight: holding it would compute with it (keep_whole keeps DeepSpeed's
    fetch there), so the combination is one line at start-up rather than a silent no-op."""
    ds = {"zero_optimization": {**ZERO3["zero_optimization"], "zero_quantized_weights": True}}
    with pytest.raises(ValueError, match="drop --hold-experts or zero_quantized_weights"):
        ParallelDims(4, 1, 2, 0, hold_experts=True).validate(tiny_config(), TINY_LAYOUT, ds)
    ParallelDims(4, 1, 2, 0).validate(tiny_config(), TINY_LAYOUT, ds)  # EP alone still takes it


def test_hold_experts_needs_ep():
    with pytest.raises(ValueError) as e:
        ParallelDims(2, 1, 1, 0, hold_experts=True).validate(tiny_config(), TINY_LAYOUT, ZERO3)
    assert str(e.value) == (
        "--hold-experts keeps each rank's expert-parallel share gathered and needs --ep N > 1; "
        "add --ep or drop --hold-experts"
    )


# ------------------------------------------------------------------ the trainer, EP 2 against EP 1
COMMON = ["tiny", "--deepspeed", "deepspeed_zero3", "--cfg-options", "activation_checkpointing=True"]


def _records(work_dir: Path) -> list[dict]:
    return [m for m in metrics(work_dir) if "loss" in m]


def _weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same_training(ep1: Path, ep2: Path) -> None:
    a, b = summary(ep1)["losses"], summary(ep2)["losses"]
    assert len(a) == len(b) >= 3
    # Step 1: same weights, same tokens (measured: equal).  Later steps: only the order of the
    # expert-gradient sums differs (measured: equal on 2 ranks); a near-tie flip stays < 2e-3.
    assert abs(a[0] - b[0]) < 1e-6, (a, b)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 2e-3, (a, b)
    for r1, r2 in zip(_records(ep1), _records(ep2), strict=True):
        # the clipping norm covers every expert once (ZeRO-3 adds the EP group to it)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-5)
        assert r1["aux_loss"] == pytest.approx(r2["aux_loss"], rel=1e-5)
        assert r1["expert_load"] == r2["expert_load"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ep")
    check(torchrun([*COMMON, "--work-dir", str(tmp / "ep1"), "--max-steps", "4", "--save-steps", "2"], tmp))
    check(
        torchrun([*COMMON, "--work-dir", str(tmp / "ep2"), "--max-steps", "4", "--save-steps", "2", "--ep", "2"], tmp)
    )
    return tmp


@pytest.mark.slow
def test_ep2_on_2_ranks_matches_ep1(runs):
    _assert_same_training(runs / "ep1", runs / "ep2")
    w1, w2 = _weights(runs / "ep1" / "hf_model"), _weights(runs / "ep2" / "hf_model")
    assert w1.keys() == w2.keys()  # every expert exported under its HF key, from its owner
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < 5e-6, worst  # measured 5e-7 after 3 steps


@pytest.mark.slow
def test_ep2_export_loads_in_transformers_with_the_ep1_logits(runs):
    from transformers import AutoModelForCausalLM

    def logits(d: Path) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(d / "hf_model", dtype=torch.float32).eval()
        with torch.no_grad():
            return model(torch.arange(40).view(1, 40) * 7 % 512).logits

    assert (logits(runs / "ep1") - logits(runs / "ep2")).abs().max() < 1e-4


@pytest.mark.slow
def test_resume_with_the_same_ep_is_exact(runs, tmp_path):
    """EP 2 resumed as EP 2 from its step-2 checkpoint replays steps 3-4 bit for bit."""
    import shutil

    work = tmp_path / "resumed"
    shutil.copytree(runs / "ep2", work)
    shutil.rmtree(work / "checkpoints" / "step-00000004")
    shutil.rmtree(work / "hf_model")
    check(
        torchrun(
            [
                *COMMON,
                "--work-dir",
                str(work),
                "--max-steps",
                "4",
                "--save-steps",
                "0",
                "--ep",
                "2",
                "--resume",
                "auto",
            ],
            tmp_path,
        )
    )
    assert summary(work)["segment_losses"] == summary(runs / "ep2")["losses"][2:]
    a, b = _weights(runs / "ep2" / "hf_model"), _weights(work / "hf_model")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("source,ep", [("ep2", "1"), ("ep1", "2")])
def test_resume_onto_another_ep_degree_continues_the_run(runs, tmp_path, source, ep):
    """The checkpoint is keyed by HF names and element ranges, not by who held what: an EP 2 run
    resumes as EP 1 and back, every rank reading only the ranges of what it now owns."""
    import shutil

    work = tmp_path / "resumed"
    shutil.copytree(runs / source, work)
    shutil.rmtree(work / "checkpoints" / "step-00000004")  # resume from step 2
    shutil.rmtree(work / "hf_model", ignore_errors=True)
    proc = torchrun(
        [*COMMON, "--work-dir", str(work), "--max-steps", "4", "--save-steps", "0", "--ep", ep, "--resume", "auto"],
        tmp_path,
    )
    check(proc)
    assert f"re-partitioned from step 2: ep {3 - int(ep)} -> {ep}; global batch 2 packs" in proc.stdout
    resumed, reference = summary(work)["segment_losses"], summary(runs / source)["losses"][2:]
    assert len(resumed) == 2 and abs(resumed[0] - reference[0]) < 1e-6, (resumed, reference)
    assert max(abs(a - b) for a, b in zip(resumed, reference, strict=True)) < 2e-3
    a, b = _weights(runs / source / "hf_model"), _weights(work / "hf_model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
def test_dp2_x_ep2_on_4_ranks_matches_ep1(tmp_path):
    """Expert-data-parallel groups of 2: each rank's experts are partitioned over 2 ranks.  The EP 2 run's
    last two steps are then replayed from its step-2 checkpoint with --hold-experts (experts gathered once per
    step, kept through backward, released by the step: two held steps in a row): the same losses and the same
    exported weights."""
    import shutil

    steps = ["--max-steps", "4", "--save-steps", "2"]
    check(torchrun([*COMMON, "--work-dir", str(tmp_path / "ep1"), *steps], tmp_path, nproc=4, timeout=600))
    check(torchrun([*COMMON, "--work-dir", str(tmp_path / "ep2"), *steps, "--ep", "2"], tmp_path, nproc=4, timeout=600))
    _assert_same_training(tmp_path / "ep1", tmp_path / "ep2")
    # the export gathers each expert over its expert-data-parallel group, then from its owner in rank 0's EP group
    w1, w2 = _weights(tmp_path / "ep1" / "hf_model"), _weights(tmp_path / "ep2" / "hf_model")
    assert w1.keys() == w2.keys()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 5e-6

    held = tmp_path / "held"
    shutil.copytree(tmp_path / "ep2", held)
    shutil.rmtree(held / "checkpoints" / "step-00000004")
    shutil.rmtree(held / "hf_model")
    resume = ["--ep", "2", "--hold-experts", "--resume", "auto"]
    proc = torchrun([*COMMON, "--work-dir", str(held), *steps, *resume], tmp_path, nproc=4, timeout=600)
    check(proc)
    assert "--hold-experts: each rank's routed experts stay gathered" in proc.stdout
    assert "(one all-gather per layer and step over 2 ranks)" in proc.stdout
    # Same weights, same sums; the gathered buffer is another allocation, and a CPU GEMM may take another
    # kernel for another alignment (measured: equal here, 1 ulp of the loss at P7's size).
    resumed, reference = summary(held)["segment_losses"], summary(tmp_path / "ep2")["losses"][2:]
    assert len(resumed) == 2 and max(abs(a - b) for a, b in zip(resumed, reference, strict=True)) < 1e-6
    w3 = _weights(held / "hf_model")
    assert max((w2[k] - w3[k]).abs().max().item() for k in w2) < 1e-6


@pytest.mark.slow
def test_ep_not_dividing_the_world_is_one_line(tmp_path):
    proc = torchrun(["tiny", "--work-dir", str(tmp_path / "run"), "--ep", "3", "--no-export"], tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert errors and all(
        line == "Error: --ep 3 does not divide the world size 2; use one of [1, 2]" for line in errors
    ), proc.stderr[-2000:]


@pytest.mark.slow
def test_benchmarks_p6_p7_run_at_the_test_size():
    """The benchmark code at its smallest size: all engines agree on the step-1 loss, and EP gathers
    no expert bytes from other ranks (no timing is checked)."""
    from bench import ep as bench_ep

    p6, p7 = bench_ep.run("test")
    assert p6.figures["p6_step1_loss_diff_2r"] <= 1e-6
    assert p6.figures["p6_expert_gather_cut_2r"] == float("inf")
    assert p7.figures["p7_step1_loss_diff"] <= 1e-5
    assert "| transformers zero3+autoep2 |" in p7.table


# ------------------------------------------------------------------ the planner's EP terms
def test_planner_predicts_ep_on_the_seed_cluster():
    """236B on 128 x A100 (8 per node): --ep 1 is the ZeRO-3 estimate (communication-bound at 8k);
    EP inside a node cuts the expert gathers by N and wins."""
    from moe_train.models.common.experts import ExpertLayout
    from moe_train.models.deepseek_v2.config import DeepseekV2Config
    from moe_train.plan.expert import dispatch_buffer_bytes, predict_speed_ep, suggest_ep
    from moe_train.plan.memory import Workload, ZeroSettings
    from moe_train.plan.speed import DEVICES, predict_speed

    cfg, layout = DeepseekV2Config.from_name("deepseek-v2"), ExpertLayout("shard", 10)
    zero = ZeroSettings.from_ds_config(ZERO3, cfg.hidden_size)
    a100 = DEVICES["a100"]
    for length in (8192, 16384):
        work = Workload(max_length=length)
        assert predict_speed_ep(cfg, layout, work, zero, 128, 16, a100, 1, 16) == predict_speed(
            cfg, layout, work, zero, 128, 16, a100, 16
        )
        suggestion = suggest_ep(cfg, layout, work, zero, 128, 16, a100, grad_accum=16, ds_config=ZERO3)
        assert suggestion["ep"] == 8  # intra-node: the all-to-all stays on NVLink
        z3, ep8 = suggestion["estimates"][1], suggestion["estimates"][8]
        assert ep8.tgs > z3.tgs and ep8.comm_s < z3.comm_s / 4  # then compute-bound at the fitted GEMM efficiency
        assert ep8.tgs > (1.5 if length == 8192 else 1.1) * z3.tgs
    work = Workload(max_length=8192)
    z3 = predict_speed(cfg, layout, work, zero, 128, 16, a100, 16)
    assert z3.comm_s > z3.compute_s  # ZeRO-3 moves more than it computes at the seed's scale
    buffers = dispatch_buffer_bytes(cfg, work, 8)  # 8192 tokens x 6 x 5120 bf16; worst case x 8
    assert buffers == {"balanced": 8192 * 6 * 5120 * 2, "worst_case": 8 * 8192 * 6 * 5120 * 2}


def test_planner_counts_rows_per_rank_and_hides_the_dispatch_behind_the_shared_experts():
    """The all-to-all moves one row per (token, other rank reached), not per assignment (checked against an
    enumeration of every top-K choice); the dispatch is hidden up to the shared experts' time, so a model
    without shared experts hides nothing."""
    import itertools

    from moe_train.models.common.experts import ExpertLayout
    from moe_train.models.deepseek_v2.config import DeepseekV2Config
    from moe_train.plan.expert import predict_speed_ep, ranks_reached
    from moe_train.plan.memory import Workload, ZeroSettings
    from moe_train.plan.speed import DEVICES

    for E, K, N in [(8, 2, 2), (16, 6, 4), (12, 3, 3)]:
        tiny = DeepseekV2Config.from_name("tiny")
        cfg = tiny.replace(n_routed_experts=E, num_experts_per_tok=K, topk_method="greedy")
        choices = list(itertools.combinations(range(E), K))
        other = sum(len({e // (E // N) for e in c} - {src}) for c in choices for src in range(N))
        assert ranks_reached(cfg, N) == pytest.approx(other / len(choices) / N)
        assert ranks_reached(cfg, N) < K * (N - 1) / N  # fewer rows than one per assignment
    cfg, layout = DeepseekV2Config.from_name("deepseek-v2-lite"), ExpertLayout("shard", 8)
    zero, work, h100 = ZeroSettings.from_ds_config(ZERO3, cfg.hidden_size), Workload(max_length=8192), DEVICES["h100"]
    est = predict_speed_ep(cfg, layout, work, zero, 16, 2, h100, 8)
    assert 0 < est.comm_hidden_s < est.comm_s  # the dispatch behind the shared experts
    alone = predict_speed_ep(cfg.replace(n_shared_experts=0), layout, work, zero, 16, 2, h100, 8)
    assert alone.comm_hidden_s == 0  # nothing runs beside the dispatch


def test_plan_ep_prints_the_estimate_against_zero3():
    from click.testing import CliRunner

    from moe_train.cli import main

    args = ["plan", "deepseek_v2_chat_full_alpaca_e3", "--gpus", "128", "--gpu-mem-gb", "80", "--max-length", "8192"]
    out = CliRunner().invoke(main, [*args, "--ep", "8"])
    assert out.exit_code == 0, out.output
    import re

    m = re.search(r"TGS ([\d.]+) against ([\d.]+) with ZeRO-3 alone \(([\d.]+)x\)", out.output)
    assert m and float(m.group(1)) > 1.5 * float(m.group(2)), out.output
    assert "suggested ep: 8" in out.output
    bad = CliRunner().invoke(main, [*args, "--ep", "3"])
    assert bad.exit_code != 0
    assert "--ep 3 does not divide the world size 128; use one of [1, 2, 4, 8, 16, 32]" in bad.output


# ------------------------------------------------------------------ ZeRO-3 gather units
def test_dense_blocks_are_one_gather_each_and_routed_experts_stay_per_shard():
    """``coalesce_gathers`` flags a layer's dense blocks (attention, dense MLP, router, shared experts)
    as DeepSpeed z3 leaves, fetched by one coalesced all-gather; the routed experts and their shards
    are never inside one (all of a layer's experts would be gathered at once)."""
    from deepspeed.utils import z3_leaf_module

    from moe_train.models.deepseek_v2 import SPEC
    from moe_train.parallel import zero3

    cfg = tiny_config()
    with torch.device("meta"):
        model = SPEC.build(cfg, TINY_LAYOUT)
    routed = {m.experts for m in model.modules() if isinstance(m, SPEC.moe_types)}
    made = zero3.coalesce_gathers(SPEC.layers(model), routed)
    leaves = {name for name, m in model.named_modules() if z3_leaf_module(m)}
    assert made == len(leaves)
    dense, moe = "model.layers.0.", f"model.layers.{cfg.num_hidden_layers - 1}."
    assert {dense + "self_attn", dense + "mlp", moe + "self_attn", moe + "mlp.gate"} <= leaves
    assert (moe + "mlp.shared_experts" in leaves) == bool(cfg.n_shared_experts)
    assert not any(".experts." in n or n.endswith((".experts", ".mlp")) and n.startswith(moe) for n in leaves)
    inside = [n for n in leaves for other in leaves if n != other and n.startswith(other + ".")]
    assert not inside  # no unit nests in another: each parameter is fetched by exactly one unit
