"""The app under real gunicorn with several workers: an image encoded by one worker is reused by the others."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests

from tests.conftest import REPO, recorded
from tests.services import free_port


@pytest.fixture
def gunicorn(sam_checkpoint: Path, label_studio, redis_url: str, tmp_path: Path):
    port = free_port()
    env = dict(
        os.environ,
        PORT=str(port),
        HOST="127.0.0.1",
        WORKERS="2",
        THREADS="2",
        REDIS_URL=redis_url,
        SAM_CHECKPOINT=str(sam_checkpoint),
        LABEL_STUDIO_URL=label_studio.url,
        LABEL_STUDIO_API_KEY=label_studio.legacy_token,
        MODEL_DIR=str(tmp_path / "models"),
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
