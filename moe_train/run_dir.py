"""The run directory (``--work-dir``): resolved once, and the one owner of every path in it.

Layout of ``{work_dir}/``::

    checkpoints/      training checkpoints, step-NNNNNNNN/ (moe_train/checkpoint/training_state.py)
    metrics/          one metrics file per start or resume, segment-NNNN.jsonl (moe_train/engine/metrics.py)
    metrics.jsonl     the single metrics file of runs before segments, read as segment 0
    tb/               TensorBoard event files
    recipe.json       the resolved recipe, URLs redacted, rewritten by each segment
    deepspeed.json    the resolved DeepSpeed config, likewise
    summary.json      the whole run's figures, written at the end
    hf_model/         the HF export (a LoRA run: with --merge, the base with the adapters merged in)
    hf_adapter/       a LoRA run's PEFT adapter (adapter_config.json, adapter_model.safetensors)
    lease/            the owner's lease, NNNNNNNN.json per generation (moe_train/engine/lease.py)
    tracking.json     the tracked runs' ids (MLflow, W&B), so a resume continues them (moe_train/engine/tracking.py)
    wandb/            W&B's own run directory (local work dirs; a temporary local one for object stores)
    data_cache/       the tokenized data, memory-mapped (moe_train/data/cache.py); local disk instead for a
                      work dir on an object store, or --data-cache
    previous/TIME/    earlier runs moved aside by --overwrite

Every other module asks this object for a path and never joins one itself; what lies inside
``checkpoints/``, ``metrics/`` and ``lease/`` is the layout of the module named beside it.  The durable
writes of a run (JSON records, checkpoint files, deletions, moves) go through the methods below, each
after the lease's fence (``fence``, rank 0's lease, moe_train/engine/lease.py): writes ask its cached
verdict, deletions and moves re-read the lease, and so does ``check_owner`` before a commit point (a
checkpoint's or an export's COMPLETE).  ``generation`` is the holder's lease generation, stamped on
those records so that readers can ignore what a stale holder wrote after a takeover.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
from datetime import datetime, timezone
from typing import Any

from moe_train.storage import display, is_local, redact_all, resolve

# What a run leaves in its work dir: any of these means the work dir holds a run.
RUN_FILES = (
    "metrics",
    "metrics.jsonl",
    "summary.json",
    "recipe.json",
    "deepspeed.json",
    "checkpoints",
    "hf_model",
    "hf_adapter",
    "tb",
    "tracking.json",
    "wandb",
)


class RunDir:
    """The work dir of one run: ``fs`` and ``root`` from one ``resolve``, and its paths by name.

    ``fs`` is for a filesystem already in hand (a test's in-memory store); ``url`` is then its root."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, fs: Any = None) -> None:
        self.url = url.rstrip("/") or url
        self.fs, self.root = (fs, self.url) if fs is not None else resolve(url, storage_options)
        self.fence: Any = None  # the lease (rank 0, once taken): check(sync) stops a holder that lost it

    @property
    def generation(self) -> int:
        """The lease generation this process writes under (0 on ranks without the lease)."""
        return getattr(self.fence, "generation", None) or 0

    def check_owner(self, sync: bool = True) -> None:
        """Stop the run (exit 75, one line) unless this job still holds the work dir's lease."""
        if self.fence is not None:
            self.fence.check(sync)

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    @property
    def where(self) -> str:
        """The work dir as a person should see it (credentials redacted)."""
        return display(self.fs, self.root)

    def display(self, path: str) -> str:
        """A path of the run as a person should see it."""
        return display(self.fs, path)

    # ------------------------------------------------------------------ its paths
    @property
    def checkpoints(self) -> str:
        return self._path("checkpoints")

    @property
    def metrics(self) -> str:
        return self._path("metrics")

    @property
    def legacy_metrics(self) -> str:
        return self._path("metrics.jsonl")

    @property
    def tb(self) -> str:
        return self._path("tb")

    @property
    def recipe(self) -> str:
        return self._path("recipe.json")

    @property
    def deepspeed(self) -> str:
        return self._path("deepspeed.json")

    @property
    def summary(self) -> str:
        return self._path("summary.json")

    @property
    def hf_model(self) -> str:
        return self._path("hf_model")

    @property
    def hf_model_url(self) -> str:
        """The export's URL: the HF writer takes a URL (it also writes exports outside any work dir)."""
        return posixpath.join(self.url, "hf_model")

    @property
    def hf_adapter(self) -> str:
        return self._path("hf_adapter")

    @property
    def hf_adapter_url(self) -> str:
        """A LoRA run's PEFT adapter directory."""
        return posixpath.join(self.url, "hf_adapter")

    @property
    def tracking(self) -> str:
        return self._path("tracking.json")

    @property
    def wandb(self) -> str:
        return self._path("wandb")

    def wandb_dir(self) -> str:
        """W&B's run directory: ``wandb/`` here on a file system, else local disk (W&B writes files itself)."""
        if is_local(self.fs):
            return self.wandb
        import tempfile

        return tempfile.mkdtemp(prefix="moe-train-wandb-")

    @property
    def lease(self) -> str:
        return self._path("lease")

    @property
    def data_cache(self) -> str:
        return self._path("data_cache")

    def data_cache_dir(self, explicit: str | None = None) -> str:
        """Where the tokenized data is cached: ``explicit`` (``--data-cache``), else ``data_cache/`` here for a
        work dir on a file system, else local disk (an object cannot be memory-mapped): ``~/.cache/moe-train/data``."""
        if explicit:
            return explicit
        if is_local(self.fs):
            return self.data_cache
        return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moe-train", "data")

    @property
    def previous(self) -> str:
        return self._path("previous")

    # ------------------------------------------------------------------ start-up checks
    def probe(self, name: str) -> str:
        """A hidden start-up probe file, ``.{name}``, which no run keeps."""
        return self._path(f".{name}")

    def check_writable(self) -> None:
        """Fail early, on every rank, if the work dir cannot be written."""
        probe = self.probe(f"write-probe-{socket.gethostname()}-{os.getpid()}")  # never another run's
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(probe, "w") as f:
                f.write("ok")
            self.fs.rm(probe)
        except (OSError, PermissionError) as e:
            raise ValueError(
                f"work dir {self.where} is not writable ({type(e).__name__}: {e}); pass a writable --work-dir"
            ) from None

    def run_files(self) -> list[str]:
        """The files of an earlier run here (see RUN_FILES)."""
        return [name for name in RUN_FILES if self.fs.exists(self._path(name))]

    def move_aside(self, names: list[str]) -> str:
        """Move an earlier run's files into ``previous/{UTC time}/``; returns that directory."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target, n = posixpath.join(self.previous, stamp), 1
        while self.fs.exists(target):
            n += 1
            target = posixpath.join(self.previous, f"{stamp}-{n}")
        self.makedirs(target)
        for name in names:
            self.move(self._path(name), posixpath.join(target, name))
        return target

    # ------------------------------------------------------------------ reading
    def read_json(self, path: str) -> Any:
        """A JSON file of the run, or None when it is not there (yet)."""
        try:
            return json.loads(self.fs.cat_file(path).decode())
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------------ the durable writes
    def open(self, path: str, mode: str, **kwargs: Any) -> Any:
        """A file of the run opened for writing (``fs.open``'s arguments)."""
        self.check_owner(sync=False)
        return self.fs.open(path, mode, **kwargs)

    def put_bytes(self, path: str, data: bytes) -> None:
        """The whole file at once (an object PUT: readers see the old or the new content)."""
        self.check_owner(sync=False)
        self.fs.pipe_file(path, data)

    def put_json(self, path: str, obj: Any, indent: int | None = None) -> None:
        """A JSON record of the run, every string in it redacted (storage.redact): the one way a record is
        written, so no field can carry a credential to disk."""
        with self.open(path, "w") as f:
            json.dump(redact_all(obj), f, indent=indent, default=str)

    def makedirs(self, path: str) -> None:
        self.check_owner(sync=False)
        self.fs.makedirs(path, exist_ok=True)

    def remove(self, path: str, recursive: bool = False) -> None:
        self.check_owner()
        self.fs.rm(path, recursive=recursive)

    def move(self, src: str, dst: str) -> None:
        self.check_owner()
        self.fs.mv(src, dst, recursive=True)

    def write_run_config(self, recipe: dict[str, Any], deepspeed: dict[str, Any]) -> None:
        """The resolved recipe (its `recipe_record`) and DeepSpeed config next to the run, redacted."""
        self.put_json(self.recipe, recipe, indent=2)
        self.put_json(self.deepspeed, deepspeed, indent=2)
