"""Active learning over weeks of uptime: health checks that start nothing twice, deploys that stop processes in the
middle of applying an event without setting it aside, set-aside events that show and can be replayed, and trainings
whose memory stays bounded however large the annotations. Real processes, real Redis, real images over HTTP."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time
from dataclasses import replace

import redis

from backend.http.server import create_app
from backend.inference.queue import QueuePredictor
from backend.project_files import ProjectFiles
from backend.training.dataset import TrainingSet
from backend.training.ingest import EVENT_ATTEMPTS, Inbox
from tests.assets import REPO
from tests.conftest import backend_env, make_client
from tests.services import RedisServer
from tests.test_active_learning import APPLY_RECORDED_EVENTS, annotation_event


def test_health_checks_replay_the_inbox_once_per_process(settings, shapes, tmp_path):
    """Label Studio polls /health: in queue mode each poll used to queue another learn job for the same recorded
    events, each kept a day in the queue's Redis."""
    url, mask = shapes[20]
    Inbox(ProjectFiles(settings.model_dir, 31)).record(annotation_event("ANNOTATION_CREATED", 31, 3101, 20, url, mask))
    server = RedisServer(tmp_path).start()
    try:
        queue_settings = replace(settings, inference="queue", redis_url=server.url)
        predictor = QueuePredictor(queue_settings, redis.Redis.from_url(server.url))
        web = create_app(queue_settings, predictor).test_client()
        for _ in range(20):
            assert web.get("/health").status_code == 200
        for _ in range(5):
            assert web.post("/setup", json={"project": "31.1795623701"}).status_code == 200
        assert predictor.training_queue.count == 1
    finally:
        server.stop()


def no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def test_stopping_a_process_mid_apply_never_sets_the_event_aside(
    learning_settings, shapes, label_studio, media_root, tmp_path
):
    """A deploy SIGTERMs the backend, gunicorn SIGABRTs a worker that overran its time-out: neither is a crash of the
    event's making. More such stops than EVENT_ATTEMPTS leave the event in the inbox, and the next start applies it."""
    files = ProjectFiles(learning_settings.model_dir, 32)
    url, mask = shapes[21]
    slow_image = "/data/upload/shapes/slow.png"
    (media_root / "upload" / "shapes" / "slow.png").write_bytes((media_root / url.removeprefix("/data/")).read_bytes())
    Inbox(files).record(annotation_event("ANNOTATION_CREATED", 32, 3201, 21, slow_image, mask))
    env = backend_env(learning_settings, tmp_path)

    def fetches() -> int:
        return sum(full_path.partition("?")[0] == slow_image for _, full_path, _ in label_studio.requests)

    stops = [signal.SIGTERM, signal.SIGABRT, *[signal.SIGTERM] * (EVENT_ATTEMPTS - 1)]
    label_studio.stalls[slow_image] = 60.0
    try:
        for stop in stops:
            fetched = fetches()
            start = subprocess.Popen(
                [sys.executable, "-c", APPLY_RECORDED_EVENTS], cwd=REPO, env=env, preexec_fn=no_core_dumps
            )
            deadline = time.monotonic() + 120
            while fetches() == fetched:
                assert start.poll() is None and time.monotonic() < deadline, "the start never fetched the image"
                time.sleep(0.05)
            start.send_signal(stop)
            assert start.wait(timeout=30) == -stop
            assert not files.failed.exists()
            (pending,) = Inbox(files).pending()
            assert not pending.with_suffix(".attempts").exists()
    finally:
        del label_studio.stalls[slow_image]
    start = subprocess.run([sys.executable, "-c", APPLY_RECORDED_EVENTS], cwd=REPO, env=env, timeout=300)
    assert start.returncode == 0
    assert [record.annotation_id for record in TrainingSet(files).records()] == [3201]
    assert not Inbox(files).pending() and not files.failed.exists()


def test_set_aside_events_show_in_versions_and_status_and_one_command_replays_them(learning_settings, shapes, tmp_path):
    files = ProjectFiles(learning_settings.model_dir, 33)
    url, mask = shapes[22]
    inbox = Inbox(files)
    event = inbox.record(annotation_event("ANNOTATION_CREATED", 33, 3301, 22, url, mask))
    inbox.begin_attempt(event)
    inbox.set_aside(event, "OSError: [Errno 28] No space left on device")
    client, _ = make_client(learning_settings)

    (listed,) = client.get("/versions?project=33").json["set_aside_events"]
    assert listed == {
        "event": event.name,
        "action": "ANNOTATION_CREATED",
        "annotation": 3301,
        "reason": "OSError: [Errno 28] No space left on device",
    }
    assert client.get("/status").json["set_aside_events"] == {"33": 1}

    env = backend_env(learning_settings, tmp_path)
    replay = subprocess.run(
        [sys.executable, "-m", "backend", "inbox", "replay", "--project", "33"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout) == {"project": 33, "replayed": 1, "where": "applied here", "set_aside": []}
    assert [record.annotation_id for record in TrainingSet(files).records()] == [3301]
    assert client.get("/versions?project=33").json["set_aside_events"] == []
    assert client.get("/status").json["set_aside_events"] == {}
