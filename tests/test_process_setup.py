"""Every process that may run a model applies TORCH_THREADS and says how many threads torch runs with: the web
tier under gunicorn, a queue worker, and the command-line runs."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.assets import REPO
from tests.services import free_port

THREADS_LINE = re.compile(r"torch runs with (\d+) CPU threads")


def reported_threads(command: list[str], env: dict[str, str], timeout_s: float = 120) -> int:
    """Start `command`, read its log until it says how many threads torch runs with, then stop it."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            seen.append(line)
            if match := THREADS_LINE.search(line):
                return int(match.group(1))
        raise AssertionError(f"{command[2:]} never said how many threads torch runs with:\n{''.join(seen)[-3000:]}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def threads_env(settings, redis_url) -> tuple[int, dict[str, str]]:
    """A TORCH_THREADS that differs from torch's own default here, so only the setting can explain it."""
    wanted = 1 if torch.get_num_threads() > 1 else 2
    env = dict(
        os.environ,
        TORCH_THREADS=str(wanted),
        LOG_LEVEL="INFO",
        SAM_CHECKPOINT=settings.sam_checkpoint,
        WEIGHTS_DIR=settings.weights_dir,
        MODEL_DIR=settings.model_dir,
        REDIS_URL=redis_url,
        LABEL_STUDIO_URL=settings.label_studio_url,
        LABEL_STUDIO_API_KEY=settings.label_studio_api_key,
    )
    return wanted, env


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param(["-m", "gunicorn", "backend.wsgi:app"], id="gunicorn"),
        pytest.param(["-m", "backend", "worker"], id="worker"),
        pytest.param(["-m", "backend", "preannotate", "--project", "1"], id="preannotate"),
        pytest.param(["-m", "backend", "predict", "IMAGE", "--text", "car"], id="predict"),
    ],
)
def test_every_entry_point_runs_torch_with_torch_threads(threads_env, media_root, arguments):
    wanted, env = threads_env
    env.update(HOST="127.0.0.1", PORT=str(free_port()), WORKERS="1")
    arguments = [str(media_root / "upload/1/voc.jpg") if arg == "IMAGE" else arg for arg in arguments]
    assert reported_threads([sys.executable, *arguments], env) == wanted
