"""`make run`'s install, run by the real make against a venv of the test's own whose python and pip are this
suite's: it installs once and again only when a requirements file changes, and `TORCH=cpu` with PyTorch's CPU
index out of reach fails at once, naming the index, before pip runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.assets import REPO
from tests.services import free_port


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A VENV for the Makefile whose bin/python and bin/pip are the ones running this suite."""
    root = tmp_path / "venv"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").symlink_to(sys.executable)
    (root / "bin" / "pip").symlink_to(Path(sys.executable).parent / "pip")
    return root


def make(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *arguments], cwd=REPO, capture_output=True, text=True)


def test_make_run_installs_once_and_again_only_when_a_requirements_file_changes(venv):
    """Found on a first run: every `make run` ran `pip install -r requirements.txt` again (25 s of the start)."""
    commands = make("-n", "run", f"VENV={venv}")
    assert commands.returncode == 0 and "pip install -q -r requirements.txt" in commands.stdout, commands
    stamp = venv / ".requirements-installed"
    stamp.touch()  # what the install's last step does
    commands = make("-n", "run", f"VENV={venv}")
    assert commands.returncode == 0 and "pip install" not in commands.stdout, commands.stdout
    assert "gunicorn backend.wsgi:app" in commands.stdout
    changed = (REPO / "requirements-web.txt").stat().st_mtime
    os.utime(stamp, (changed - 60, changed - 60))  # installed before the requirements last changed
    assert "pip install -q -r requirements.txt" in make("-n", "run", f"VENV={venv}").stdout


def test_make_test_installs_its_requirements_once(venv):
    assert "pip install -q -r requirements-test.txt" in make("-n", "install-test", f"VENV={venv}").stdout
    (venv / ".requirements-test-installed").touch()
    assert "pip install" not in make("-n", "install-test", f"VENV={venv}").stdout


def test_torch_cpu_with_its_index_out_of_reach_fails_at_once_naming_the_index(venv):
    """Found on a first run: pip retried the unreachable index for 1.5 min and ended with an unrelated error."""
    index = f"http://127.0.0.1:{free_port()}/whl/cpu"  # nothing listens there
    result = make("install", f"VENV={venv}", "TORCH=cpu", f"TORCH_CPU_INDEX={index}")
    assert result.returncode != 0
    said = f"TORCH=cpu installs PyTorch's CPU-only wheels from {index}, which this machine cannot reach"
    assert said in result.stderr
    assert "TORCH_CPU_INDEX" in result.stderr and "pip install" not in result.stdout, result
    assert not (venv / ".requirements-installed").exists()
