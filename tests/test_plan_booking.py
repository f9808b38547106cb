"""`moe-train plan` as a booking tool: the search keeps the training run, planned recipes follow the planner,
and the answers (time, GPU-hours, commands, what would fit) come from the same prediction."""

from __future__ import annotations

import configparser
import json
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from moe_train.cli import main
from moe_train.plan import build_plan
from moe_train.plan.booking import PRESETS, alpaca_tokens, presets_time_limit, slurm_time
from moe_train.plan.command import run_search
from moe_train.plan.search import search
from moe_train.recipes import get_recipe
from moe_train.recipes.builtin import PLANNED
from tests.test_launch import appdef, trainer_cmd

V2 = "deepseek_v2_chat_full_alpaca_e3"
LITE = "deepseek_v2_lite_chat_full_alpaca_e3"
REPO = Path(__file__).resolve().parents[1]


def run(*args: str):
    return CliRunner().invoke(main, ["plan", *args])


def _tiny_search(gpu_mem_gb: float = 80, **kw):
    p = build_plan(get_recipe("tiny").replace(grad_accum=8), 2, gpu_mem_gb)
    return p, search(p.model, p.work, p.zero, p.ds_config, 2, 1, p.device, gpu_mem_gb, 8, top=10**6, **kw)


# ---------------------------------------------------------------------------- the search keeps the run
def test_search_holds_the_global_batch_and_shows_the_rest_apart():
    p, found = _tiny_search()
    batch = 2 * p.work.tokens_per_rank * 8
    assert found.global_batch == batch and found.best and found.other_batch
    for r in found.best:  # grad_accum chosen so that every ranked configuration trains the same batch
        c = r.candidate
        assert 2 * -(-c.max_length // c.sp) * c.grad_accum == batch, c
    for r in found.other_batch:  # a pack longer than a rank's share of the batch: another run
        assert 2 * -(-r.candidate.max_length // r.candidate.sp) * r.candidate.grad_accum != batch
    _, free = _tiny_search(free_batch=True)
    assert free.global_batch == 0 and not free.other_batch
    assert {r.candidate.grad_accum for r in free.best} == {8}
    assert max(r.candidate.max_length for r in free.best) > max(r.candidate.max_length for r in found.best)


def test_search_without_varlen_keeps_max_length():
    p = build_plan(get_recipe("tiny").replace(varlen=False), 2, 80)
    found = search(p.model, p.work, p.zero, p.ds_config, 2, 1, p.device, 80, 1, top=10**6)
    assert {r.candidate.max_length for r in found.best} == {p.work.max_length}


def test_configurations_under_the_headroom_rank_last():
    # V2-Lite on 8 x 53 GB: the fastest configurations (EP 8, no checkpointing) peak at ~48.2 GB, 9% free
    p = build_plan(get_recipe(LITE), 8, 53)
    found = search(p.model, p.work, p.zero, p.ds_config, 8, 1, p.device, 53, 16, top=10**6)
    tight = [r.tight for r in found.best]
    assert any(tight) and not all(tight) and tight == sorted(tight)  # those with the headroom first
    for r in found.best:
        assert r.tight == (r.headroom_gb < 0.1 * 53)
    # a faster configuration without the headroom is ranked after a slower one with it
    assert max(r.tgs for r in found.best if r.tight) > found.best[0].tgs


def test_search_report_states_the_batch_and_the_verdict():
    res = run("tiny", "--gpus", "2", "--gpu-mem-gb", "80", "--search")
    assert res.exit_code == 0, res.output
    assert "held: " in res.output and "tokens per optimizer step" in res.output
    assert "verdict: #1 leaves" in res.output
    bad = run("tiny", "--gpus", "2", "--gpu-mem-gb", "80", "--search", "--headroom", "1")
    assert bad.exit_code != 0 and "--headroom" in bad.output
    text = run("tiny", "--gpus", "2", "--gpu-mem-gb", "80", "--search", "--headroom", "0.9999").output
    assert "verdict: nothing leaves the 100% headroom" in text and "warning: configurations marked !" in text


# ---------------------------------------------------------------------------- planned recipes
def test_the_seed_recipe_and_preset_stay_the_seeds():
    r = get_recipe(V2)
    assert (r.ep, r.sp, r.moe_implementation, r.expert_in_one_shard, r.max_length, r.grad_accum) == (
        1,
        1,
        "shard",
        10,
        2048,
        16,
    )
    assert r.deepspeed == "deepspeed_zero3" and r.varlen and r.activation_checkpointing
    assert PRESETS[V2] == ("deepseek_v2_full", 64)


@pytest.mark.slow  # one search per planned recipe on its cluster: ~40 s of CPU
@pytest.mark.parametrize("name", sorted(PLANNED))
def test_planned_recipe_is_within_ten_percent_of_the_planners_best(name):
    cluster = PLANNED[name]
    planned, base = get_recipe(name), get_recipe(cluster.based_on)
    kw = dict(nodes=cluster.gpus // 8, device=cluster.gpu)
    p = build_plan(planned, cluster.gpus, cluster.gpu_mem_gb, **kw)
    seed = build_plan(base, cluster.gpus, cluster.gpu_mem_gb, **kw)
    assert p.fits and p.headroom_gb >= 0.1 * cluster.gpu_mem_gb
    # the same training run: tokens per optimizer step, data, numerics
    batch = cluster.gpus * p.work.tokens_per_rank * planned.grad_accum
    assert batch == cluster.gpus * seed.work.tokens_per_rank * base.grad_accum
    for field in ("data", "dtype", "varlen", "lr", "epochs", "model", "template"):
        assert getattr(planned, field) == getattr(base, field), field
    found = run_search(seed, base.grad_accum)
    assert found.global_batch == batch and not found.best[0].tight
    assert p.speed.tgs >= 0.9 * found.best[0].tgs, (p.speed.tgs, found.best[0].candidate)
    if name == "deepseek_v2_chat_full_alpaca_e3_64xa100":  # the bar: 4x the seed recipe's 34 TGS
        assert seed.speed.tgs == pytest.approx(34, abs=1) and p.speed.tgs >= 4 * seed.speed.tgs


def test_plan_on_the_seed_recipe_points_at_the_planned_one():
    out = json.loads(run(V2, "--gpus", "64", "--gpu-mem-gb", "80", "--json").output)
    (planned,) = out["planned"]
    assert planned["recipe"] == "deepseek_v2_chat_full_alpaca_e3_64xa100" and planned["speedup"] >= 4
    text = run(V2, "--gpus", "64", "--gpu-mem-gb", "80").output
    assert "planned: deepseek_v2_chat_full_alpaca_e3_64xa100 runs this training run on 64 x A100 80 GB" in text
    assert "x this recipe's 34.3 there (TorchX preset deepseek_v2_full_64xa100)" in text


def test_torchxconfig_time_limit_comes_from_the_prediction():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "components" / ".torchxconfig")
    limit, slowest = presets_time_limit()
    assert cfg["slurm"]["time"] == limit and slowest == V2
    assert slurm_time(3.8 * 3600) == "0-07:00:00" and slurm_time(30 * 3600) == "1-22:00:00"


# ---------------------------------------------------------------------------- booking answers
def test_booking_figures_and_the_commands_launch_the_chosen_configuration():
    out = json.loads(
        run("tiny", "--gpus", "2", "--gpu-mem-gb", "80", "--search", "--tokens", "1000000", "--json").output
    )
    top, book = out["best"][0], out["booking"]
    assert book["global_batch_tokens"] == 2 * 256 * 1 == out["global_batch_tokens"]
    assert book["epoch_s"] == pytest.approx(1e6 / (top["tgs"] * 2), abs=0.05)  # rounded to 0.1 s
    assert book["run_s"] == pytest.approx(1 * book["epoch_s"], abs=0.1)
    assert book["gpu_hours"] == pytest.approx(book["run_s"] * 2 / 3600, abs=0.1)
    assert book["steps_per_epoch"] == -(-1_000_000 // 512)
    # the srun line parses with the trainer's own CLI into the configuration the search chose
    argv = shlex.split(out["commands"]["srun"])
    assert argv[:6] == ["srun", "-N", "1", "--ntasks-per-node", "2", "--gpus-per-task"]
    ctx = main.commands["train"].make_context("train", argv[argv.index("train") + 1 :])
    tiny = get_recipe("tiny")
    chosen = {k: top[k] for k in ("ep", "sp", "max_length", "expert_in_one_shard", "moe_implementation")}
    parsed = {k: ctx.params[k] if ctx.params[k] is not None else getattr(tiny, k) for k in chosen}
    assert parsed == chosen
    # the TorchX line builds a job whose trainer command carries the same configuration
    torchx = shlex.split(out["commands"]["torchx"].removeprefix("cd components && "))
    assert torchx[torchx.index("-cfg") + 1] == f"time={book['slurm_time']}"
    at = next(i for i, a in enumerate(torchx) if a.startswith("components.py:"))
    (role,) = appdef(torchx[at].split(":")[1], *torchx[at + 1 :]).roles
    cmd = trainer_cmd(role.args[-1])
    ctx = main.commands["train"].make_context("train", cmd[2:])
    assert {k: ctx.params[k] if ctx.params[k] is not None else getattr(tiny, k) for k in chosen} == chosen


def test_alpaca_token_estimate_is_used_without_tokens():
    out = json.loads(run(V2, "--gpus", "64", "--gpu-mem-gb", "80", "--json").output)
    assert out["booking"]["tokens_per_epoch"] == alpaca_tokens()
    assert 9e6 < alpaca_tokens() < 11e6  # 52,002 samples of ~190 tokens
    tiny = json.loads(run("tiny", "--gpus", "2", "--gpu-mem-gb", "80", "--json").output)
    assert "booking" not in tiny and "torchx" in tiny["commands"]  # no token count for its data: no time


def test_no_fit_names_the_smallest_changes_that_fit():
    out = json.loads(run(LITE, "--gpus", "8", "--gpu-mem-gb", "24", "--json").output)
    assert not out["fits"] and out["if_it_does_not_fit"]
    kinds = {o["change"]: o for o in out["if_it_does_not_fit"]}
    assert any(k.endswith("GPUs") for k in kinds)
    lite = get_recipe(LITE)
    for kind, o in kinds.items():
        assert o["tgs"] > 0
        if kind.endswith("GPUs"):  # the first doubling that fits, and the one before does not
            gpus = o["with"]
            assert (
                build_plan(lite, gpus, 24, nodes=gpus // 8).fits
                and not build_plan(lite, gpus // 2, 24, nodes=max(1, gpus // 16)).fits
            )
