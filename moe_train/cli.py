"""The ``moe-train`` command line: thin click commands that build a dataclass and call the library."""

from __future__ import annotations

import errno
import os
import shutil
import sys

import click

from moe_train.data.formats import parse_columns
from moe_train.engine import errors
from moe_train.engine.distributed import LAUNCHERS
from moe_train.engine.preemption import DEFAULT_GRACE_S
from moe_train.plan.command import plan
from moe_train.recipes import RECIPES, Recipe, dump_recipe, get_recipe, recipe_by_name_or_file
from moe_train.recipes.options import FiniteRange, given, parse_assignment, recipe_options

# The recipe fields `moe-train train` takes as options of their own (type, range and help from the
# field); --cfg-options sets any field.
TRAIN_FIELDS = (
    "deepspeed",
    "model",
    "tokenizer",
    "data",
    "data_format",
    "columns",
    "template",
    "max_length",
    "varlen",
    "sp",
    "ep",
    "hold_experts",
    "moe_implementation",
    "expert_in_one_shard",
    "max_steps",
    "epochs",
    "lr",
    "seed",
    "save_steps",
    "eval_data",
    "eval_fraction",
    "eval_steps",
    "require_fast_kernels",
    "report_to",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
)


class _Group(click.Group):
    def main(self, *args, **kwargs):
        """Under plain torchrun or srun every rank parses the same command line: a usage error is said by
        rank 0 alone (ranks > 0 exit 2 silently)."""
        if errors.rank_from_env() == 0 or kwargs.get("standalone_mode") is False:
            return super().main(*args, **kwargs)
        try:
            return super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.ClickException:
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Fine-tuning of Mixture-of-Experts models (DeepSeek V2/V3, Kimi K2, Moonlight, Qwen3-MoE) with sharded experts
    under DeepSpeed ZeRO-3 and expert parallelism."""


@main.command()
@click.option(
    "--dump",
    metavar="NAME",
    default=None,
    help="Print the built-in recipe NAME as a recipe file to start from: moe-train recipes --dump tiny > my.yaml",
)
def recipes(dump: str | None) -> None:
    """List the shipped recipes, one line each (train your own with `moe-train train FILE.yaml`)."""
    if dump is not None:
        try:
            click.echo(dump_recipe(get_recipe(dump)), nl=False)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--dump") from None
        return
    for name in sorted(RECIPES):
        click.echo(f"{name:48s} {RECIPES[name].description}")


_UNREACHABLE = (
    "botocore.exceptions.ConnectionError",
    "botocore.exceptions.NoCredentialsError",
    "aiohttp.client_exceptions.ClientError",
    "google.auth.exceptions.TransportError",
)
# torch.save on a full disk: the zip writer's messages
_WRITE_FAILED = (
    "file write failed",
    "basic_ios::clear",
    "No space left on device",
    "PytorchStreamWriter",
    "unexpected pos",
)


def _free_bytes(path: str | None) -> int | None:
    """Free space on the local filesystem holding ``path`` (None for URLs and paths not there yet)."""
    while path and "://" not in path:
        try:
            return shutil.disk_usage(path).free
        except OSError:
            path = os.path.dirname(path.rstrip("/")) if path not in ("/", "") else None
    return None


def expected_failure(e: BaseException, work_dir: str | None = None) -> str | None:
    """The one line for a failure the user can fix (bad input, full disk, unreachable store); None for a bug."""
    first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    free = _free_bytes(work_dir)
    if free is not None and free < 2**20 and isinstance(e, (OSError, RuntimeError)):
        return (
            f"no space left in the work dir {work_dir} ({free} bytes free; {first}); free space or pass a "
            "--work-dir on a filesystem with room"
        )
    names = {f"{c.__module__}.{c.__name__}" for c in type(e).__mro__}
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {e.filename}" if e.filename else ""
        return f"no space left{where}; free space or pass a --work-dir on a filesystem with room"
    if names & set(_UNREACHABLE) or isinstance(e, (ConnectionError, TimeoutError)):
        return (
            f"cannot reach the store: {first} ({type(e).__name__}); check the endpoint "
            "(FSSPEC_S3_ENDPOINT_URL, AWS_ENDPOINT_URL), the network and the credentials"
        )
    if isinstance(e, RuntimeError) and any(s in str(e) for s in _WRITE_FAILED):
        return f"a write failed ({first}); the disk is probably full: free space or pass a --work-dir with room"
    if "deepspeed.runtime.zero.utils.ZeRORuntimeException" in names and "world size" in first:
        return (
            f"{first.split('. ')[0]}: resume with as many ranks as saved the checkpoint (a ZeRO checkpoint "
            "cannot be repartitioned yet), or start afresh in a new --work-dir"
        )
    if isinstance(e, RecursionError):
        return "an input is nested too deeply to read (JSON nested hundreds of levels?); flatten it"
    if isinstance(e, (ValueError, OSError, UnicodeError)):  # ours say what to fix; the system's say what failed
        ours = isinstance(e, (ValueError, FileNotFoundError, PermissionError))
        return first if ours else f"{first} ({type(e).__name__})"
    return None


@main.command()
@click.argument("recipe_name", metavar="RECIPE")
@recipe_options(TRAIN_FIELDS)
@click.option(
    "--launcher",
    type=click.Choice(LAUNCHERS),
    default="none",
    show_default=True,
    help="How processes were started: none (one process), pytorch (torchrun's environment; with "
    "NPROC_PER_NODE set and no torchrun around it, this command starts torchrun itself: NNODES, NODE_RANK, "
    "ADDR, PORT as in XTuner), slurm (plain srun, one task per GPU).",
)
@click.option(
    "--work-dir",
    default=None,
    help="Local path or fsspec URL for checkpoints, metrics and the HF export. Default: work_dirs/RECIPE.",
)
@click.option(
    "--data-cache",
    default=None,
    metavar="DIR",
    help="Local directory for the tokenized data (default: WORK_DIR/data_cache; ~/.cache/moe-train/data for a "
    "work dir on an object store). Node-local storage: each node tokenizes once; shared: rank 0 does.",
)
@click.option(
    "--resume", default=None, help="'auto' (newest complete checkpoint in the work dir, if any) or a checkpoint URL."
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start afresh in a work dir that holds an earlier run, moving that "
    "run's files aside into WORK_DIR/previous/TIME/ (nothing is deleted).",
)
@click.option(
    "--peak-tflops",
    type=FiniteRange(min=0, min_open=True),
    default=None,
    help="Peak TFLOP/s of one device for MFU (default: from the device table; unknown on CPU).",
)
@click.option(
    "--cfg-options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any recipe field, e.g. grad_accum=4 or betas='(0.9,0.95)'. Repeatable.",
)
@click.option("--no-export", is_flag=True, help="Skip the HF export at the end.")
@click.option(
    "--merge",
    is_flag=True,
    help="With --lora-rank: besides the PEFT adapter (WORK_DIR/hf_adapter), export the base with the adapters "
    "merged in as a full HF checkpoint (WORK_DIR/hf_model).",
)
@click.option(
    "--allow-batch-change",
    is_flag=True,
    help="On resume, accept a global batch (data-parallel ranks x "
    "grad_accum x micro batch, in packs) other than the checkpoint's; by default grad_accum is adjusted "
    "to keep it, or the resume is refused.",
)
@click.option(
    "--preempt-grace",
    type=FiniteRange(min=0, min_open=True),
    default=DEFAULT_GRACE_S,
    show_default=True,
    metavar="SECONDS",
    help="Time the scheduler allows between SIGTERM/SIGUSR1 and SIGKILL (Slurm KillWait or GraceTime, "
    "Kubernetes terminationGracePeriodSeconds, torchrun --shutdown-timeout): on a stop signal the "
    "current step and a checkpoint must fit in it, and the log says when they do not. A second "
    "identical signal exits at once.",
)
@click.option(
    "--debug",
    is_flag=True,
    help="Print the traceback under the one-line Error: of an expected failure "
    "(bad input, full disk, unreachable store).",
)
def train(
    recipe_name: str,
    launcher,
    work_dir,
    data_cache,
    resume,
    overwrite,
    peak_tflops,
    cfg_options,
    no_export,
    merge,
    allow_batch_change,
    preempt_grace,
    debug,
    **fields,
) -> None:
    """Fine-tune RECIPE: a built-in (see `moe-train recipes`) or a recipe file (.yaml, a path or URL)."""
    recipe = train_recipe(recipe_name, fields, cfg_options)
    if launcher == "pytorch" and os.environ.get("NPROC_PER_NODE") and "LOCAL_RANK" not in os.environ:
        _launch_env_form(debug)

    from moe_train.engine.distributed import destroy_distributed, hard_exit
    from moe_train.engine.preemption import EXIT_PREEMPTED, StopRequested
    from moe_train.engine.setup import TrainConfig
    from moe_train.engine.train import train as run
    from moe_train.storage import redact

    tc = TrainConfig(
        recipe=recipe,
        work_dir=work_dir or f"work_dirs/{recipe.name}",
        launcher=launcher,
        resume=resume,
        peak_tflops=peak_tflops,
        export=not no_export,
        merge=merge,
        preempt_grace=preempt_grace,
        overwrite=overwrite,
        allow_batch_change=allow_batch_change,
        data_cache=data_cache,
    )
    code = 0
    try:
        run(tc)
        destroy_distributed()
    except StopRequested as e:
        errors.report_stop(redact(str(e)))
        code = EXIT_PREEMPTED
    except Exception as e:
        line = expected_failure(e, tc.work_dir)
        errors.report(None if line is None else redact(line), e, debug)
        if line is None and not errors.under_our_launcher():
            raise  # a bug: its traceback is the report (our launchers point at the error file instead)
        code = 1
    # Skip interpreter shutdown: on gloo it can abort (SIGABRT) after all work is done.
    hard_exit(code)


def train_recipe(recipe_name: str, fields: dict, cfg_options: tuple[str, ...]) -> Recipe:
    """The recipe `moe-train train` runs: RECIPE, then its options, then ``--cfg-options``; every value
    checked (click, `parse_assignment`, the recipe itself) before any process starts."""
    try:
        recipe = recipe_by_name_or_file(recipe_name)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="RECIPE") from None
    overrides = given(fields, TRAIN_FIELDS)
    if "model" in overrides:
        overrides["model_size"] = None
        overrides.setdefault("tokenizer", None)  # a model brings its own tokenizer unless --tokenizer says otherwise
    if "columns" in overrides:  # names checked here, before any process starts
        try:
            overrides["columns"] = parse_columns(overrides["columns"])
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--columns") from None
    overrides.update(parse_assignment(item) for item in cfg_options)
    try:
        return recipe.replace(**overrides)
    except ValueError as e:  # e.g. an empty --data, which click's types let through
        raise click.UsageError(str(e)) from None


def _launch_env_form(debug: bool) -> None:
    """The seed's env form: NPROC_PER_NODE (NNODES, NODE_RANK, ADDR, PORT) set and no torchrun around us:
    this process becomes the launcher of this very command (moe_train/engine/torchrun.py)."""
    from moe_train.engine.torchrun import env_form_args, launch

    try:
        argv = env_form_args(os.environ, sys.argv[1:])
    except ValueError as e:
        raise click.UsageError(f"{e} (the env form of --launcher pytorch)") from None
    fix = (
        "start every node with the same NNODES, ADDR and PORT (node 0's address and a free port there), "
        "node 0 included, and check that the other nodes reach ADDR:PORT"
    )
    sys.exit(launch(argv, rendezvous_fix=fix))


@main.command()
@click.argument("work_dir")
@click.option(
    "--out",
    default=None,
    help="Local directory for the PNGs and report.md. Default: "
    "report-<work dir name> in the current directory (the work dir is only read).",
)
def report(work_dir: str, out: str | None) -> None:
    """Plots (loss, lr, grad norm, throughput, expert load) and report.md of the run in WORK_DIR."""
    from moe_train.report import report as write_report
    from moe_train.storage import redact

    out = out or f"report-{work_dir.rstrip('/').rsplit('/', 1)[-1] or 'run'}"
    try:
        paths = write_report(work_dir, out)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    click.echo(f"report of {redact(work_dir)}: {paths['report']} ({len(paths) - 1} figures)")


@main.command("export")
@click.argument("checkpoint_url")
@click.argument("out_url")
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16"]),
    default=None,
    help="Weights' dtype in the export. Default: what the run's own export writes (its training dtype).",
)
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors file, e.g. 5GB, 500MB.")
def export_command(checkpoint_url: str, out_url: str, dtype: str | None, max_shard_size: str) -> None:
    """Write a complete training checkpoint (local path or URL) to OUT_URL in the HF layout.

    One process, streamed (one HF tensor in memory at a time), whatever world size wrote it."""
    from moe_train.checkpoint.export import export_checkpoint
    from moe_train.storage import redact

    try:
        export_checkpoint(checkpoint_url, out_url, dtype=dtype, max_shard_size=max_shard_size, log=click.echo)
    except Exception as e:
        line = expected_failure(e)  # bad input, a full disk, an unreachable store; None for a bug
        if line is None:
            raise
        click.echo(f"Error: {redact(line)}", err=True)
        sys.exit(1)


main.add_command(plan)

if __name__ == "__main__":
    main()
