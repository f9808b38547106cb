"""``torchx run -s kubernetes``, plus what TorchX 0.7.0 cannot say in a pod spec.

TorchX's Kubernetes scheduler gives every pod literal ``env`` values only and an unsized
memory-backed ``/dev/shm``.  This submits the same Volcano Job through TorchX (so ``torchx status``,
``torchx log`` and ``torchx cancel`` work on the handle it prints) after two amendments:

* every container gets the storage credentials as ``envFrom: secretRef`` (the Secret in
  ``storage-secret.yaml``); no credential ever passes through the component's args or env;
* the ``/dev/shm`` emptyDir gets a ``sizeLimit``, by default half the container's memory limit
  (the tmpfs counts against that limit).

Run it from ``components/`` so that ``.torchxconfig`` supplies queue, namespace and service account::

    cd components
    python ../schedulers/kubernetes/submit.py [--dryrun] [--secret moe-train-storage] [--shm-size 256Gi] \\
        components.py:deepseek_v2_full --image REGISTRY/moe-train:TAG --work_dir s3://BUCKET/runs/v2
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kubernetes.client.models import V1EnvFromSource, V1SecretEnvSource
from torchx.runner import config, get_runner
from torchx.specs import AppDryRunInfo

SCHEDULER = "kubernetes"


def amend(job: dict[str, Any], secret: str | None, shm_size: str | None) -> None:
    """Add `secret` as envFrom to every container of the Volcano `job` and size its /dev/shm."""
    for task in job["spec"]["tasks"]:
        pod = task["template"]  # a kubernetes.client V1Pod
        (container,) = pod.spec.containers  # TorchX: one container per pod
        if secret:
            container.env_from = [V1EnvFromSource(secret_ref=V1SecretEnvSource(name=secret))]
        memory = (container.resources.limits or {}).get("memory")
        size = shm_size or (memory and f"{int(memory.removesuffix('M')) // 2}M")  # TorchX writes "<memMB>M"
        for volume in pod.spec.volumes:
            if size and volume.empty_dir is not None and volume.empty_dir.medium == "Memory":
                volume.empty_dir.size_limit = size


def dryrun(
    component: str, component_args: list[str], scheduler_args: str, secret: str | None, shm_size: str | None
) -> tuple[Any, AppDryRunInfo]:
    """The amended request, and the runner to submit it with (a context manager)."""
    runner = get_runner(component_defaults=config.load_sections(prefix="component"))
    cfg = runner.scheduler_run_opts(SCHEDULER).cfg_from_str(scheduler_args)
    config.apply(scheduler=SCHEDULER, cfg=cfg)
    info = runner.dryrun_component(component, component_args, SCHEDULER, cfg=cfg, workspace=None)
    amend(info.request.resource, secret, shm_size)
    return runner, info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dryrun", action="store_true", help="print the Volcano Job instead of submitting it")
    parser.add_argument(
        "--secret",
        default="moe-train-storage",
        help="Secret whose keys become every container's env (empty: none, e.g. with workload identity)",
    )
    parser.add_argument("--shm-size", help="sizeLimit of /dev/shm (e.g. 64Gi); default: half the memory limit")
    parser.add_argument("-cfg", "--scheduler_args", default="", help="kubernetes run options, as for torchx run")
    parser.add_argument("component", help="e.g. components.py:deepseek_v2_full or moe_train.deepseek_v2_full")
    parser.add_argument("component_args", nargs=argparse.REMAINDER, help="the component's own arguments")
    args = parser.parse_args(argv)
    runner, info = dryrun(args.component, args.component_args, args.scheduler_args, args.secret, args.shm_size)
    with runner:
        print(info if args.dryrun else runner.schedule(info))


if __name__ == "__main__":
    main(sys.argv[1:])
