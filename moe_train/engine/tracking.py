"""Experiment trackers (``--report-to mlflow,wandb``): the run's metrics where the team's dashboard is.

Rank 0 hands each metrics record to :class:`Trackers`, which queues it and returns at once; one background
thread delivers the queue to every tracker.  A tracker that is unreachable or slow therefore never stops or
slows a training step: its calls fail or wait in that thread, which warns once, retries with backoff, and
keeps at most :data:`QUEUE_MAX` records (the oldest go first).  At the end of the run the queue gets
:data:`CLOSE_WAIT_S` to drain, and the run says how many records did not reach a tracker.

One tracked run per work dir.  The trackers' run ids are kept in ``tracking.json`` in the work dir (the
caller reads and writes it), so a resumed run continues the same MLflow run and the same W&B run.  Each
segment (a start or a resume) is tagged with its start step and world size, and every point carries
``segment``: after a rollback, steps done again are logged again (MLflow cannot delete metric points, W&B
would drop points at a step it has seen), and ``segment`` tells the branches apart.

What is sent: the metrics the JSONL holds (loss, val_loss, lr, grad_norm, tgs, mfu, tokens, the expert-load
summary: the worst layer's max/mean and coefficient of variation) at the optimiser step, and the recipe as
parameters, redacted by the caller as everything else.  W&B's own system metadata (command line, git state,
code) is switched off: a URL with credentials on the command line would otherwise be recorded.

TensorBoard stays in ``MetricsWriter`` (event files in the work dir); ``tensorboard`` in ``report_to``
switches it on.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

REPORT_TO = ("tensorboard", "mlflow", "wandb")
EXTRAS = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}  # tracker: (module, moe-train extra)
TRACKERS = tuple(EXTRAS)  # what Trackers sends to (tensorboard is MetricsWriter's)
QUEUE_MAX = 100_000
CLOSE_WAIT_S = 30.0
RETRY_MAX_S = 60.0
SCALARS = ("loss", "aux_loss", "val_loss", "lr", "grad_norm", "tgs", "tflops_per_gpu", "mfu", "tokens", "step_time")


def check_report_to(names: list[str] | tuple[str, ...]) -> list[str]:
    """The trackers asked for, each known and installed, or one line naming the fix."""
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ValueError(f"--report-to {','.join(unknown)}: unknown; use any of {', '.join(REPORT_TO)}")
    for name in names:
        if name in EXTRAS:
            try:
                importlib.import_module(EXTRAS[name][0])
            except ImportError:
                extra = EXTRAS[name][1]
                raise ValueError(
                    f"--report-to {name} needs the {name} package: pip install 'moe-train[{extra}]'"
                ) from None
    return list(dict.fromkeys(names))


def flat_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The scalar figures of one metrics record, named as in the JSONL (eval records: ``val_loss``)."""
    out = {k: float(record[k]) for k in SCALARS if isinstance(record.get(k), (int, float))}
    load = record.get("expert_load") or []
    if load:  # the busiest layer: what a collapsing router looks like
        out["expert_load/max_over_mean"] = max(layer["max"] / max(layer["mean"], 1e-9) for layer in load)
        out["expert_load/cv_max"] = max(layer["cv"] for layer in load)
    return out


class _MLflow:
    name = "mlflow"

    def __init__(self, ids: dict[str, Any], params: dict[str, str], segment: dict[str, Any], experiment: str):
        import mlflow
        from mlflow.entities import Param

        # Our thread retries; MLflow's own retries (minutes of backoff per call) would only delay the others.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # our log says where the run is
        self.client = mlflow.MlflowClient()
        self.run_id = ids.get("run_id")
        if self.run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            exp = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(exp, run_name=segment["run_name"]).info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        self.client.set_tag(self.run_id, f"moe_train.segment.{segment['segment']}", _describe(segment))

    def ids(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": _redacted_uri()}

    def log(self, step: int, values: dict[str, float], at: float) -> None:
        from mlflow.entities import Metric

        ms = int(at * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class _WandB:
    name = "wandb"

    def __init__(self, ids: dict[str, Any], params: dict[str, str], segment: dict[str, Any], directory: str):
        import wandb

        os.makedirs(directory, exist_ok=True)
        settings = wandb.Settings(
            x_disable_meta=True,  # no command line (it can hold a URL with credentials), no host facts
            save_code=False,
            disable_git=True,
            silent=True,
            console="off",
        )
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "moe-train"),
            id=ids.get("id"),
            resume="allow",
            name=segment["run_name"],
            dir=directory,
            config=params,
            settings=settings,
        )
        # Our step on the x axis (W&B's own step only grows): a resumed segment may log a step again.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.run.summary[f"moe_train/segment_{segment['segment']}"] = _describe(segment)

    def ids(self) -> dict[str, Any]:
        return {"id": self.run.id, "project": self.run.project}

    def log(self, step: int, values: dict[str, float], at: float) -> None:
        self.run.log({**values, "step": step})

    def close(self, status: str) -> None:
        self.run.finish(exit_code=1 if status == "FAILED" else 0)


def _describe(segment: dict[str, Any]) -> str:
    return f"resumed_from={segment['resumed_from']} world_size={segment['world_size']}"


def _redacted_uri() -> str | None:
    from moe_train.storage import redact

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return redact(uri) if uri else None


class Trackers:
    """Rank 0's trackers behind one queue (see the module docstring)."""

    def __init__(
        self,
        names: list[str],
        params: dict[str, Any],
        segment: dict[str, Any],
        ids: dict[str, Any],
        save_ids: Callable[[dict[str, Any]], None],
        wandb_dir: str,
        log: Callable[[str], None] = print,
    ) -> None:
        self.names = [n for n in names if n in EXTRAS]
        self._params = {k: str(v)[:500] for k, v in params.items()}  # MLflow caps a value at 6000 characters
        self._segment = segment
        self._ids = dict(ids)
        self._save_ids, self._wandb_dir, self._log = save_ids, wandb_dir, log
        # The queue: records[i] has sequence number first + i; each tracker's cursor is the next one it needs.
        self._lock = threading.Lock()
        self._records: list[tuple[int, dict[str, float], float]] = []
        self._first = 0
        self._dropped = 0
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._trackers: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, name="moe-train-trackers", daemon=True)
        if self.names:
            self._thread.start()

    def log(self, record: dict[str, Any]) -> None:
        """Queue one metrics record; never blocks on a tracker."""
        if not self.names or "step" not in record:
            return
        values = flat_metrics(record)
        if not values:
            return
        values["segment"] = float(self._segment["segment"])
        with self._lock:
            self._records.append((int(record["step"]), values, time.time()))
            if len(self._records) > QUEUE_MAX:  # a tracker down for a long time: the oldest records go
                del self._records[0]
                self._first += 1
                self._dropped += 1
        self._wake.set()

    def _start(self, name: str) -> Any:
        ids = self._ids.get(name, {})
        if name == "mlflow":
            tracker = _MLflow(ids, self._params, self._segment, os.environ.get("MLFLOW_EXPERIMENT_NAME", "moe-train"))
        else:
            tracker = _WandB(ids, self._params, self._segment, self._wandb_dir)
        resumed = name in self._ids
        self._ids[name] = tracker.ids()
        self._save_ids(self._ids)
        where = ", ".join(f"{k} {v}" for k, v in self._ids[name].items() if v)
        self._log(f"{name}: {'continuing' if resumed else 'tracking'} run {where}")
        return tracker

    def _deliver(self, name: str, cursor: int) -> int:
        """Start ``name`` if needed and send it what it has not had; returns its new cursor."""
        if name not in self._trackers:
            self._trackers[name] = self._start(name)
        while True:
            with self._lock:
                cursor = max(cursor, self._first)
                if cursor - self._first >= len(self._records):
                    return cursor
                step, values, at = self._records[cursor - self._first]
            self._trackers[name].log(step, values, at)
            cursor += 1

    def _run(self) -> None:
        cursors = dict.fromkeys(self.names, 0)
        retry: dict[str, tuple[float, float]] = {}  # name -> (monotonic time of the next try, backoff)
        given_up: set[str] = set()  # failed once more after the run ended: what is left is reported
        while True:
            self._wake.wait(1.0)
            self._wake.clear()
            closing = self._closing.is_set()
            for name in self.names:
                if name in given_up or (not closing and name in retry and time.monotonic() < retry[name][0]):
                    continue
                try:
                    cursors[name] = self._deliver(name, cursors[name])
                except Exception as e:  # noqa: BLE001 - any tracker error: warn once, back off, keep training
                    if closing:  # the last try at the run's end failed too: no more waiting
                        given_up.add(name)
                    if name not in retry:
                        why = str(e).splitlines()[0][:200] if str(e) else ""
                        self._log(
                            f"{name} is not reachable ({type(e).__name__}: {why}); training goes on, its records "
                            f"are kept (up to {QUEUE_MAX}) and retried"
                        )
                    backoff = min(2 * retry.get(name, (0.0, 0.5))[1], RETRY_MAX_S)
                    retry[name] = (time.monotonic() + backoff, backoff)
                    continue
                if retry.pop(name, None) is not None:
                    self._log(f"{name} is reachable again")
            with self._lock:  # what every tracker has is done with
                done = min(cursors.values()) - self._first
                if done > 0:
                    del self._records[:done]
                    self._first += done
                end = self._first + len(self._records)
            if closing and all(name in given_up or cursors[name] == end for name in self.names):
                return

    def close(self, status: str = "FINISHED", timeout: float = CLOSE_WAIT_S) -> None:
        """Deliver what is queued (within ``timeout``), then end the tracked runs with ``status`` (FINISHED,
        FAILED, or KILLED for a run stopped to be resumed)."""
        if not self.names:
            return
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            left = len(self._records) + self._dropped
        if left:
            self._log(
                f"{left} metrics records did not reach {', '.join(self.names)} (unreachable at the end of the run)"
            )
        if self._thread.is_alive():  # still inside a call to an unreachable tracker: leave it
            return
        for tracker in self._trackers.values():
            try:
                tracker.close(status)
            except Exception as e:  # noqa: BLE001
                self._log(f"{tracker.name}: could not end the tracked run ({type(e).__name__})")
