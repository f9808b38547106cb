"""The parallel layout of a run, one object: world size, sequence-parallel (``--sp``) and expert-parallel
(``--ep``) degrees, the data-parallel size and rank that follow, the process groups, and the one check
of a layout against a model and a DeepSpeed config that the trainer and the planner both call.

Ranks.  Sequence-parallel groups are ``sp`` consecutive ranks (they share each packed row: the
data-parallel size is world / sp and a rank's data-parallel index is rank // sp); expert-parallel groups
are ``ep`` consecutive ranks (each holds 1/ep of every layer's routed experts; ZeRO-3 partitions them
over the world / ep ranks with the same place in their group).  EP and SP are not combined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moe_train.models.common.experts import ExpertLayout
from moe_train.models.common.spec import spec_of


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ParallelDims:
    world: int
    sp: int = 1
    ep: int = 1
    rank: int = 0  # this process's global rank (the planner leaves it 0)
    # Keep each rank's routed experts gathered from their layer's forward to the optimizer step
    # (``--hold-experts``; ``zero3.keep_whole``): one all-gather per layer and step over the expert-data-parallel
    # group instead of one per layer and pass, for the local experts' full weights in memory.
    hold_experts: bool = False
    # The process groups, made by ``create_groups`` on every rank; None where the degree is 1.
    seq: Any = field(default=None, init=False, repr=False)  # parallel.sequence.SequenceParallel
    experts: Any = field(default=None, init=False, repr=False)  # parallel.expert.EPGroups

    @property
    def dp(self) -> int:
        """Data-parallel size: the groups of ranks that read different packs."""
        return self.world // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        """This rank's place in its sequence-parallel group (which slice of the row it holds)."""
        return self.rank % self.sp

    # ---------------------------------------------------------------- the one check
    def validate(self, cfg: Any, layout: ExpertLayout, ds_config: dict[str, Any] | None) -> None:
        """Raise ValueError (one line, with the valid values) for a layout the trainer cannot run: the
        expert shards, the SP degree (world, GQA heads), the EP degree (world, experts, shards, no SP)
        and, given ``ds_config``, the DeepSpeed settings EP needs.  ``ds_config`` None leaves those out
        (the planner's memory and speed models, which take ZeRO settings instead of a config)."""
        layout.check(cfg.num_experts)
        if self.sp < 1 or self.world % self.sp:
            raise ValueError(
                f"--sp {self.sp} does not divide the world size {self.world}; use one of {_divisors(self.world)}"
            )
        attention = spec_of(cfg).attention(cfg)
        H, G = attention.heads, attention.kv_heads
        if self.sp > 1 and G < H and (G % self.sp or H % G):
            raise ValueError(
                f"sequence parallelism over {self.sp} ranks needs the {G} k/v heads to be a multiple of "
                f"{self.sp} (and to divide the {H} q heads); use --sp among the divisors of {G}"
            )
        if self.ep != 1:
            self._check_ep(cfg, layout, ds_config)
        elif self.hold_experts:
            raise ValueError(
                "--hold-experts keeps each rank's expert-parallel share gathered and needs --ep N > 1; "
                "add --ep or drop --hold-experts"
            )

    def _check_ep(self, cfg: Any, layout: ExpertLayout, ds_config: dict[str, Any] | None) -> None:
        ep, world, E = self.ep, self.world, cfg.num_experts
        if E is None:
            raise ValueError(f"--ep {ep} needs routed experts; this model has none: use --ep 1")
        if ep < 1 or world % ep:  # the valid degrees also divide the experts
            raise ValueError(
                f"--ep {ep} does not divide the world size {world}; use one of {_divisors(math.gcd(E, world))}"
            )
        if E % ep:
            raise ValueError(
                f"--ep {ep} does not divide the {E} routed experts; use one of {_divisors(math.gcd(E, world))}"
            )
        if layout.moe_implementation != "shard":
            raise ValueError(
                f"--ep needs --moe-implementation shard, not {layout.moe_implementation!r} (one module per "
                "expert); use shard or --ep 1"
            )
        local, shard = E // ep, layout.shard_size(E)
        if local % shard:
            raise ValueError(
                f"expert_in_one_shard={shard} does not divide the {local} experts per rank of "
                f"--ep {ep}; use expert_in_one_shard one of {_divisors(local)}"
            )
        if self.sp != 1:
            raise ValueError(f"--ep {ep} with --sp {self.sp} is not supported; use --sp 1 or --ep 1")
        if ds_config is None:
            return
        zero = ds_config.get("zero_optimization", {})
        if zero.get("stage") != 3:
            raise ValueError(
                f"--ep needs ZeRO stage 3, the DeepSpeed config has stage {zero.get('stage')}; "
                "use --deepspeed deepspeed_zero3"
            )
        for what in ("param", "optimizer"):
            if (zero.get(f"offload_{what}") or {}).get("device", "none") not in (None, "none"):
                raise ValueError(
                    f"--ep is not supported with ZeRO offload_{what}; use --deepspeed deepspeed_zero3 "
                    "(no offload) or --ep 1"
                )
        if self.hold_experts and zero.get("zero_quantized_weights", False):
            raise ValueError(
                "--hold-experts keeps the experts' gathered weights, which zero_quantized_weights does not "
                "have (a quantized partition); drop --hold-experts or zero_quantized_weights"
            )
        if zero.get("zero_hpz_partition_size", 1) > 1 or zero.get("zero_quantized_gradients", False):
            raise ValueError(
                "--ep is not supported with zero_hpz_partition_size > 1 or zero_quantized_gradients; "
                "remove them from the DeepSpeed config or use --ep 1"
            )

    # ---------------------------------------------------------------- process groups
    def create_groups(self) -> None:
        """Every rank's SP and EP groups (a collective: every rank calls it, after the default group)."""
        from moe_train.parallel import expert
        from moe_train.parallel.sequence import SequenceParallel

        if self.sp != 1:
            self.seq = SequenceParallel(self)
        if self.ep != 1:
            expert.check_deepspeed()
            self.experts = expert.create_groups(self.ep, hold=self.hold_experts)

    def shard_batch(self, batch: dict, pad_id: int) -> dict:
        """This rank's part of a micro-batch: its sequence-parallel slice, or the whole batch."""
        return batch if self.seq is None else self.seq.shard(batch, pad_id)
