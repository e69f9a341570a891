"""`python -m backend preannotate` says in one line what failed, and advises running it again only where that can
help."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from tests.assets import REPO
from tests.services import free_port


@pytest.fixture
def other_web_server(tmp_path) -> Iterator[str]:
    """A web server that is not Label Studio: what a wrong LABEL_STUDIO_URL reaches. It answers HTML error pages."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def preannotate(settings, label_studio_url: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        LABEL_STUDIO_URL=label_studio_url,
        LABEL_STUDIO_API_KEY=settings.label_studio_api_key,
        SAM_CHECKPOINT=settings.sam_checkpoint,
        WEIGHTS_DIR=settings.weights_dir,
        MODEL_DIR=settings.model_dir,
        REDIS_URL="",
    )
    command = [sys.executable, "-m", "backend", "preannotate", "--project", "1"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_a_wrong_label_studio_url_is_one_line_naming_the_url_and_status_without_resume_advice(
    settings, other_web_server
):
    run = preannotate(settings, other_web_server)
    assert run.returncode == 1, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("failed: ") and other_web_server in last and "HTTP 404" in last
    assert "LABEL_STUDIO_URL" in last and "resume" not in last
    assert "<" not in run.stderr + run.stdout  # no HTML page dumped, in the log or the progress line


def test_label_studio_not_answering_advises_running_again(settings):
    address = f"http://127.0.0.1:{free_port()}"
    run = preannotate(settings, address)
    assert run.returncode == 1, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("failed: ") and address in last and last.endswith("run the same command again to resume")
