"""``moe-train export``: a training checkpoint of any world size to the HF layout, in one process.

The checkpoint is verified first (COMPLETE, every file's size, every safetensors header, every HF
tensor tiled exactly by the ranks' ranges), so nothing is written for an incomplete or truncated
one.  Then each HF tensor is assembled from the ranges that hold it and streamed into the export
(``HFExportWriter``: index and COMPLETE last), one tensor in memory at a time.
"""

from __future__ import annotations

import math
import posixpath
import time
from collections.abc import Callable

import torch

from moe_train.checkpoint.hf_layout import HFExportWriter, expected_hf_keys, parameter_shapes
from moe_train.checkpoint.safetensors_io import PlannedTensor
from moe_train.checkpoint.training_state import TOKENIZER_DIR, TrainingCheckpoint
from moe_train.models import spec_of
from moe_train.storage import display, redact, resolve

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
    ckpt = TrainingCheckpoint(fs, path)
    cfg = ckpt.config
    out_dtype = DTYPES[dtype or ckpt.state["config"].get("torch_dtype", "float32")]
    with torch.device("meta"):
        reference = spec_of(cfg).build(cfg, ckpt.layout)
    shapes = {key: shape for key, (_, shape) in expected_hf_keys(reference).items()}
    in_params = parameter_shapes(reference)  # the rest are persistent buffers, kept whole in state.json
    buffers = ckpt.state.get("buffers", {})
    missing = sorted(set(shapes) - set(in_params) - set(buffers))
    if missing:
        raise ValueError(f"{ckpt.where} has no value for {', '.join(missing)}; export a checkpoint of this version")
    index = ckpt.ranges("master", in_params)  # every header checked before anything is written
    writer = HFExportWriter(out_url, [PlannedTensor(k, out_dtype, s) for k, s in shapes.items()], max_shard_size)
    try:
        for key, shape in shapes.items():
            if key in in_params:
                full = torch.empty(math.prod(shape), dtype=torch.float32)
                ckpt.read_into(index[key], 0, full)
            else:
                full = torch.tensor(buffers[key], dtype=torch.float32)
            writer.write(key, full.view(shape).to(out_dtype))
        tokenizer = posixpath.join(path, TOKENIZER_DIR)
        has_tokenizer = any(name.startswith(TOKENIZER_DIR + "/") for name in ckpt.files)
        writer.finish(
            cfg,
            fs.unstrip_protocol(tokenizer) if has_tokenizer else None,
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
