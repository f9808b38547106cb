"""Training checkpoints (DeepSpeed states + data position + RNG) under a work dir on any fsspec URL.

Layout: ``{work_dir}/checkpoints/step-{N:08d}/`` holding DeepSpeed's files and, written last by
rank 0 after every rank finished, ``COMPLETE``.  Only directories with ``COMPLETE`` are ever
resumed from; others are the remains of a crash and are deleted by the next run.

DeepSpeed writes only to local paths.  For a local work dir it writes in place; for an object
store each rank writes to its own local staging dir and uploads its files, then rank 0 marks the
checkpoint complete.
"""

from __future__ import annotations

import json
import os
import posixpath
import random
import re
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moe_train.storage import is_local, resolve

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_ZERO_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank optimizer partition files


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    def __init__(self, work_dir: str, rank: int, keep: int, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, root = resolve(work_dir, storage_options)
        self.url = work_dir.rstrip("/")
        self.root = posixpath.join(root, "checkpoints")
        self.rank, self.keep = rank, keep
        self.local = is_local(self.fs)
        self._staging = tempfile.mkdtemp(prefix=f"moe-train-rank{rank}-") if not self.local else None

    # ------------------------------------------------------------------ listing
    def _steps(self) -> list[tuple[int, str, bool]]:
        if not self.fs.exists(self.root):
            return []
        out = []
        for path in self.fs.ls(self.root, detail=False):
            m = _STEP_DIR.match(posixpath.basename(path.rstrip("/")))
            if m:
                out.append((int(m.group(1)), path, self.fs.exists(posixpath.join(path, COMPLETE))))
        return sorted(out)

    def latest(self) -> str | None:
        complete = [path for _, path, done in self._steps() if done]
        return complete[-1] if complete else None

    def remove_incomplete(self) -> list[str]:
        """Rank 0, at start-up: partial checkpoints of a crashed run are deleted."""
        removed = [path for _, path, done in self._steps() if not done]
        for path in removed:
            self.fs.rm(path, recursive=True)
        return removed

    # ------------------------------------------------------------------ save / load
    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> str:
        tag = f"step-{step:08d}"
        target = posixpath.join(self.root, tag)
        if self.rank == 0 and self.fs.exists(target):  # a leftover of an earlier run: never half-overwritten
            self._remove(target)
        if dist.is_initialized():
            dist.barrier()
        save_dir = os.path.dirname(target) if self.local else os.path.join(self._staging, "out")
        engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
        if not self.local:
            src = os.path.join(save_dir, tag)
            for name in sorted(os.listdir(src)):
                self.fs.put_file(os.path.join(src, name), posixpath.join(target, name))
            shutil.rmtree(save_dir)
        if dist.is_initialized():
            dist.barrier()  # every rank's files are in place before the checkpoint is marked complete
        if self.rank == 0:
            with self.fs.open(posixpath.join(target, COMPLETE), "w") as f:
                json.dump({"step": step}, f)
            self._prune()
        if dist.is_initialized():
            dist.barrier()
        return target

    def _prune(self) -> None:
        complete = [path for _, path, done in self._steps() if done]
        for path in complete[:-self.keep] if self.keep > 0 else []:
            self._remove(path)

    def _remove(self, path: str) -> None:
        marker = posixpath.join(path, COMPLETE)
        if self.fs.exists(marker):
            self.fs.rm(marker)  # first, so that a crash mid-delete leaves an incomplete checkpoint
        self.fs.rm(path, recursive=True)

    def load(self, engine: Any, resume: tuple[Any, str]) -> dict[str, Any]:
        """Load a checkpoint found by `resolve` (it may live on another filesystem than the work dir)."""
        fs, path = resume
        tag = posixpath.basename(path.rstrip("/"))
        staging = None
        if is_local(fs):
            load_dir = posixpath.dirname(path.rstrip("/"))
        else:  # DeepSpeed reads local files: fetch the shared files and this rank's own partition only
            staging = tempfile.mkdtemp(prefix=f"moe-train-resume-rank{self.rank}-")
            os.makedirs(os.path.join(staging, tag))
            for remote in fs.ls(path, detail=False):
                name = posixpath.basename(remote)
                owner = _ZERO_RANK_FILE.search(name)
                if owner is None or int(owner.group(1)) == self.rank:
                    fs.get_file(remote, os.path.join(staging, tag, name))
            load_dir = staging
        try:
            _, client_state = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=True,
                                                     load_optimizer_states=True, load_lr_scheduler_states=True)
        finally:
            if staging:
                shutil.rmtree(staging, ignore_errors=True)
        if client_state is None:
            raise ValueError(f"{path}: DeepSpeed could not load this checkpoint; it may belong to another model "
                             "or world size")
        return client_state

    def resolve(self, resume: str | None) -> tuple[Any, str] | None:
        """--resume auto: the newest complete checkpoint (or None); --resume URL: that one, checked."""
        if not resume:
            return None
        if resume == "auto":
            latest = self.latest()
            return (self.fs, latest) if latest else None
        fs, path = resolve(resume)
        if not fs.exists(posixpath.join(path, COMPLETE)):
            raise ValueError(f"--resume {resume} is not a complete checkpoint (no {COMPLETE} inside); "
                             "pass a step-N directory under <work_dir>/checkpoints or use --resume auto")
        return fs, path

    def close(self) -> None:
        if self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)
