"""The app under real gunicorn with several workers: an image encoded by one worker is reused by the others, metrics
add up over the workers, and a whole-project run started by one worker is safe from starts on the others."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
import requests

from backend.runs.preannotate import GOING_ON
from tests.assets import REPO, recorded
from tests.services import free_port


@contextlib.contextmanager
def running_gunicorn(sam_checkpoint: Path, redis_url: str, tmp_path: Path, **env: str) -> Iterator[str]:
    """The backend under real gunicorn with two workers, until the block ends; yields its URL."""
    port = free_port()
    env = dict(
        os.environ,
        PORT=str(port),
        HOST="127.0.0.1",
        WORKERS="2",
        THREADS="2",
        REDIS_URL=redis_url,
        SAM_CHECKPOINT=str(sam_checkpoint),
        MODEL_DIR=str(tmp_path / "models"),
        **env,
    )
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "backend.wsgi:app"], cwd=REPO, env=env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        else:
            raise RuntimeError("gunicorn did not start:\n" + log_path.read_text())
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def gunicorn(sam_checkpoint: Path, label_studio, redis_url: str, tmp_path: Path) -> Iterator[str]:
    with running_gunicorn(
        sam_checkpoint,
        redis_url,
        tmp_path,
        LABEL_STUDIO_URL=label_studio.url,
        LABEL_STUDIO_API_KEY=label_studio.legacy_token,
    ) as url:
        yield url


def click() -> requests.Response:
    # A new connection per request, so the kernel hands requests to whichever worker accepts first.
    return requests.post(
        f"{click.url}/predict",
        json=recorded("04-predict-interactive-keypoints.json"),
        timeout=120,
        headers={"Connection": "close"},
    )


def test_second_worker_reuses_the_first_workers_embedding(gunicorn, redis_url):
    click.url = gunicorn
    first = click()
    assert first.status_code == 200, first.text
    assert first.headers["X-Embedding-Cache"] == "miss"
    first_pid = first.headers["X-Worker-Pid"]

    later = []
    with ThreadPoolExecutor(4) as pool:
        for _ in range(10):
            later += list(pool.map(lambda _: click(), range(4)))
            if any(response.headers["X-Worker-Pid"] != first_pid for response in later):
                break
    assert all(response.status_code == 200 for response in later)
    other_worker = [response for response in later if response.headers["X-Worker-Pid"] != first_pid]
    assert other_worker, "every request went to the same worker"
    assert all(response.headers["X-Embedding-Cache"] == "hit" for response in later)
    assert len(redis.Redis.from_url(redis_url).keys("sam:emb:*")) == 1
    assert (
        other_worker[0].json()["results"][0]["result"][0]["value"]["rle"]
        == first.json()["results"][0]["result"][0]["value"]["rle"]
    )


def metric(text: str, name: str) -> float:
    """The sum of every sample of `name` in a Prometheus text exposition."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_metrics_add_up_over_all_workers(gunicorn):
    click.url = gunicorn
    served: Counter[str] = Counter()
    with ThreadPoolExecutor(4) as pool:
        for _ in range(10):  # until both workers have answered clicks
            responses = list(pool.map(lambda _: click(), range(4)))
            assert all(response.status_code == 200 for response in responses)
            served.update(response.headers["X-Worker-Pid"] for response in responses)
            if len(served) == 2:
                break
    assert len(served) == 2, f"every click went to one worker: {served}"
    clicks = sum(served.values())
    # Each worker counted only its own clicks (fewer than all); whichever one answers /metrics reports the sum.
    reporters = set()
    for _ in range(20):
        answer = requests.get(f"{gunicorn}/metrics", timeout=10, headers={"Connection": "close"})
        reporters.add(answer.headers["X-Worker-Pid"])
        text = answer.text
        assert metric(text, 'sam_http_requests_total{route="/predict",status="200"}') == clicks
        assert metric(text, 'sam_embedding_cache_total{result="miss"}') == 1
        assert metric(text, 'sam_embedding_cache_total{result="hit"}') == clicks - 1
        assert metric(text, "sam_encoder_seconds_count") == 1 and metric(text, "sam_decoder_seconds_count") == clicks
        if len(reporters) == 2:
            break
    assert reporters == set(served)


def run_ended(progress: Callable[[], dict], timeout_s: float = 20) -> dict:
    """A project run's progress (`progress()`, GET /preannotate's answer) once the run has ended, or the last seen."""
    deadline = time.monotonic() + timeout_s
    while (seen := progress())["state"] in GOING_ON and time.monotonic() < deadline:
        time.sleep(0.2)
    return seen


class ProjectApiStandIn:
    """Label Studio's project API for one project of 3 tasks, whose task listing waits until `release` is set: a
    run of it stays running for as long as a test needs. With `hold_project` the project itself waits too: the
    run stays starting."""

    PROJECT = 7

    def __init__(self, hold_project: bool = False) -> None:
        self.release = threading.Event()
        project = {
            "id": self.PROJECT,
            "title": "held open",
            "label_config": (REPO / "label_config.xml").read_text(),
            "task_number": 3,
        }
        release = self.release

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith(f"/api/projects/{ProjectApiStandIn.PROJECT}/"):
                    if hold_project:
                        release.wait(120)
                    self._answer(project)
                elif self.path.startswith("/api/tasks/"):
                    release.wait(120)
                    self._answer({"tasks": [], "total": 0})
                else:
                    self._answer({"detail": "not found"}, 404)

            def _answer(self, body: dict, status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                """Quiet: failures show in the test's asserts."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


def control_sockets(folder: Path) -> dict[int, set[int]]:
    """The gunicorn control sockets in `folder` that answer: each one's master's worker pids."""
    from gunicorn.ctl.client import ControlClient

    answers = {}
    for path in folder.glob("*.ctl"):
        with ControlClient(str(path), timeout=10) as control:
            everything = control.send_command("show all")
        answers[everything["arbiter"]["pid"]] = {worker["pid"] for worker in everything["web_workers"]}
    return answers


def test_two_backends_on_one_host_each_keep_their_own_control_socket(sam_checkpoint, redis_url, tmp_path):
    """gunicorn 27 gives every gunicorn of a user one control socket path (~/.gunicorn/gunicorn.ctl): the second
    backend took the first one's over, and left it with none once it stopped. Each keeps its own now."""
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    # gunicorn's folder for control sockets is then ~/.gunicorn: in /tmp, as a socket's path may not exceed 107 bytes.
    with tempfile.TemporaryDirectory(prefix="home-") as home:
        user = {"HOME": home, "XDG_RUNTIME_DIR": ""}
        sockets = Path(home) / ".gunicorn"
        with running_gunicorn(sam_checkpoint, redis_url, tmp_path / "first", **user) as first:
            first_worker = int(requests.get(f"{first}/health", timeout=30).headers["X-Worker-Pid"])
            with running_gunicorn(sam_checkpoint, redis_url, tmp_path / "second", **user) as second:
                second_worker = int(requests.get(f"{second}/health", timeout=30).headers["X-Worker-Pid"])
                masters = control_sockets(sockets)
                assert len(masters) == 2, masters
                assert {first_worker, second_worker} <= set().union(*masters.values()), masters
            left = control_sockets(sockets)
            assert len(left) == 1 and first_worker in next(iter(left.values())), left


def test_a_start_on_another_worker_leaves_the_running_project_run_alone(sam_checkpoint, redis_url, tmp_path):
    """A second POST /preannotate that a different gunicorn worker takes must neither clear the stop asked of the
    run going on nor overwrite its progress."""
    label_studio = ProjectApiStandIn()
    try:
        with running_gunicorn(
            sam_checkpoint, redis_url, tmp_path, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY="key"
        ) as url:
            fresh = {"Connection": "close"}  # a new connection each, so either worker may take it
            project = {"project": ProjectApiStandIn.PROJECT}
            started = requests.post(f"{url}/preannotate", json=project, timeout=30, headers=fresh)
            assert started.status_code == 202 and started.json()["state"] == "running", started.text
            runner = started.headers["X-Worker-Pid"]
            stopping = requests.delete(f"{url}/preannotate", params=project, timeout=30, headers=fresh)
            assert stopping.status_code == 202
            # The runner's worker paused for a moment, so that the other one takes the next connections: which
            # worker accepts a connection is otherwise up to the kernel, and one busy worker can take them all.
            os.kill(int(runner), signal.SIGSTOP)
            try:
                again = requests.post(f"{url}/preannotate", json=project, timeout=30, headers=fresh)
                progress = requests.get(f"{url}/preannotate", params=project, timeout=30, headers=fresh)
            finally:
                os.kill(int(runner), signal.SIGCONT)
            assert again.status_code == 409, again.text
            assert again.headers["X-Worker-Pid"] != runner and progress.headers["X-Worker-Pid"] != runner
            assert progress.json()["state"] == "running" and progress.json()["total"] == 3, progress.text
            label_studio.release.set()
            progress = run_ended(lambda: requests.get(f"{url}/preannotate", params=project, timeout=30).json())
            assert progress["state"] == "stopped" and progress["message"] == "stopped on request", progress
    finally:
        label_studio.close()
