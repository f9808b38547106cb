"""The docs are tested: README.md and every page of docs/.

- Every command block (```bash / ```python) carries a marker on the line above it saying how it is
  checked: `<!-- docs-test: run -->` (run here, in a scratch directory), `<!-- docs-test: dryrun -->`
  (TorchX lines run with --dryrun, `submit.py` lines with --dryrun), `<!-- docs-test: tests/x.py::test_y
  ... -->` (another test already runs it; the test must exist), or `<!-- docs-test: skip: REASON -->`.
- Every relative link and anchor resolves.
- Every `moe-train` option a page names exists: on the command lines of its blocks, for that
  subcommand; in its prose, for some subcommand or TorchX component (or a known other tool's option).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
MARK = re.compile(r"^<!-- docs-test: (.+?) -->$")
COMMAND_LANGS = {"bash", "sh", "shell", "python"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    out, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang, start = lines[i][3:].strip(), i
            j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
            before = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            m = MARK.match(before.strip())
            out.append(Block(page, start + 1, lang, "\n".join(lines[i + 1 : j]), m.group(1) if m else None))
            i = j
        i += 1
    return out


ALL_BLOCKS = [b for p in PAGES for b in blocks(p)]
COMMAND_BLOCKS = [b for b in ALL_BLOCKS if b.lang in COMMAND_LANGS]


def commands(text: str) -> list[str]:
    """The command lines of a shell block: continuations joined, comments and blank lines dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.split("  #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line and not current:
            continue
        current += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            out.append(current.strip())
            current = ""
    return [c for c in out if c]


def prose(page: Path) -> str:
    """The page without its fenced blocks."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)


# ------------------------------------------------------------------------------- every block is checked
def test_every_command_block_says_how_it_is_checked():
    problems = []
    for b in COMMAND_BLOCKS:
        if b.marker is None:
            problems.append(f"{b.id}: no <!-- docs-test: ... --> marker above the block")
        elif b.marker.startswith("skip"):
            if not b.marker.partition(":")[2].strip():
                problems.append(f"{b.id}: a skipped block needs a reason (`skip: REASON`)")
        elif b.marker not in ("run", "dryrun"):
            for ref in b.marker.split():
                path, _, name = ref.partition("::")
                test_file = REPO / path
                if not name or not test_file.is_file():
                    problems.append(f"{b.id}: {ref} is not tests/FILE.py::TEST")
                elif not re.search(rf"^(async )?def {re.escape(name.split('[')[0])}\(", test_file.read_text(), re.M):
                    problems.append(f"{b.id}: {path} has no test {name}")
    assert not problems, "\n".join(problems)


def test_there_are_blocks_of_each_kind():
    """A parser that stopped seeing blocks would pass everything above: it must see these."""
    kinds = {
        b.marker.split(":")[0] if b.marker and not b.marker.startswith("tests/") else "mapped" for b in COMMAND_BLOCKS
    }
    assert {"run", "dryrun", "mapped", "skip"} <= kinds, kinds
    assert len(COMMAND_BLOCKS) >= 10


def _scratch(tmp_path: Path) -> dict:
    for name in ("components", "schedulers"):
        (tmp_path / name).symlink_to(REPO / name)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


def _dryrun(command: str) -> str:
    args = shlex.split(command)
    if args[:2] == ["cd", "components"] and "&&" in args:
        args = args[args.index("&&") + 1 :]
    if args[:2] == ["torchx", "run"]:
        return shlex.join(["torchx", "run", "--dryrun", *[a for a in args[2:] if a != "--dryrun"]])
    if args[0] == "python" and args[1].endswith("kubernetes/submit.py"):
        return shlex.join([sys.executable, args[1], "--dryrun", *args[2:]])
    assert args == ["cd", "components"], f"a dryrun block holds only TorchX and submit.py lines: {command}"
    return ""


@pytest.mark.parametrize("block", [b for b in COMMAND_BLOCKS if b.marker == "dryrun"], ids=lambda b: b.id)
def test_dryrun_blocks_print_their_job(block, tmp_path):
    env = _scratch(tmp_path)
    for command in commands(block.text):
        line = _dryrun(command)
        if line:
            p = subprocess.run(
                line, shell=True, cwd=tmp_path / "components", env=env, capture_output=True, text=True, timeout=120
            )
            assert p.returncode == 0, f"{block.id}: {command}\n{p.stdout[-2000:]}{p.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in COMMAND_BLOCKS if b.marker == "run"], ids=lambda b: b.id)
def test_run_blocks_succeed(block, tmp_path):
    env = _scratch(tmp_path)
    script = "set -euo pipefail\n" + block.text
    p = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{block.id}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"


# ------------------------------------------------------------------------------------ links and anchors
def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", prose(page), re.M)}


def test_every_relative_link_and_anchor_resolves():
    problems = []
    for page in PAGES:
        for m in re.finditer(r"\[[^\]]*\]\(([^)\s]+)\)", prose(page)):
            target = m.group(1)
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                problems.append(f"{page.relative_to(REPO)}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{page.relative_to(REPO)}: {target}: no heading with that anchor")
    assert not problems, "\n".join(problems)


def test_the_docs_index_lists_every_page():
    readme = (REPO / "README.md").read_text()
    missing = [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in readme]
    assert not missing, f"README.md links to no {missing}"


# --------------------------------------------------------------------------------- options that exist
def _cli_options() -> dict[str, set[str]]:
    from moe_train.cli import main

    out = {}
    for name, command in main.commands.items():
        out[name] = {opt for p in command.params for opt in [*p.opts, *p.secondary_opts] if opt.startswith("--")}
    return out


def _component_params() -> set[str]:
    """The TorchX catalogue's parameters, read the way TorchX reads a component file (importing it as a
    module named `components` would shadow the catalogue's entry points for every later test)."""
    import inspect

    from torchx.specs.finder import get_component

    train = get_component(f"{REPO / 'components' / 'components.py'}:train").fn
    return {"--" + p for p in inspect.signature(train).parameters}


# Options of other tools the pages name (torchrun, srun/sbatch, pip, TorchX itself, hf, bench scripts).
OTHER_TOOLS = {
    "--nproc_per_node",
    "--nnodes",
    "--max-restarts",
    "--standalone",
    "--signals-to-handle",
    "--rdzv-conf",
    "--signal",
    "--requeue",
    "--gpus-per-task",
    "--ntasks-per-node",
    "--dryrun",
    "--wait",
    "--repo-type",
    "--local-dir",
    "--mode",
    "--bench",
    "--nproc",
    "--steps",
    "--rounds",
    "--help",
    "--debug",
    "--image",
    "--scheduler-args",
    "--no-build-isolation",
    "--no-deps",
    "--dry-run",
    "--rdzv_port",
    "--cpu",
    "--gpu",
    "--memMB",
    "--durations",
    "--amend",
    "--secret",
    "--shm-size",
    "--quick",
    "--only",
    "--enable-mixed-moe-lora-format",  # vllm serve
    "--lora-strict-loading",  # sglang
}


def test_every_moe_train_option_named_exists():
    cli = _cli_options()
    everything = set().union(*cli.values()) | _component_params() | OTHER_TOOLS
    problems = []
    for b in COMMAND_BLOCKS:
        if b.lang == "python":
            continue
        for command in commands(b.text):
            words = shlex.split(command.replace("$", ""))
            for i, w in enumerate(words[:-1]):
                if w.endswith("moe-train") or (w == "moe_train.cli" and words[i - 1] == "-m"):
                    sub, opts = words[i + 1], [x.split("=")[0] for x in words[i + 2 :] if x.startswith("--")]
                    unknown = [o for o in opts if o not in cli.get(sub, set())]
                    if unknown:
                        problems.append(f"{b.id}: moe-train {sub} has no {unknown}")
    for page in PAGES:
        for opt in re.findall(r"`(--[a-z][a-z0-9_-]*)", prose(page)):
            base = opt.split("/")[0]
            if base not in everything and base.replace("--no-", "--") not in everything:
                problems.append(
                    f"{page.relative_to(REPO)}: `{opt}` is no option of moe-train, its components or a tool it names"
                )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("sub", ["train", "plan"])
def test_the_synopsis_names_every_option(sub):
    """The usage synopsis of `moe-train train` / `plan` (a text block starting with that command) lists
    every option the command takes, so an option added to the CLI shows up in the docs."""
    cli = _cli_options()[sub] - {"--help"}
    synopses = [b.text for b in ALL_BLOCKS if b.lang == "text" and f"\nmoe-train {sub} " in "\n" + b.text]
    assert synopses, f"no usage synopsis of moe-train {sub} in the docs"
    named = set(re.findall(r"--[a-z][a-z0-9-]*", "\n".join(synopses)))
    missing = sorted(o for o in cli if o not in named)
    assert not missing, f"the moe-train {sub} synopsis does not name {missing}"
