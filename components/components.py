"""TorchX catalogue: launch ``moe-train train`` on Slurm, Kubernetes (Volcano) or this machine.

Each component is one role of N replicas, one per node; each replica runs one ``torchrun`` that
starts P trainer processes and meets the other nodes at a c10d rendezvous hosted by replica 0::

    cd components   # .torchxconfig here holds the per-scheduler defaults
    torchx run -s slurm components.py:deepseek_v2_full --work_dir /shared/runs/v2-alpaca \\
        --model /shared/DeepSeek-V2-Chat --data /shared/alpaca_data.json
    torchx run -s kubernetes components.py:deepseek_v2_full --image REGISTRY/moe-train:TAG \\
        --work_dir s3://BUCKET/runs/v2-alpaca --model hf://deepseek-ai/DeepSeek-V2-Chat --data s3://BUCKET/alpaca.jsonl
    torchx run -s local_cwd components.py:smoke --work_dir /tmp/smoke

Installed with moe-train, the same functions are listed by ``torchx builtins`` as
``moe_train.deepseek_v2_full`` and so on.  This file imports nothing but TorchX (and TorchX runs it
with ``exec``), so the launch host needs neither moe-train nor torch.
"""

import functools
import inspect
import os
import re
import shlex
import socket
from typing import Dict, List, Optional, Tuple

import torchx.specs as specs
from torchx.components.dist import parse_nnodes
from torchx.specs import macros

GiB = 1024  # memMB per GiB

# What one pod/job may ask of an 8-GPU host, below the machine's total so that the kubelet's and
# the daemonsets' reservations still fit (TorchX's Kubernetes scheduler takes off 0.1 CPU and 1 GiB
# more).  A100: fits p4de.24xlarge (96 vCPU, 1152 GiB), a2-ultragpu-8g and DGX A100.
# H100: fits p5.48xlarge (192 vCPU, 2048 GiB), a3-highgpu-8g (208 vCPU, 1872 GB) and DGX H100.
_HOSTS = {
    "a100_80g_x8": dict(cpu=92, gpu=8, memMB=1000 * GiB, product="NVIDIA-A100-SXM4-80GB"),
    "h100_80g_x8": dict(cpu=184, gpu=8, memMB=1600 * GiB, product="NVIDIA-H100-80GB-HBM3"),
}
_DEFAULT_HOST = _HOSTS["a100_80g_x8"]
_DEFAULT_IMAGE = "moe-train:latest"
_RDZV_PORT = 29500

# Credentials reach the job from the scheduler (Slurm: the submitting shell's environment, which
# sbatch exports; Kubernetes: the Secret in schedulers/kubernetes), never through the AppDef, whose
# env and args end up in sbatch scripts, pod specs and logs.
# Names: AWS_SECRET_ACCESS_KEY, HF_TOKEN, AZURE_STORAGE_ACCOUNT_KEY, WANDB_API_KEY, anything ending in KEY.
_CREDENTIAL_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE_KEY|KEY$", re.I)
# scheme://user-info@ anywhere in a value (HTTPS_PROXY=http://u:pw@proxy, --data=https://TOKEN@host/x):
# a token alone, user:password, and passwords with '/' in them.
_CREDENTIAL_URL = re.compile(r"(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://(?:[^@/?#\s]*:[^@\s]*|[^@/?#:\s]+)@", re.I)
# A signed URL's query (AWS X-Amz-Signature/-Credential/-Security-Token, GCS X-Goog-Signature, Azure SAS sig=,
# token=, key=), and a secret-like key given a value inside a value: JSON (FSSPEC_S3={"key": .., "secret": ..}),
# a Python dict or key=value text.  The same names as moe_train/storage.py's redaction.
_CREDENTIAL_QUERY = re.compile(
    r"[?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential|sig|"
    r"signature|token|access_token|key|secret|password)=[^&\s]",
    re.I,
)
_CREDENTIAL_KEY = re.compile(
    r"""(?<![\w-])(?:[\w-]*[_-])?(?:secret|token|password|passwd|credentials?|signature|sig|key|apikey)(?![\w-])"""
    r"""["']?[:=]\s*["']?[^\s"',}&]""",
    re.I,
)
_CREDENTIAL_FORMS = [
    (_CREDENTIAL_URL, "a URL with user-info"),
    (_CREDENTIAL_QUERY, "a signed URL's query"),
    (_CREDENTIAL_KEY, "a secret-like key with a value"),
]


def _host(name: str) -> specs.Resource:
    h = _HOSTS[name]
    return specs.Resource(
        cpu=h["cpu"],
        gpu=h["gpu"],
        memMB=h["memMB"],
        capabilities={"nvidia.com/gpu.product": h["product"]},  # the GPU feature discovery label
    )


def a100_80g_x8() -> specs.Resource:
    """A host with 8 x A100-SXM4-80GB (named resource ``a100_80g_x8``)."""
    return _host("a100_80g_x8")


def h100_80g_x8() -> specs.Resource:
    """A host with 8 x H100-80GB-HBM3 (named resource ``h100_80g_x8``)."""
    return _host("h100_80g_x8")


def _parse_j(j: str) -> Tuple[int, int, int]:
    """``NxP``, ``MIN:MAXxP`` or ``P`` -> (min_nodes, max_nodes, procs_per_node), as torchx's dist.ddp reads -j."""
    try:
        min_nodes, max_nodes, nproc, _ = parse_nnodes(j)
    except ValueError:
        raise ValueError(f"-j {j!r}: expected NODESxPROCS (e.g. 8x8) or MIN:MAXxPROCS (e.g. 4:8x8)") from None
    if not 1 <= min_nodes <= max_nodes or nproc < 1:
        raise ValueError(f"-j {j!r}: need 1 <= MIN <= MAX nodes and at least one process per node")
    return min_nodes, max_nodes, nproc


def _check_no_credentials(env: Dict[str, str], args: List[str]) -> None:
    """Refuse secrets in the job spec: by variable name, and in any env value or trainer argument: URL
    user-info, a signed URL's query, a secret-like key inside JSON or key=value text (never echoing them)."""
    leaked = [k for k in env if _CREDENTIAL_NAME.search(k)]
    for pattern, form in _CREDENTIAL_FORMS:
        leaked += [f"{k} ({form})" for k, v in env.items() if k not in leaked and pattern.search(v)]
        leaked += [f"{form} in the trainer arguments" for a in args if pattern.search(a)][:1]
    if leaked:
        raise ValueError(
            f"{', '.join(leaked)}: credentials must not go into --env or URLs, which are written into the "
            "job spec; on Slurm export them in the submitting shell (sbatch passes its environment on), "
            "on Kubernetes put them in the moe-train-storage Secret (schedulers/kubernetes/README.md)"
        )


# BEGIN recipe facts: generated from the built-in recipes by `python -m moe_train.recipes`; a test keeps it current.
_RECIPE_FACTS: Dict[str, Dict[str, object]] = {
    "deepseek_v2_chat_full_alpaca_e3": {
        "model": "hf://deepseek-ai/DeepSeek-V2-Chat",
        "data": ["hf://datasets/tatsu-lab/alpaca"],
    },
    "deepseek_v2_chat_full_alpaca_e3_32k_varlen": {
        "model": "hf://deepseek-ai/DeepSeek-V2-Chat",
        "data": ["hf://datasets/tatsu-lab/alpaca"],
    },
    "deepseek_v2_chat_full_alpaca_e3_64xa100": {
        "model": "hf://deepseek-ai/DeepSeek-V2-Chat",
        "data": ["hf://datasets/tatsu-lab/alpaca"],
    },
    "deepseek_v2_chat_lora_alpaca_e3": {
        "model": "hf://deepseek-ai/DeepSeek-V2-Chat",
        "data": ["hf://datasets/tatsu-lab/alpaca"],
    },
    "deepseek_v2_lite_chat_full_alpaca_e3": {
        "model": "hf://deepseek-ai/DeepSeek-V2-Lite-Chat",
        "data": ["hf://datasets/tatsu-lab/alpaca"],
    },
    "deepseek_v2_lite_chat_lora_alpaca_e3": {
        "model": "hf://deepseek-ai/DeepSeek-V2-Lite-Chat",
        "data": ["hf://datasets/tatsu-lab/alpaca"],
    },
    "deepseek_v3_full_alpaca_e3": {
        "model": "hf://deepseek-ai/DeepSeek-V3",
        "data": ["hf://datasets/tatsu-lab/alpaca"],
    },
    "deepseek_v3_full_alpaca_e3_256xa100": {
        "model": "hf://deepseek-ai/DeepSeek-V3",
        "data": ["hf://datasets/tatsu-lab/alpaca"],
    },
    "moonlight_16b_full_alpaca_e3": {
        "model": "hf://moonshotai/Moonlight-16B-A3B-Instruct",
        "data": ["hf://datasets/tatsu-lab/alpaca"],
    },
    "qwen3_235b_a22b_full_alpaca": {
        "model": "hf://Qwen/Qwen3-235B-A22B",
        "data": ["hf://datasets/tatsu-lab/alpaca"],
    },
    "qwen3_30b_a3b_full_alpaca": {
        "model": "hf://Qwen/Qwen3-30B-A3B",
        "data": ["hf://datasets/tatsu-lab/alpaca"],
    },
    "qwen3_30b_a3b_lora_alpaca": {
        "model": "hf://Qwen/Qwen3-30B-A3B",
        "data": ["hf://datasets/tatsu-lab/alpaca"],
    },
}
# END recipe facts

# component parameters passed on as `moe-train train --kebab-case VALUE` when set
_TRAINER_OPTIONS = [
    "work_dir",
    "model",
    "max_length",
    "sp",
    "ep",
    "moe_implementation",
    "expert_in_one_shard",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "resume",
]


def _trainer_cmd(p: Dict[str, object], trainer_args: List[str]) -> List[str]:
    """``moe-train train ...`` for one rank from the component's parameters; None keeps the recipe's value."""
    cmd = ["moe-train", "train", p["recipe"], "--launcher", "pytorch"]
    if p["deepspeed"]:  # else the recipe's own DeepSpeed config
        cmd += ["--deepspeed", p["deepspeed"]]
    for name in _TRAINER_OPTIONS:
        if p[name] is not None and p[name] != "":
            cmd += ["--" + name.replace("_", "-"), str(p[name])]
    for path in p["data"] or []:
        cmd += ["--data", path]
    if p["report_to"]:
        cmd += ["--report-to", ",".join(p["report_to"])]
    if p["lora_targets"]:
        cmd += ["--lora-targets", ",".join(p["lora_targets"])]
    for flag in ("varlen", "hold_experts"):  # booleans: None keeps the recipe's
        if p[flag] is not None:
            cmd.append(("--" if p[flag] else "--no-") + flag.replace("_", "-"))
    return cmd + trainer_args


def _torchrun_app(
    name: str,
    j: str,
    image: str,
    trainer: List[str],
    resource: specs.Resource,
    env: Dict[str, str],
    mounts: List[str],
    max_retries: int,
    rdzv_port: int,
) -> specs.AppDef:
    """One role, one replica per node, each ``torchrun ... --no-python <trainer>``."""
    min_nodes, max_nodes, nproc = _parse_j(j)
    if resource.gpu > 0 and nproc > resource.gpu:
        raise ValueError(f"-j {j}: {nproc} processes per node but the host has {resource.gpu} GPUs")
    if max_nodes == 1:
        # one agent: any free port on this host
        endpoint, is_host = "localhost:0", "1"
    else:
        # rank0_env is the scheduler's variable holding replica 0's host.  Replica 0 hosts the
        # rendezvous store, said explicitly rather than guessed from hostnames (which fails when
        # several "nodes" share a host, as on the Slurm dev cluster or local_cwd).
        endpoint = f"${{{macros.rank0_env}:=localhost}}:{rdzv_port}"
        is_host = f"$(({macros.replica_id} == 0))"
    nnodes = f"{min_nodes}:{max_nodes}" if min_nodes != max_nodes else str(max_nodes)
    # Elastic: when a node is lost, the agents left restart their ranks in a new rendezvous round, which
    # resume on the smaller world (--resume auto).  Without restarts they would just exit.
    restarts = f"--max-restarts {max_nodes - min_nodes} " if min_nodes != max_nodes else ""
    # Unquoted on purpose: macros are filled in by the scheduler, the $ expressions by bash on the node.
    rdzv = f"--rdzv-backend c10d --rdzv-id {macros.app_id} --rdzv-endpoint {endpoint} --rdzv-conf is_host={is_host}"
    # SIGUSR1 too (`sbatch --signal=USR1@120`): torchrun forwards it to the ranks, which save and exit.
    signals = "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    # moe-train-torchrun is torchrun, except that a failure ends with one Error: line and no traceback, and
    # on the node hosting the rendezvous store the store stays up until every agent has closed the
    # rendezvous (see moe_train/engine/torchrun.py).
    command = (
        f"moe-train-torchrun --nnodes {nnodes} --nproc-per-node {nproc} {restarts}{rdzv} {signals} --tee 3 "
        f"--no-python {shlex.join(trainer)}"
    )
    return specs.AppDef(
        name=name,
        roles=[
            specs.Role(
                name="trainer",
                image=image,
                entrypoint="bash",
                args=["-c", command],
                num_replicas=max_nodes,
                min_replicas=min_nodes,
                resource=resource,
                env=env,
                port_map={"c10d": rdzv_port},
                max_retries=max_retries,
                mounts=specs.parse_mounts(mounts),
            )
        ],
    )


class ComponentError(SystemExit, ValueError):
    """A bad parameter: ``torchx run`` ends with this one line and exit status 1 (a SystemExit, so no
    traceback); callers of the function can catch it as a ValueError."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"Error: {name}: {problem}")


def _fill_inputs(name: str, p: Dict[str, object]) -> None:
    """The recipe's model and data when not given (shown in the job spec), and a work dir (and recipe file)
    that outlive the job: a relative or default one becomes absolute under the submission directory, which is
    the shared file system on a Slurm cluster (as XTuner's ``work_dirs/``).  In a Kubernetes pod such a path is on the
    container's own file system, and the trainer refuses it at start, before any step
    (moe_train/engine/work_dir.py)."""
    facts = _RECIPE_FACTS.get(str(p["recipe"]))
    if facts is not None:
        p["model"] = p["model"] or facts["model"]
        p["data"] = p["data"] or facts["data"] or None
        missing = [f"--{k}" for k in ("model", "data") if not p[k]]
        if missing:
            examples = {"--model": "--model /shared/DeepSeek-V2-Chat", "--data": "--data s3://BUCKET/alpaca.jsonl"}
            raise ComponentError(
                name,
                f"recipe {p['recipe']} names no {' and no '.join(m[2:] for m in missing)}; pass "
                f"{' and '.join(examples[m] for m in missing)} (a path every node reads, or a URL)",
            )
    recipe = str(p["recipe"])
    if recipe.endswith((".yaml", ".yml")) and not _is_url(recipe):  # a recipe file: where the nodes read it
        p["recipe"] = os.path.abspath(recipe)
    work_dir = str(p["work_dir"] or "")
    if not _is_url(work_dir):
        name = os.path.splitext(os.path.basename(recipe))[0]
        p["work_dir"] = os.path.abspath(work_dir or os.path.join("work_dirs", name))


def _is_url(path: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*://", path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _component(name: str, base_env: Dict[str, str], *, trainer_args: Tuple[str, ...], **p) -> specs.AppDef:
    """The AppDef of a catalogue entry from its parameters (see `train`).

    TorchX lists every function of this module whose signature its linter accepts; it rejects
    Tuple (here) and specs.Resource (in _torchrun_app), which keeps these helpers out of `torchx builtins`.
    """
    if not p["rdzv_port"]:
        p["rdzv_port"] = _free_port()  # local_cwd: every replica on this host, next to other jobs
    try:
        _fill_inputs(name, p)
        env = {**base_env, **(p["env"] or {})}
        trainer = _trainer_cmd(p, list(trainer_args))
        _check_no_credentials(env, trainer)  # every trainer argument: --work-dir, --data, --resume, those after --
        resource = specs.resource(cpu=p["cpu"], gpu=p["gpu"], memMB=p["memMB"], h=p["h"])
        return _torchrun_app(
            name, p["j"], p["image"], trainer, resource, env, p["mounts"] or [], p["max_retries"], p["rdzv_port"]
        )
    except ComponentError:
        raise
    except (ValueError, KeyError) as e:  # ours, and TorchX's for a bad named resource or mount
        raise ComponentError(name, str(e).strip("'\"")) from None


def train(
    *trainer_args: str,
    recipe: str,
    j: str = "1x8",
    image: str = _DEFAULT_IMAGE,
    deepspeed: Optional[str] = None,
    work_dir: Optional[str] = None,
    model: Optional[str] = None,
    data: Optional[List[str]] = None,
    max_length: Optional[int] = None,
    varlen: Optional[bool] = None,
    sp: Optional[int] = None,
    ep: Optional[int] = None,
    hold_experts: Optional[bool] = None,
    moe_implementation: Optional[str] = None,
    expert_in_one_shard: Optional[int] = None,
    report_to: Optional[List[str]] = None,
    lora_rank: Optional[int] = None,
    lora_alpha: Optional[float] = None,
    lora_dropout: Optional[float] = None,
    lora_targets: Optional[List[str]] = None,
    resume: Optional[str] = "auto",
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    h: Optional[str] = None,
    cpu: int = _DEFAULT_HOST["cpu"],
    gpu: int = _DEFAULT_HOST["gpu"],
    memMB: int = _DEFAULT_HOST["memMB"],
    rdzv_port: int = _RDZV_PORT,
) -> specs.AppDef:
    """Fine-tune any recipe, a built-in or your own file, under DeepSpeed ZeRO-3: 1 node x 8 GPUs by default.

    Args:
        trainer_args: extra ``moe-train train`` options, after ``--`` (e.g. -- --lr 2e-5 --max-steps 100)
        recipe: a built-in recipe (``moe-train recipes`` lists them) or a recipe file (.yaml) the nodes read: a
            path on the shared file system (Slurm; made absolute) or a URL (s3://BUCKET/recipes/NAME.yaml)
        j: NODESxPROCS, or MIN:MAXxPROCS for an elastic job; PROCS must not exceed the host's GPUs
        image: container image (Kubernetes); Slurm and local_cwd run the current environment
        deepspeed: DeepSpeed config: a shipped name (deepspeed_zero2, deepspeed_zero3, deepspeed_zero3_offload)
            or a JSON path, instead of the recipe's
        work_dir: checkpoints and logs, a path or fsspec URL that every node reaches (shared FS, s3://, gs://)
        model: HF checkpoint directory or fsspec URL (hf://ORG/NAME reads the Hugging Face Hub in ranges),
            instead of the recipe's
        data: training data: a file, directory, glob or URL of JSON, JSONL, Parquet, CSV or Arrow, or a Hub
            dataset hf://datasets/ORG/NAME[@REV][?subset=NAME&split=NAME] (comma separated), instead of the
            recipe's
        max_length: tokens per packed sequence, instead of the recipe's
        varlen: attend only within each packed sample, or across the whole pack (XTuner's classic packing),
            instead of the recipe's
        sp: sequence-parallel degree (must divide the world size), instead of the recipe's
        ep: expert-parallel degree: each group of N consecutive ranks splits the routed experts and exchanges
            tokens (must divide the world size and the expert count; ZeRO-3), instead of the recipe's
        hold_experts: with --ep: keep each rank's routed experts gathered from their layer's forward to the
            optimizer step, one all-gather per layer and step instead of two per layer and micro step; costs their
            full weights in memory
            (moe-train plan says whether they fit), instead of the recipe's
        moe_implementation: routed experts stacked in shards, or one module per expert (the HF layout, a
            baseline), instead of the recipe's
        expert_in_one_shard: experts per shard; must divide the routed expert count, instead of the recipe's
        report_to: where the metrics go besides the work dir's JSONL: any of tensorboard, mlflow, wandb (comma
            separated), instead of the recipe's
        lora_rank: LoRA rank: train only low-rank adapters on a frozen base (no fp32 master, no optimizer state
            for it); 0: full fine-tuning, instead of the recipe's
        lora_alpha: LoRA alpha: the adapters' update is scaled by alpha / rank, instead of the recipe's
        lora_dropout: dropout on the input of the attention, dense and shared-expert adapters, instead of the
            recipe's
        lora_targets: what gets adapters: any of attention, dense, shared_experts, experts (comma separated); the
            router stays frozen, instead of the recipe's
        resume: auto (continue from the latest checkpoint in work_dir, so a retried job resumes), a URL, or empty
        env: environment variables (A=1,B=2), on top of the component's own (smoke: DS_ACCELERATOR=cpu); never
            credentials
        mounts: mounts, e.g. type=volume,src=moe-train-checkpoints,dst=/checkpoints (Kubernetes PVC)
        max_retries: times the scheduler restarts the whole job after a failure (Slurm: requeue)
        h: named resource for each node (a100_80g_x8, h100_80g_x8, ...); overrides cpu, gpu, memMB
        cpu: CPUs per node
        gpu: GPUs per node (0: a CPU run)
        memMB: host memory per node in MB
        rdzv_port: port on replica 0's host for the c10d rendezvous (0: a free port of the submitting host, for
            local_cwd)
    """
    return _component("moe-train", {}, **locals())


def _preset(**defaults: object):
    """A catalogue entry: the `train` component under another name, with other defaults.

    TorchX checks a component's parameters in this file's source and builds its options from the
    function's signature; an entry is a literal function whose signature is set here to `train`'s with
    these defaults, and its help to its own line followed by `train`'s Args.  The parameters are declared
    once, in `train`."""
    signature = inspect.signature(train)
    signature = signature.replace(
        parameters=[p.replace(default=defaults.get(p.name, p.default)) for p in signature.parameters.values()]
    )
    doc = inspect.getdoc(train)

    def entry_of(body):
        @functools.wraps(body)
        def entry(*trainer_args: str, **params: object) -> specs.AppDef:
            bound = signature.bind(*trainer_args, **params)
            bound.apply_defaults()
            return body(*bound.args, **bound.kwargs)

        entry.__signature__ = signature
        entry.__doc__ = f"{inspect.getdoc(body)}\n\n{doc[doc.index('Args:') :]}"
        return entry

    return entry_of


@_preset(j="8x8", recipe="deepseek_v2_chat_full_alpaca_e3")
def deepseek_v2_full(*trainer_args: str, **params: object) -> specs.AppDef:
    """Full fine-tune of DeepSeek-V2 (236B) with sharded experts under DeepSpeed ZeRO-3: 8 nodes x 8 GPUs."""
    return _component("deepseek-v2-full", {}, trainer_args=trainer_args, **params)


@_preset(recipe="deepseek_v2_lite_chat_full_alpaca_e3")
def deepseek_v2_lite_full(*trainer_args: str, **params: object) -> specs.AppDef:
    """Full fine-tune of DeepSeek-V2-Lite (16B) under DeepSpeed ZeRO-3: 1 node x 8 GPUs."""
    return _component("deepseek-v2-lite-full", {}, trainer_args=trainer_args, **params)


@_preset(j="32x8", recipe="deepseek_v3_full_alpaca_e3")
def deepseek_v3_full(*trainer_args: str, **params: object) -> specs.AppDef:
    """Full fine-tune of DeepSeek-V3 (671B; also R1/V3.1 via model) under DeepSpeed ZeRO-3: 32 nodes x 8 GPUs."""
    return _component("deepseek-v3-full", {}, trainer_args=trainer_args, **params)


@_preset(recipe="moonlight_16b_full_alpaca_e3")
def moonlight_full(*trainer_args: str, **params: object) -> specs.AppDef:
    """Full fine-tune of Moonlight-16B-A3B (DeepSeek V3 architecture) under DeepSpeed ZeRO-3: 1 node x 8 GPUs."""
    return _component("moonlight-full", {}, trainer_args=trainer_args, **params)


@_preset(recipe="qwen3_30b_a3b_full_alpaca")
def qwen3_30b_a3b_full(*trainer_args: str, **params: object) -> specs.AppDef:
    """Full fine-tune of Qwen3-30B-A3B under DeepSpeed ZeRO-3: 1 node x 8 GPUs."""
    return _component("qwen3-30b-a3b-full", {}, trainer_args=trainer_args, **params)


@_preset(j="8x8", recipe="qwen3_235b_a22b_full_alpaca")
def qwen3_235b_a22b_full(*trainer_args: str, **params: object) -> specs.AppDef:
    """Full fine-tune of Qwen3-235B-A22B under DeepSpeed ZeRO-3 with the recipe's EP 8: 8 nodes x 8 GPUs."""
    return _component("qwen3-235b-a22b-full", {}, trainer_args=trainer_args, **params)


@_preset(j="8x8", recipe="deepseek_v2_chat_full_alpaca_e3_64xa100")
def deepseek_v2_full_64xa100(*trainer_args: str, **params: object) -> specs.AppDef:
    """The seed's DeepSeek-V2 (236B) training run planned for 8 nodes x 8 A100-80G: expert parallel 16."""
    return _component("deepseek-v2-full-64xa100", {}, trainer_args=trainer_args, **params)


@_preset(j="32x8", recipe="deepseek_v3_full_alpaca_e3_256xa100")
def deepseek_v3_full_256xa100(*trainer_args: str, **params: object) -> specs.AppDef:
    """The DeepSeek-V3 (671B) training run planned for 32 nodes x 8 A100-80G: expert parallel 8."""
    return _component("deepseek-v3-full-256xa100", {}, trainer_args=trainer_args, **params)


@_preset(j="2x1", recipe="tiny", cpu=1, gpu=0, memMB=4 * GiB, rdzv_port=0)
def smoke(*trainer_args: str, **params: object) -> specs.AppDef:
    """CPU smoke run of the tiny recipe on 2 nodes x 1 process; writes an HF checkpoint to {work_dir}/hf_model."""
    cpu_only = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return _component("moe-train-smoke", cpu_only, trainer_args=trainer_args, **params)
