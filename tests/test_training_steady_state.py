"""Active learning over weeks of uptime: health checks that start nothing twice, deploys that stop processes in the
middle of applying an event without setting it aside, set-aside events that show and can be replayed, and trainings
whose memory stays bounded however large the annotations. Real processes, real Redis, real images over HTTP."""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import signal
import subprocess
import sys
import time
import tracemalloc
from dataclasses import replace

import numpy as np
import redis
from rq.job import Job

from backend.http.server import create_app
from backend.inference.queue import QueuePredictor
from backend.project_files import ProjectFiles
from backend.protocol.brush_rle import _encode_runs, encode_mask
from backend.training.dataset import TrainingSet
from backend.training.ingest import EVENT_ATTEMPTS, Inbox
from backend.training.trainer import train_project
from tests.assets import REPO, encode, recorded
from tests.conftest import backend_env, make_client
from tests.services import RedisServer, Workers
from tests.synthetic_shapes import shape_image
from tests.test_active_learning import (
    APPLY_RECORDED_EVENTS,
    annotation_event,
    peak_rss_since_reset_bytes,
    post_webhook,
    reset_peak_rss,
    training_worker_env,
)


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


@contextlib.contextmanager
def worker_applying_a_stalled_event(settings, shapes, label_studio, media_root, sam_checkpoint, tmp_path, project_id):
    """A queue worker whose learn job is fetching the event's image, which Label Studio takes a minute to send:
    yields the worker process, the event's inbox file and the web tier's predictor."""
    url, mask = shapes[23]
    slow_image = f"/data/upload/shapes/slow-{project_id}.png"
    (media_root / slow_image.removeprefix("/data/")).write_bytes((media_root / url.removeprefix("/data/")).read_bytes())
    server = RedisServer(tmp_path).start()
    pool = Workers(server.url, sam_checkpoint, tmp_path)
    label_studio.stalls[slow_image] = 60.0
    try:
        pool.start(1, MODEL_DIR=settings.model_dir, LABEL_STUDIO_URL=settings.label_studio_url)
        queue_settings = replace(settings, inference="queue", redis_url=server.url)
        predictor = QueuePredictor(queue_settings, redis.Redis.from_url(server.url))
        web = create_app(queue_settings, predictor).test_client()
        body = annotation_event("ANNOTATION_CREATED", project_id, project_id * 100, 23, slow_image, mask)
        assert post_webhook(web, body)["status"] == "queued"
        deadline = time.monotonic() + 120
        while not any(path.partition("?")[0] == slow_image for _, path, _ in label_studio.requests):
            assert time.monotonic() < deadline, "the worker never fetched the image"
            time.sleep(0.05)
        (pending,) = Inbox(ProjectFiles(settings.model_dir, project_id)).pending()
        assert pending.with_suffix(".attempts").read_text() == "1"
        (worker,) = pool.processes
        yield worker, pending, predictor
    finally:
        del label_studio.stalls[slow_image]
        pool.stop()
        server.stop()


def test_a_worker_stopped_mid_apply_by_a_deploy_counts_no_attempt(
    settings, shapes, label_studio, media_root, sam_checkpoint, tmp_path
):
    """`docker stop` on a queue worker: SIGTERM (RQ's warm shutdown waits for the job in hand), then SIGKILL ten
    seconds later. The event being applied stays in the inbox with no attempt counted."""
    with worker_applying_a_stalled_event(settings, shapes, label_studio, media_root, sam_checkpoint, tmp_path, 38) as (
        worker,
        pending,
        _,
    ):
        worker.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while pending.with_suffix(".attempts").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        worker.kill()
        assert worker.wait(timeout=30) == -signal.SIGKILL
        assert Inbox(ProjectFiles(settings.model_dir, 38)).pending() == [pending]
        assert not pending.with_suffix(".attempts").exists()


def test_a_learn_job_timed_out_mid_apply_leaves_the_event_in_the_inbox_uncounted(
    settings, shapes, label_studio, media_root, sam_checkpoint, tmp_path
):
    """RQ times a job out by raising in it; applying used to take that for the event's own failure and set it aside
    at once."""
    settings = replace(settings, train_job_timeout_s=3)
    with worker_applying_a_stalled_event(settings, shapes, label_studio, media_root, sam_checkpoint, tmp_path, 39) as (
        _,
        pending,
        predictor,
    ):
        queue = predictor.training_queue
        deadline = time.monotonic() + 60
        while not (failed := queue.failed_job_registry.get_job_ids()):
            assert time.monotonic() < deadline, "the learn job never timed out"
            time.sleep(0.1)
        (job_id,) = failed
        assert "JobTimeoutException" in (
            Job.fetch(job_id, connection=predictor.connection).latest_result().exc_string or ""
        )
        files = ProjectFiles(settings.model_dir, 39)
        assert Inbox(files).pending() == [pending] and not pending.with_suffix(".attempts").exists()
        assert not files.failed.exists()


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


def brush_event(project_id: int, annotation_id: int, task_id: int, image_url: str, masks: list[np.ndarray]) -> dict:
    """An ANNOTATION_CREATED body with one brush region per mask (coded here: the SDK takes seconds per big mask)."""
    body = annotation_event("ANNOTATION_CREATED", project_id, annotation_id, task_id, image_url, np.ones((2, 2), bool))
    template = body["annotation"]["result"][0]
    body["annotation"]["result"] = [
        {
            **template,
            "id": f"r{index}",
            "original_width": mask.shape[1],
            "original_height": mask.shape[0],
            "value": {**template["value"], "rle": encode_mask(mask)},
        }
        for index, mask in enumerate(masks)
    ]
    return body


def test_an_annotation_declaring_more_than_the_caps_is_left_out_undecoded(learning_settings, shapes):
    """12 whole-image brushes at 6000x6000 in a 0.5 MB body asked for 430 MB of masks; 101 small brushes are over
    TRAIN_MAX_REGIONS. Both are refused before any mask is decoded, and the next event is applied."""
    client, predictor = make_client(learning_settings)
    url, mask = shapes[20]
    post_webhook(client, annotation_event("ANNOTATION_CREATED", 34, 3400, 20, url, mask))
    assert predictor.learning.wait_idle(120)
    wide = brush_event(34, 3401, 21, url, [mask])
    side, values = 6000, 4 * 6000 * 6000
    whole_image = _encode_runs(values, np.array([values]), np.array([255]))
    region = {**wide["annotation"]["result"][0], "original_width": side, "original_height": side}
    wide["annotation"]["result"] = [
        {**region, "id": f"w{index}", "value": {**region["value"], "rle": whole_image}} for index in range(12)
    ]
    assert len(json.dumps(wide)) < 1024 * 1024
    many = brush_event(34, 3402, 22, url, [mask] * 101)  # TRAIN_MAX_REGIONS is 100

    reset_peak_rss()
    before = peak_rss_since_reset_bytes()
    for body in (wide, many, annotation_event("ANNOTATION_CREATED", 34, 3403, 21, url, mask)):
        assert post_webhook(client, body)["status"] == "queued"
    assert predictor.learning.wait_idle(120)
    risen = peak_rss_since_reset_bytes() - before

    assert risen < 50 * 1024 * 1024, f"resident memory rose {risen / 2**20:.0f} MiB"
    rejected = TrainingSet(ProjectFiles(learning_settings.model_dir, 34)).rejections()
    assert [(entry["annotation"], entry["region"], entry["reason"]) for entry in rejected] == [
        (
            3401,
            "*",
            "the annotation's 12 mask regions declare 432000000 pixels in all, over TRAIN_MAX_ANNOTATION_PIXELS"
            " (200000000); none of them was decoded",
        ),
        (3402, "*", "the annotation has 101 mask regions, over TRAIN_MAX_REGIONS (100); none of them was decoded"),
    ]
    assert [
        record.annotation_id for record in TrainingSet(ProjectFiles(learning_settings.model_dir, 34)).records()
    ] == [
        3400,
        3403,
    ]


TRAINING_MEMORY_BOUND = 80 * 1024 * 1024


def served_shapes(media_root, folder: str, seeds: range, height: int, width: int) -> list[tuple[int, str, np.ndarray]]:
    """Synthetic shape images written where the Label Studio stand-in serves them: (seed, URL, the shape's mask)."""
    images = []
    for seed in seeds:
        image, mask = shape_image(seed, height=height, width=width)
        path = media_root / "upload" / folder / f"{seed}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(image, "PNG"))
        images.append((seed, f"/data/upload/{folder}/{seed}.png", mask))
    return images


def test_training_memory_does_not_grow_with_the_annotations(learning_settings, media_root):
    """Four tasks of 3000x2000 pixels, each annotated with twelve brushes: 288 MB of masks at a byte per pixel,
    which ingestion and the trainer held at once, beside every image's embedding. Streamed, the peak of what they
    allocate (numpy arrays and Python objects, which tracemalloc follows; torch's own buffers are transient here)
    stays under TRAINING_MEMORY_BOUND: ingestion holds the larger of one mask's decoding (five bytes per pixel, 30 MB
    here) and the image's download, plus the annotation's masks bit-packed; training a mask or two at a byte per
    pixel."""
    settings = replace(learning_settings, train_after_annotations=0, train_steps=4)
    client, predictor = make_client(settings)
    images = served_shapes(media_root, "big", range(30, 34), height=2000, width=3000)
    resources = predictor.training_resources()
    features = resources.features(ProjectFiles(settings.model_dir, 35))
    for _, url, _ in images:  # fetched and encoded once first: the measure is of what grows with the annotations
        resources.embedding_for(features, url, None)
    bodies = [brush_event(35, 3500 + seed, seed, url, [mask] * 12) for seed, url, mask in images]

    tracemalloc.start()
    try:
        for body in bodies:
            assert post_webhook(client, body)["status"] == "queued"
        assert predictor.learning.wait_idle(300)
        _, ingest_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        # Without the export of the new version to ONNX, whose size is the decoder's, not the annotations'.
        result = train_project(35, settings, replace(predictor.training_resources(), decoders=None))
        _, training_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert result.status == "trained", result
    assert result.metrics["train_masks"] + result.metrics["held_out_masks"] == 48
    assert ingest_peak < TRAINING_MEMORY_BOUND, f"ingestion allocated {ingest_peak / 2**20:.0f} MiB at its peak"
    assert training_peak < TRAINING_MEMORY_BOUND, f"training allocated {training_peak / 2**20:.0f} MiB at its peak"


def annotate_evicted(settings, media_root, project_id: int, folder: str, seeds: range):
    """Annotations applied through the webhook for served shape images that the cache no longer holds, as in the
    soak, whose cache held a tenth of the project and whose webhook events waited behind the encoding ahead.
    Ingestion encodes each image once for the feature store without caching it: caching it pushed out the images
    encoded ahead of the annotators. Returns the predictor, the cache, its keys before and the images."""
    client, predictor = make_client(settings)
    images = served_shapes(media_root, folder, seeds, height=240, width=320)
    cache = redis.Redis.from_url(settings.cache_url)
    before = set(cache.scan_iter("sam:emb:*"))
    for seed, url, mask in images:
        event = brush_event(project_id, project_id * 100 + seed, seed, url, [mask])
        assert post_webhook(client, event)["status"] == "queued"
    assert predictor.learning.wait_idle(300)
    assert set(cache.scan_iter("sam:emb:*")) == before  # ingestion cached none of the evicted images
    cache.set(b"sam:emb:an-image-encoded-ahead", b"x" * 1000)
    return predictor, cache, before, images


def counting_encodes(monkeypatch, predictor) -> list[int]:
    """The number of images each call of the training segmenter's encoder encoded (the real encoder runs)."""
    segmenter = predictor.training_resources().segmenter
    calls: list[int] = []
    encode_batch = segmenter.encode_batch

    def counted(images):
        calls.append(len(images))
        return encode_batch(images)

    monkeypatch.setattr(segmenter, "encode_batch", counted)
    return calls


def test_a_training_reads_its_images_from_the_feature_store_encoding_none(learning_settings, media_root, monkeypatch):
    """The soak's trainings re-encoded every annotated image the cache had evicted: minutes of a worker per training
    on a large project, and cold first clicks after. Ingestion stores each annotated image's features on disk; the
    training reads them there, encodes nothing and leaves the cache as it was."""
    settings = replace(learning_settings, train_after_annotations=0, train_steps=2)
    predictor, cache, before, images = annotate_evicted(settings, media_root, 36, "stored", range(40, 43))
    encodes = counting_encodes(monkeypatch, predictor)

    result = train_project(36, settings, replace(predictor.training_resources(), decoders=None))

    assert result.status == "trained", result
    assert result.metrics["train_masks"] + result.metrics["held_out_masks"] == len(images)
    assert encodes == []
    assert set(cache.scan_iter("sam:emb:*")) - before == {b"sam:emb:an-image-encoded-ahead"}
    assert len(list((ProjectFiles(settings.model_dir, 36).features).glob("*/*.emb"))) == len(images)


def test_an_image_clicked_then_evicted_is_annotated_and_trained_on_without_encoding_it_again(
    learning_settings, media_root, monkeypatch
):
    """The soak's webhook events waited behind the encoding ahead, and by then the cache (a tenth of the project) had
    evicted the annotated image: applying each event encoded it again, taking the CPU that encoding ahead needed.
    The click stores the image's features for training; the event and the training read them there."""
    settings = replace(learning_settings, train_after_annotations=0, train_steps=2)
    client, predictor = make_client(settings)
    first, *images = served_shapes(media_root, "clicked", range(49, 53), height=240, width=320)
    features = ProjectFiles(settings.model_dir, 1).features

    def click(seed: int, url: str) -> None:
        body = recorded("04-predict-interactive-keypoints.json")
        body["tasks"][0]["id"], body["tasks"][0]["data"]["image"] = seed, url
        assert client.post("/predict", json=body).status_code == 200

    click(*first[:2])
    assert not features.exists()  # a project whose webhooks sent nothing yet stores nothing: nothing would clean it
    assert post_webhook(client, brush_event(1, 100 + first[0], first[0], first[1], [first[2]]))["status"] == "queued"
    assert predictor.learning.wait_idle(300)
    for seed, url, _ in images:
        click(seed, url)
    assert len(list(features.glob("*/*.emb"))) == 1 + len(images)
    cache = redis.Redis.from_url(settings.cache_url)
    cache.delete(*cache.scan_iter("sam:emb:*"))  # evicted by the images annotators opened since
    encodes = counting_encodes(monkeypatch, predictor)

    for seed, url, mask in images:
        assert post_webhook(client, brush_event(1, 100 + seed, seed, url, [mask]))["status"] == "queued"
    assert predictor.learning.wait_idle(300)
    result = train_project(1, settings, replace(predictor.training_resources(), decoders=None))

    assert result.status == "trained", result
    assert result.metrics["train_masks"] + result.metrics["held_out_masks"] == 1 + len(images)
    assert encodes == []


def test_without_room_for_features_a_training_encodes_what_it_misses_without_caching_it(
    learning_settings, media_root, monkeypatch
):
    """With TRAIN_FEATURES_MAX_MB=0 a training encodes each evicted image again, and uses it once: storing it in
    the cache would push out the images encoded ahead of the annotators."""
    settings = replace(learning_settings, train_after_annotations=0, train_steps=2, train_features_max_mb=0)
    predictor, cache, before, images = annotate_evicted(settings, media_root, 37, "unstored", range(44, 47))
    encodes = counting_encodes(monkeypatch, predictor)

    result = train_project(37, settings, replace(predictor.training_resources(), decoders=None))

    assert result.status == "trained", result
    assert result.metrics["train_masks"] + result.metrics["held_out_masks"] == len(images)
    assert sum(encodes) == len(images)
    assert set(cache.scan_iter("sam:emb:*")) - before == {b"sam:emb:an-image-encoded-ahead"}
    assert not ProjectFiles(settings.model_dir, 37).features.exists()


def test_one_training_at_a_time_per_process(learning_settings, shapes, caplog):
    """Two projects asking to train at once: the second waits for the first (TRAININGS_AT_ONCE=1)."""
    client, predictor = make_client(replace(learning_settings, train_after_annotations=0, train_steps=6))
    for project_id in (36, 37):
        for seed in (20, 21):
            url, mask = shapes[seed]
            post_webhook(
                client, annotation_event("ANNOTATION_CREATED", project_id, project_id * 100 + seed, seed, url, mask)
            )
    assert predictor.learning.wait_idle(120)
    caplog.set_level(logging.INFO, logger="backend.training.trainer")
    for project_id in (36, 37):
        start = recorded("10-webhook-start-training.json")
        start["project"]["id"] = project_id
        assert post_webhook(client, start)["status"] == "queued"
    assert predictor.learning.wait_idle(600)
    steps = [
        (record.args[0], "start" if "training from" in record.msg else "end")
        for record in caplog.records
        if record.name == "backend.training.trainer" and ("training from" in record.msg or "wrote" in record.msg)
    ]
    assert sorted(steps) == [(36, "end"), (36, "start"), (37, "end"), (37, "start")]
    assert steps[0][0] == steps[1][0] and steps[2][0] == steps[3][0], steps  # each ended before the next began


def test_a_worker_told_to_stop_mid_training_stops_and_another_worker_trains(settings, shapes, sam_checkpoint, tmp_path):
    """A deploy SIGTERMs a queue worker while it trains: it stops between two steps instead of holding the stop up
    for the rest of the training (and being SIGKILLed with the training lost, the annotation count already reset);
    the training waits in the inbox, and the next worker trains."""
    server = RedisServer(tmp_path).start()
    pool = Workers(server.url, sam_checkpoint, tmp_path)
    try:
        queue_settings = replace(settings, inference="queue", redis_url=server.url)
        web = create_app(queue_settings, QueuePredictor(queue_settings, redis.Redis.from_url(server.url))).test_client()
        pool.start(1, **training_worker_env(settings, TRAIN_STEPS="1000000"))  # a training that would run for hours
        for annotation_id, seed in zip((4101, 4102), (20, 21), strict=True):
            url, mask = shapes[seed]
            assert post_webhook(web, annotation_event("ANNOTATION_CREATED", 41, annotation_id, seed, url, mask))
        log = tmp_path / "worker0.log"
        deadline = time.monotonic() + 300
        while "project 41: training from" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        (first,) = pool.processes
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0, log.read_text()[-3000:]
        files = ProjectFiles(settings.model_dir, 41)
        (waiting,) = Inbox(files).pending()
        assert json.loads(waiting.read_text())["action"] == "START_TRAINING"
        assert web.get("/versions?project=41").json["versions"] == []

        pool.start(1, **training_worker_env(settings, TRAIN_STEPS="2"))
        deadline = time.monotonic() + 300
        while (listing := web.get("/versions?project=41").json)["training"]["last"] is None:
            assert time.monotonic() < deadline, listing
            time.sleep(0.5)
        assert listing["training"]["last"]["status"] == "trained", listing
        assert [version["name"] for version in listing["versions"]] == ["v1"] and not Inbox(files).pending()
    finally:
        pool.stop()
        server.stop()
