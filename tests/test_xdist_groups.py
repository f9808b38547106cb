"""The suite's own scheduling: under ``-n 2 --dist loadgroup`` a module-scoped fixture is set up once.

tests/conftest.py groups the tests that share one (a 2-rank training run, the Slurm cluster); this runs a
small suite through that hook in a pytest child and counts the fixture's set-ups across the workers.  It
failed with pytest 9.2, which ignores the group pytest-xdist 3.8 appends to a test's id."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHARED = """
import os, time, pytest

@pytest.fixture(scope="module")
def shared():
    with open(os.environ["SETUPS"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    return 1

@pytest.mark.parametrize("i", range(6))
def test_alone(i):
    time.sleep(0.2)

@pytest.mark.parametrize("i", range(6))
def test_shared(shared, i):
    time.sleep(0.2)
"""

OTHER = """
import time, pytest

@pytest.mark.parametrize("i", range(6))
def test_other(i):
    time.sleep(0.2)
"""


def test_a_module_scoped_fixture_is_set_up_once_across_the_workers(tmp_path):
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n")
    (tmp_path / "test_shared.py").write_text(SHARED)
    (tmp_path / "test_other.py").write_text(OTHER)
    setups = tmp_path / "setups.txt"
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider", "."],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "SETUPS": str(setups)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "18 passed" in p.stdout, p.stdout[-3000:]
    assert len(setups.read_text().split()) == 1, setups.read_text()
