"""``moe-train export``: a training checkpoint of any world size to the HF layout, in one process.

The output is checked first: never the source, never inside it or inside any training checkpoint,
never inside the source's work dir's ``checkpoints/``, and writable.  The checkpoint is verified
before anything is written (COMPLETE's seal, every file's size, state.json's digest, every
safetensors header's digest, every HF tensor tiled exactly by the ranks' ranges).  Then each HF
tensor is assembled from the ranges that hold it, each range's digest checked as it is read, and
streamed into the export (``HFExportWriter``: index and COMPLETE last), one tensor in memory at a
time: a damaged range stops the export before its index and COMPLETE are written.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import time
from collections.abc import Callable
from typing import Any

import torch

from moe_train.checkpoint.hf_layout import HFExportWriter, expected_hf_keys, parameter_shapes
from moe_train.checkpoint.safetensors_io import PlannedTensor
from moe_train.checkpoint.training_state import COMPLETE, TOKENIZER_DIR, TrainingCheckpoint
from moe_train.models import spec_of
from moe_train.storage import display, is_local, redact, resolve

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def export_checkpoint(
    checkpoint_url: str,
    out_url: str,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    log: Callable[[str], None] = print,
) -> None:
    t0 = time.perf_counter()
    fs, path = resolve(checkpoint_url)
    out_fs, out_root = resolve(out_url)
    check_output(fs, path, out_fs, out_root)
    ckpt = TrainingCheckpoint(fs, path)
    if ckpt.state.get("lora"):  # adapters only: the base is elsewhere (its URL is in state.json)
        raise ValueError(
            f"{ckpt.where} is a LoRA checkpoint (adapters only, no base weights); use the run's hf_adapter/ "
            "(PEFT) export, or hf_model/ of a run trained with --merge"
        )
    cfg = ckpt.config
    name = dtype or ckpt.state["config"].get("torch_dtype", "float32")
    if not isinstance(name, str) or name not in DTYPES:
        raise ValueError(f"{ckpt.where}/state.json: config.torch_dtype is {name!r}; pass --dtype fp32 or bf16")
    out_dtype = DTYPES[name]
    with torch.device("meta"):
        reference = spec_of(cfg).build(cfg, ckpt.layout)
    shapes = {key: shape for key, (_, shape) in expected_hf_keys(reference).items()}
    in_params = parameter_shapes(reference)  # the rest are persistent buffers, kept whole in state.json
    buffers = ckpt.state.get("buffers", {})
    missing = sorted(set(shapes) - set(in_params) - set(buffers))
    if missing:
        raise ValueError(f"{ckpt.where} has no value for {', '.join(missing)}; export a checkpoint of this version")
    wrong = [k for k in set(shapes) - set(in_params) if len(buffers[k]) != math.prod(shapes[k])]
    if wrong:
        raise ValueError(f"{ckpt.where}/state.json: buffers.{wrong[0]} has the wrong size; export another checkpoint")
    index = ckpt.ranges("master", in_params)  # every header checked before anything is written
    check_writable(out_fs, out_root, out_url)
    writer = HFExportWriter(out_url, [PlannedTensor(k, out_dtype, s) for k, s in shapes.items()], max_shard_size)
    try:
        for key, shape in shapes.items():
            if key in in_params:
                full = torch.empty(math.prod(shape), dtype=torch.float32)
                ckpt.read_into(index[key], 0, full)
            else:
                full = torch.tensor(buffers[key], dtype=torch.float32)
            writer.write(key, full.view(shape).to(out_dtype))
        for name in sorted(n for n in ckpt.files if n.startswith(TOKENIZER_DIR + "/")):
            data = ckpt.read_file(name)  # checked against its digest
            with out_fs.open(posixpath.join(out_root, posixpath.basename(name)), "wb") as f:
                f.write(data)
        writer.finish(
            cfg,
            None,
            {"step": ckpt.step, "source": redact(fs.unstrip_protocol(path)), "recipe": ckpt.state["recipe"]["name"]},
        )
    except BaseException:
        writer.abort()
        raise
    finally:
        ckpt.close()
    log(
        f"exported {display(fs, path)} (step {ckpt.step}, written by {ckpt.world} ranks) to {redact(out_url)} "
        f"in {time.perf_counter() - t0:.1f}s"
    )


def _real(fs: Any, path: str) -> str:
    """A local path with symlinks resolved (an output reached through a link is still where it lands)."""
    return os.path.realpath(path) if is_local(fs) else path


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _is_training_checkpoint(fs: Any, directory: str) -> bool:
    marker = posixpath.join(directory, COMPLETE)
    try:
        if not fs.isfile(marker):
            return False
        with fs.open(marker, "rb") as f:
            head = f.read(200)
    except OSError:
        return False
    return b'"format": "moe-train-checkpoint/' in head  # every format ours has written starts so


def check_output(fs: Any, source: str, out_fs: Any, out: str) -> None:
    """Refuse (one line) an output that is, or lies inside, the source, a training checkpoint, or the
    ``checkpoints/`` directory of the work dir the source belongs to: an export there would replace a
    checkpoint's COMPLETE or leave HF files among the checkpoints."""
    out_real = _real(out_fs, out)
    fix = "pass an OUT_URL outside the checkpoints (e.g. WORK_DIR/hf_model-step-N)"
    same_fs = type(fs) is type(out_fs)
    source_real = _real(fs, source)
    if same_fs and _inside(out_real, source_real):
        raise ValueError(f"the export {display(out_fs, out)} would land in the checkpoint it reads; {fix}")
    if same_fs and posixpath.basename(posixpath.dirname(source_real)) == "checkpoints":
        checkpoints = posixpath.dirname(source_real)
        if _inside(out_real, checkpoints):
            raise ValueError(
                f"the export {display(out_fs, out)} would land inside {display(fs, checkpoints)}, the work "
                f"dir's training checkpoints; {fix}"
            )
    directory = out_real
    while True:
        if _is_training_checkpoint(out_fs, directory):
            raise ValueError(
                f"the export {display(out_fs, out)} would land inside the training checkpoint "
                f"{display(out_fs, directory)}; {fix}"
            )
        parent = posixpath.dirname(directory)
        if parent == directory or not parent or (not is_local(out_fs) and "/" not in directory):
            return
        directory = parent


def check_writable(fs: Any, root: str, url: str) -> None:
    """One line, before the export starts, when OUT_URL cannot be written (read-only, under a file)."""
    probe = posixpath.join(root, f".write-probe-{os.getpid()}")
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(json.dumps({"probe": True}).encode())
        fs.rm(probe)
    except OSError as e:
        raise ValueError(
            f"cannot write the export to {redact(url)} ({type(e).__name__}: {e.strerror or e}); pass a writable OUT_URL"
        ) from None
