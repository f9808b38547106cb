"""DeepSpeed ZeRO-2/ZeRO-3 for real on CPU: 2 processes on gloo, plus the config and launcher plumbing.

The multi-process tests run this file as the worker script (see ``_worker`` at the bottom): a toy
model with a routed MoE block, built under ``deepspeed.zero.Init``, weights written from rank 0
through ``GatheredParameters``, trained a few steps with the shipped configs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_train.engine import distributed
from moe_train.engine.deepspeed_config import fill_auto, load_deepspeed_config, offloads_optimizer, shipped_configs
from moe_train.engine.distributed import expand_nodelist, launch_env
from moe_train.parallel.zero3 import initialize as zero3_initialize

HIDDEN = 16
GLOBAL_BATCH = 8
STEPS = 5
SAVE_AFTER = 2
MUON_MODULES = ("deepspeed.runtime.zero.muon.original_muon", "torch._inductor.compile_fx")


# ---------------------------------------------------------------------------- config loader


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"])
def test_shipped_config_loads_and_fills(name):
    assert name in shipped_configs()
    cfg = fill_auto(
        load_deepspeed_config(name),
        micro_batch_size=1,
        grad_accum=16,
        world_size=8,
        grad_clip=1.0,
        bf16=True,
        hidden_size=5120,
    )
    assert "auto" not in json.dumps(cfg)
    assert cfg["train_batch_size"] == 128 and cfg["train_micro_batch_size_per_gpu"] == 1
    assert cfg["gradient_accumulation_steps"] == 16 and cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"] == {"enabled": True}
    zero = cfg["zero_optimization"]
    assert zero["stage"] == (2 if name == "deepspeed_zero2" else 3)
    assert zero["reduce_bucket_size"] == 5120 * 5120
    if zero["stage"] == 3:
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 5120 * 5120)
        assert zero["stage3_param_persistence_threshold"] == 51200
        assert zero["stage3_gather_16bit_weights_on_model_save"] is False
    assert offloads_optimizer(cfg) == (name == "deepspeed_zero3_offload")


def test_config_by_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 2}))
    assert load_deepspeed_config(str(path))["zero_optimization"]["stage"] == 1


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_config_errors(tmp_path):
    msg = _one_line_error(load_deepspeed_config, "deepspeed_zero4")
    assert "deepspeed_zero4" in msg and "deepspeed_zero2, deepspeed_zero3, deepspeed_zero3_offload" in msg
    assert "missing.json" in _one_line_error(load_deepspeed_config, str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}}')
    msg = _one_line_error(load_deepspeed_config, str(bad))
    assert str(bad) in msg and "line 1 column" in msg
    for cfg, fragment in [
        ({"train_batch_size": 8}, "no zero_optimization"),
        ([1], "JSON object"),
        ({"zero_optimization": {"stage": 4}}, "got 4"),
        ({"zero_optimization": {"stage": True}}, "got True"),
        ({"zero_optimization": {}}, "got None"),
    ]:
        bad.write_text(json.dumps(cfg))
        assert fragment in _one_line_error(load_deepspeed_config, str(bad))


def test_fill_auto_errors():
    sizes = dict(micro_batch_size=1, grad_accum=2, world_size=2, grad_clip=1.0, bf16=False, hidden_size=8)
    cfg = {"zero_optimization": {"stage": 3, "sub_group_size": "auto"}, "fp16": {"enabled": "auto"}}
    msg = _one_line_error(fill_auto, cfg, **sizes)
    assert "zero_optimization.sub_group_size, fp16.enabled" in msg
    msg = _one_line_error(
        fill_auto,
        {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True}},
        **sizes,
    )
    assert "train_micro_batch_size_per_gpu=4 (trainer: 1)" in msg and "bf16.enabled=True (trainer: False)" in msg
    # explicit bucket sizes are tuning and kept; the input is not modified
    cfg = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 123}, "gradient_clipping": "auto"}
    assert fill_auto(cfg, **sizes)["zero_optimization"]["reduce_bucket_size"] == 123
    assert cfg["gradient_clipping"] == "auto"


# ---------------------------------------------------------------------------- launchers


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node01", ["node01"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
        ("gpu[08-10]-ib", ["gpu08-ib", "gpu09-ib", "gpu10-ib"]),
        ("r[1-2]n[1,3]", ["r1n1", "r1n3", "r2n1", "r2n3"]),
        ("a1,b[2],c", ["a1", "b2", "c"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-03", "node]1[", "a,,b", "n[3-1]", "n[x]", "n[[1]]"])
def test_expand_nodelist_rejects(nodelist):
    assert "Slurm node list" in _one_line_error(expand_nodelist, nodelist)


def test_launch_env_pytorch():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert launch_env("pytorch", env) == distributed.LaunchEnv(3, 8, 1, "10.0.0.1", 29500)
    assert _one_line_error(launch_env, "pytorch", {"LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}) == (
        "--launcher pytorch but RANK, WORLD_SIZE are not set; run under torchrun, set NPROC_PER_NODE (this command "
        "then starts torchrun itself), or use --launcher none"
    )
    assert "RANK='x' is not an integer" in _one_line_error(launch_env, "pytorch", {**env, "RANK": "x"})
    assert "outside a world of 8" in _one_line_error(launch_env, "pytorch", {**env, "RANK": "8"})
    assert "use --launcher pytorch" in _one_line_error(launch_env, "none", {"WORLD_SIZE": "2"})
    assert launch_env("none", {}) == distributed.LaunchEnv(0, 1, 0, None, None)
    assert "unknown launcher 'mpi'" in _one_line_error(launch_env, "mpi", {})


def test_launch_env_slurm(monkeypatch):
    monkeypatch.setattr(distributed.shutil, "which", lambda _: None)  # the parser, not scontrol
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    assert launch_env("slurm", env) == distributed.LaunchEnv(5, 16, 1, "gpu07", 10000 + 123456 % 20000)
    step = {**env, "SLURM_STEP_NODELIST": "gpu08"}
    assert launch_env("slurm", step).master_addr == "gpu08"
    explicit = {**env, "MASTER_ADDR": "head", "MASTER_PORT": "4242"}
    assert launch_env("slurm", explicit) == distributed.LaunchEnv(5, 16, 1, "head", 4242)
    msg = _one_line_error(launch_env, "slurm", {"SLURM_NTASKS": "2"})
    assert msg.startswith("--launcher slurm but SLURM_PROCID, SLURM_LOCALID are not set; run under srun")
    assert "SLURM_JOB_ID" in _one_line_error(launch_env, "slurm", {k: v for k, v in env.items() if k != "SLURM_JOB_ID"})


def test_private_extensions_dir(monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/given")
    distributed._private_extensions_dir("pytorch")
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/given"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    distributed._private_extensions_dir("pytorch")
    assert os.environ["TORCH_EXTENSIONS_DIR"].endswith(f"moe_train_torch_extensions_torchrun{os.getppid()}")


# ---------------------------------------------------------------------------- 2 processes on gloo


def _cpu_env(tmp: Path) -> dict[str, str]:
    # One extensions dir per run: a killed JIT build would leave a lock that hangs the next run.
    return {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "TORCH_EXTENSIONS_DIR": str(tmp / "torch_extensions"),
    }


def _run(tmp: Path, *args: str, nproc: int = 2) -> dict:
    """Run the worker (torchrun with ``nproc`` > 1, else one plain process); return rank 0's results."""
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "result.json"
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            __file__,
            "--launcher",
            "pytorch",
        ]
    else:
        cmd = [sys.executable, __file__, "--launcher", "none"]
    proc = subprocess.run(
        [*cmd, *args, "--out", str(out)], env=_cpu_env(tmp), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert not (tmp / "torch_extensions").exists(), "a CPU start-up JIT-built a DeepSpeed op"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    result = _run(tmp, "--config", "deepspeed_zero3", "--save-after", str(SAVE_AFTER), "--ckpt-dir", str(tmp / "ckpt"))
    return result, tmp / "ckpt"


@pytest.mark.slow
def test_zero3_partitions_and_trains(zero3):
    r, _ = zero3
    assert r["world_size"] == 2 and len(r["losses"]) == STEPS
    assert r["losses"][-1] < r["losses"][0] and all(math.isfinite(x) for x in r["losses"])
    # zero.Init left no full parameter on any rank; each holds its half of every tensor
    assert r["empty_after_init"] == [True, True]
    assert (r["full_numel"], r["half_numel"]) == (1313, 657)
    assert r["local_numel"] == [657, 657]
    # zero3.initialize kept DeepSpeed's Muon (a torch.compile at import: ~1 s CPU a rank) out of ZeRO-3's start
    assert r["compiled_muon"] == r["compiled_muon_after"] == [False, False]


@pytest.mark.slow
def test_zero2_matches_zero3(zero3, tmp_path):
    z2 = _run(tmp_path, "--config", "deepspeed_zero2")
    assert z2["losses"] == pytest.approx(zero3[0]["losses"], abs=1e-5, rel=1e-5)
    # ZeRO-2's gradient reduction imports the real Muon module mid-run: no stand-in was left behind
    assert z2["compiled_muon"] == [False, False] and z2["compiled_muon_after"] == [True, True]


@pytest.mark.slow
def test_zero3_offload_matches_zero3(zero3, tmp_path):
    # torch AdamW on the offloaded state, so the shipped JSON runs without building DeepSpeed's CPU Adam
    off = _run(tmp_path, "--config", "deepspeed_zero3_offload", "--torch-adamw-offload")
    assert off["offload"] == [True, True] and zero3[0]["offload"] == [False, False]
    assert off["losses"] == pytest.approx(zero3[0]["losses"], abs=1e-5, rel=1e-5)


@pytest.mark.slow
def test_launcher_none_matches_two_ranks(zero3, tmp_path):
    one = _run(tmp_path, "--config", "deepspeed_zero3", nproc=1)
    assert one["world_size"] == 1
    assert one["losses"] == pytest.approx(zero3[0]["losses"], abs=1e-5, rel=1e-5)


@pytest.mark.slow
def test_resume_reproduces_losses_exactly(zero3, tmp_path):
    full, ckpt = zero3
    assert (ckpt / "latest").read_text() == f"step{SAVE_AFTER}"
    resumed = _run(tmp_path, "--config", "deepspeed_zero3", "--resume", str(ckpt))
    assert resumed["client_state"] == {"step": SAVE_AFTER, "data_position": SAVE_AFTER * GLOBAL_BATCH}
    # the losses after the resume check in turn the weights, the Adam moments, the LR-scheduler state
    assert resumed["losses"] == full["losses"][SAVE_AFTER:]


# ---------------------------------------------------------------------------- the worker


def _worker(argv: list[str]) -> None:
    import argparse

    import deepspeed
    import torch
    import torch.distributed as dist
    from torch import nn

    p = argparse.ArgumentParser()
    p.add_argument("--launcher", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--save-after", type=int)
    p.add_argument("--ckpt-dir")
    p.add_argument("--resume")
    p.add_argument("--torch-adamw-offload", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    class ToyMoE(nn.Module):
        """Top-1 routing scaled by the router probability, so ranks send different tokens to each
        expert. Every expert runs, on no tokens if none picked it: ZeRO-2 reduces gradients in
        buckets that must hold the same parameters on every rank (a skipped expert desynchronises
        them: a hang, a gloo size error, or silently mixed gradients)."""

        def __init__(self, dim: int, num_experts: int):
            super().__init__()
            self.router = nn.Linear(dim, num_experts, bias=False)
            self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_experts))

        def forward(self, x_TD):
            probs_TE = self.router(x_TD).softmax(-1)
            choice_T = probs_TE.argmax(-1)
            out_TD = torch.zeros_like(x_TD)
            for e, expert in enumerate(self.experts):
                idx = (choice_T == e).nonzero().squeeze(-1)
                out_TD = out_TD.index_add(0, idx, expert(x_TD[idx]) * probs_TE[idx, e : e + 1])
            return x_TD + out_TD

    info = distributed.init_distributed(args.launcher)
    rank, world = info.rank, info.world_size
    micro = GLOBAL_BATCH // world
    cfg = fill_auto(
        load_deepspeed_config(args.config),
        micro_batch_size=micro,
        grad_accum=1,
        world_size=world,
        grad_clip=1.0,
        bf16=False,
        hidden_size=HIDDEN,
    )
    if args.torch_adamw_offload:
        cfg["zero_force_ds_cpu_optimizer"] = False
    zero3 = cfg["zero_optimization"]["stage"] == 3

    torch.manual_seed(100 + rank)  # ranks initialise differently on purpose: weights must come from rank 0
    with deepspeed.zero.Init(config_dict_or_path=cfg, enabled=zero3):
        model = nn.Sequential(nn.Linear(8, HIDDEN), nn.GELU(), ToyMoE(HIDDEN, 4), nn.Linear(HIDDEN, 1))
    deepspeed.utils.set_z3_leaf_modules(model, [ToyMoE])
    params = list(model.parameters())
    result: dict = {"world_size": world}
    if zero3:
        local = sum(p.ds_tensor.numel() for p in params)
        result["full_numel"] = sum(p.ds_numel for p in params)
        result["half_numel"] = sum(-(-p.ds_numel // world) for p in params)
        result["local_numel"] = [None] * world
        result["empty_after_init"] = [None] * world
        dist.all_gather_object(result["local_numel"], local)
        dist.all_gather_object(result["empty_after_init"], all(p.numel() == 0 for p in params))

    # What a checkpoint loader does: rank 0 writes full tensors, ZeRO-3 scatters them on exit.
    # (Without ZeRO-3 the context is a no-op and deepspeed.initialize broadcasts rank 0's weights.)
    gen = torch.Generator().manual_seed(0)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        for param in params:
            value = torch.randn(param.shape, generator=gen) * 0.3
            if rank == 0:
                param.data.copy_(value)

    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.1 * s)
    engine, _ = zero3_initialize(model, optimizer, scheduler, cfg)  # the trainer's deepspeed.initialize
    # DeepSpeed's Muon and the torch.compile of its kernels (torch._inductor) stay unloaded
    result["compiled_muon"] = [m in sys.modules for m in MUON_MODULES]
    result["offload"] = [bool(engine.zero_offload_optimizer()), bool(engine.zero_offload_param())]
    first = 0
    if args.resume:
        _, client_state = engine.load_checkpoint(args.resume)
        # DeepSpeed hands back its own entries too (ds_config, ds_version ...); keep ours
        result["client_state"] = {k: client_state[k] for k in ("step", "data_position")}
        first = client_state["step"]

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 8, generator=gen)
    y = x @ torch.randn(8, 1, generator=gen)
    x, y = x[rank * micro : (rank + 1) * micro], y[rank * micro : (rank + 1) * micro]
    losses = []
    for step in range(first, STEPS):
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if step + 1 == args.save_after:
            engine.save_checkpoint(
                args.ckpt_dir,
                tag=f"step{step + 1}",
                client_state={"step": step + 1, "data_position": (step + 1) * GLOBAL_BATCH},
            )
    result["losses"] = losses
    result["compiled_muon_after"] = [m in sys.modules for m in MUON_MODULES]
    if rank == 0:
        Path(args.out).write_text(json.dumps(result))
    distributed.destroy_distributed()
    distributed.hard_exit(0)


if __name__ == "__main__":
    _worker(sys.argv[1:])
