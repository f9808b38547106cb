"""The wheels an air-gapped CUDA node needs next to its own torch and transformers: ``make gpu-bundle``.

``python -m bench.bundle check DIR`` verifies a bundle: DeepSpeed's wheel is there, every
requirement of every wheel in it is either in it or one the node brings (``NODE_PROVIDES``:
torch, transformers and what transformers itself requires), nothing in it is a torch or CUDA
build, and the whole is under ``LIMIT_MIB``.  ``install_bundle`` puts the bundle's wheels on
``sys.path`` without touching the node's environment (``bench.gpu`` calls it when DeepSpeed is
not importable).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

LIMIT_MIB = 60
# on a node that has torch and transformers installed (transformers 5 requires these)
NODE_PROVIDES = {"torch", "transformers", "numpy", "packaging", "tqdm", "huggingface-hub", "safetensors", "pyyaml",
                 "regex", "tokenizers", "typer", "filelock", "fsspec", "click", "typing-extensions"}  # fmt: skip
FORBIDDEN = ("torch", "nvidia-", "triton")  # never ship a second torch or CUDA libraries


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """Requires-Dist of a wheel, without extras."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(name).decode())
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": "", "sys_platform": "linux"})]


def check(directory: Path) -> list[str]:
    """Problems of the bundle in `directory` (empty: it is complete)."""
    wheels = sorted(directory.glob("*.whl"))
    have = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in wheels}
    problems = []
    if "deepspeed" not in have:
        problems.append(f"no DeepSpeed wheel in {directory}")
    for name in have:
        if name.startswith(FORBIDDEN) and name != "nvidia-ml-py":
            problems.append(f"{name} must come from the node, not the bundle")
    for name, wheel in have.items():
        for req in wheel_requirements(wheel):
            dep = canonicalize_name(req.name)
            if dep in NODE_PROVIDES:
                continue
            if dep not in have:
                problems.append(f"{name} needs {req}, which is not in the bundle")
            elif not req.specifier.contains(parse_wheel_filename(have[dep].name)[1], prereleases=True):
                problems.append(f"{name} needs {req}, the bundle has {have[dep].name}")
    size = sum(w.stat().st_size for w in wheels) / 2**20
    if size > LIMIT_MIB:
        problems.append(f"the bundle takes {size:.1f} MiB, over {LIMIT_MIB} MiB")
    return problems


def install_bundle(directory: Path, target: Path) -> list[str]:
    """Unpack the bundle's wheels for distributions this interpreter lacks into `target`, put it first
    on sys.path and PYTHONPATH (child processes see it too); returns the distributions added."""
    import importlib.metadata

    missing = []
    for wheel in sorted(directory.glob("*.whl")):
        name = parse_wheel_filename(wheel.name)[0]
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(wheel)
    if missing:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target", str(target)]
        subprocess.run(cmd + [str(w) for w in missing], check=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)
    return [parse_wheel_filename(w.name)[0] for w in missing]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.bundle", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["check"])
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    problems = check(args.directory)
    for p in problems:
        print(f"Error: {p}", file=sys.stderr)
    if not problems:
        wheels = sorted(args.directory.glob("*.whl"))
        size = sum(w.stat().st_size for w in wheels) / 2**20
        print(
            f"{args.directory}: {len(wheels)} wheels, {size:.1f} MiB, complete for a node with torch and transformers"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
