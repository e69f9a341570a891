"""INFERENCE=queue: real worker processes on the suite's own redis-server, with their faults."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from urllib.parse import urlparse

import pytest
import redis
import requests
import yaml
from rq import Queue, Retry, Worker, worker_registration
from rq.job import Job
from rq.registry import CanceledJobRegistry, StartedJobRegistry

from backend.app import make_predictor
from backend.cache.connection import SOCKET_TIMEOUT_S, redis_client
from backend.errors import ImageError
from backend.http.server import create_app
from backend.inference.queue import (
    CLICK_LANE_SUFFIX,
    IMAGE_KEY,
    INTERACTIVE_QUEUE,
    PREANNOTATE_JOB,
    PREANNOTATE_QUEUE,
    TRAINING_QUEUE,
    QueuePredictor,
    alive_workers,
    preannotate_job,
    stored_url,
)
from backend.prompts.interactive import ContextPrompts, read_context
from backend.protocol.label_config import parse_label_config
from backend.protocol.results import TaskAnswer
from backend.worker import jobs
from backend.worker.runner import HEARTBEAT_MARGIN_S, ClaimingQueue, ClickLane, ModelWorker
from tests.assets import decode_brush, encode, recorded, smooth_object_image
from tests.services import REPO, WORKER_ENV, RedisServer, Workers, free_port, model_workers

LEASE_S = int(WORKER_ENV["WORKER_TTL"]) + HEARTBEAT_MARGIN_S  # the test workers' job lease


@pytest.fixture
def web_settings(settings, queue_redis):
    return replace(settings, inference="queue", redis_url=queue_redis.url, predict_deadline_s=60, job_timeout_s=6)


@pytest.fixture
def web(web_settings):
    predictor = QueuePredictor(web_settings, redis.Redis.from_url(web_settings.redis_url))
    return create_app(web_settings, predictor).test_client()


def recorded_click() -> ContextPrompts:
    """The recorded click's context as the web tier hands it to a worker job."""
    return read_context(recorded("04-predict-interactive-keypoints.json")["params"]["context"], 100)


def click(web, x: float = 50.0):
    body = recorded("04-predict-interactive-keypoints.json")
    body["params"]["context"]["result"][0]["value"]["x"] = x
    return web.post("/predict", json=body)


def test_clicks_are_answered_by_a_worker_and_its_embedding_is_shared(web, workers):
    workers.start(1)
    first = click(web)
    assert first.status_code == 200, first.json
    assert first.headers["X-Embedding-Cache"] == "miss"
    (result,) = first.json["results"][0]["result"]
    assert decode_brush(result).shape == (768, 1024)
    second = click(web, 40.0)
    assert second.status_code == 200 and second.headers["X-Embedding-Cache"] == "hit"
    status = web.get("/status").json
    assert status["inference"] == "queue" and status["workers"] == 1
    assert status["queued"] == {"sam-interactive": 0, "sam-preannotate": 0, "sam-training": 0, "sam-encode": 0}
    text = web.get("/metrics").get_data(as_text=True)
    assert "sam_workers_alive 1.0" in text and 'sam_queue_depth{queue="sam-interactive"} 0.0' in text


def health_check(redis_url: str) -> subprocess.CompletedProcess:
    """The worker image's HEALTHCHECK command (docker/Dockerfile.worker)."""
    env = dict(os.environ, REDIS_URL=redis_url)
    command = [sys.executable, "-m", "backend", "worker", "--alive"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_a_worker_containers_health_check_passes_only_while_a_worker_of_its_own_host_is_registered(
    queue_redis, workers
):
    assert health_check(queue_redis.url).returncode == 1
    workers.start(1)
    healthy = health_check(queue_redis.url)
    assert healthy.returncode == 0 and "1 worker(s)" in healthy.stdout, healthy.stdout + healthy.stderr
    # Another container's worker does not make this one healthy.
    connection = redis.Redis.from_url(queue_redis.url)
    for key in Worker.all_keys(connection=connection):
        connection.hset(key, "hostname", "another-container")
    assert health_check(queue_redis.url).returncode == 1
    assert health_check("redis://127.0.0.1:1/0").returncode == 1


def test_no_worker_alive_answers_503_with_retry_advice(web, queue_redis):
    response = click(web)
    assert response.status_code == 503
    assert response.headers["Retry-After"] and "worker" in response.json["error"]


def test_bad_input_found_on_the_worker_comes_back_as_4xx_and_is_not_retried(web, workers, queue_redis):
    workers.start(1)
    body = recorded("05-predict-interactive-rectangle.json")
    # Turned half round about its top-left corner (20%, 30%), the rectangle reaches left of the image: only the
    # worker, which has the image's size, can tell.
    body["params"]["context"]["result"][0]["value"]["rotation"] = 180
    response = web.post("/predict", json=body)
    assert response.status_code == 422 and "outside" in response.json["error"]
    queue = Queue(INTERACTIVE_QUEUE, connection=redis.Redis.from_url(queue_redis.url))
    assert queue.finished_job_registry.count == 1 and queue.failed_job_registry.count == 0


def test_a_bad_context_is_refused_before_any_download_upload_or_job(web, workers, queue_redis, label_studio):
    workers.start(1)
    seen = len(label_studio.requests)
    response = click(web, x=140.0)
    assert response.status_code == 422 and "outside" in response.json["error"]
    assert [path for _, path, _ in label_studio.requests[seen:] if path.startswith("/data/")] == []
    connection = redis.Redis.from_url(queue_redis.url)
    queue = Queue(INTERACTIVE_QUEUE, connection=connection)
    assert queue.count == 0 and queue.finished_job_registry.count == 0 and queue.failed_job_registry.count == 0
    assert list(connection.scan_iter(IMAGE_KEY.format(digest="*"))) == []


def test_a_worker_killed_mid_job_has_its_job_finished_by_another(web, workers, queue_redis):
    workers.start(2)
    connection = redis.Redis.from_url(queue_redis.url)
    answer = {}
    request = threading.Thread(target=lambda: answer.update(response=click(web)))
    request.start()
    registry = StartedJobRegistry(INTERACTIVE_QUEUE, connection=connection)
    deadline = time.time() + 30
    while not registry.get_job_ids() and time.time() < deadline:
        time.sleep(0.005)
    (job_id,) = registry.get_job_ids()
    victim = next(w for w in Worker.all(connection=connection) if w.get_current_job_id() == job_id)
    os.kill(victim.pid, signal.SIGKILL)
    request.join(timeout=90)
    response = answer["response"]
    assert response.status_code == 200, response.json
    assert response.json["results"][0]["result"][0]["type"] == "brushlabels"
    finished = Job.fetch(job_id, connection=connection)
    assert finished.get_status() == "finished" and finished.worker_name != victim.name


def test_web_and_workers_reconnect_after_a_redis_restart(web, workers, queue_redis):
    workers.start(1)
    assert click(web).status_code == 200
    queue_redis.stop()
    down = click(web, 45.0)
    assert down.status_code == 503 and "Redis" in down.json["error"]
    queue_redis.start()
    workers.wait_alive()
    after = click(web, 55.0)
    assert after.status_code == 200, after.json


def grounding_env(files) -> dict[str, str]:
    return {
        "GROUNDING_DINO_CONFIG": str(files.config),
        "GROUNDING_DINO_CHECKPOINT": str(files.checkpoint),
        "GROUNDING_DINO_TEXT_ENCODER": str(files.text_encoder),
        "GROUNDING_DINO_IMAGE_SIZE": "128",
        "JOB_TIMEOUT": "60",
    }


def test_pre_annotation_runs_on_the_workers_and_bad_images_fail_alone(
    web_settings, workers, grounding_dino_files, label_studio
):
    workers.start(1, **grounding_env(grounding_dino_files))
    web_settings = replace(web_settings, job_timeout_s=120, predict_deadline_s=240)  # three images on 2 cores
    web = create_app(web_settings, QueuePredictor(web_settings, redis.Redis.from_url(web_settings.redis_url)))
    body = recorded("03-predict-batch.json")
    body["tasks"][3]["data"]["image"] = "/data/upload/1/missing.jpg"
    response = web.test_client().post("/predict", json=body)
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert results[3] == [] and [error["index"] for error in response.json["errors"]] == [3]
    for entry, size in zip(results[:3], [(1024, 768), (640, 480), (300, 400)], strict=True):
        brushes = [region for region in entry["result"] if region["type"] == "brushlabels"]
        assert brushes and all(decode_brush(region).shape == (size[1], size[0]) for region in brushes)
        assert {region["value"]["brushlabels"][0] for region in brushes} <= {"Car", "Wheel"}


def test_a_pre_annotation_through_a_worker_leaves_no_redis_value_larger_than_an_embedding(
    web_settings, workers, grounding_dino_files, queue_redis
):
    """The worker sends back Label Studio's JSON (RLE), not the full-size masks: three 1024x768 bool masks alone
    would make a 2.36 MB result, more than the image's 2.00 MiB embedding that the same Redis holds."""
    workers.start(1, **grounding_env(grounding_dino_files), MAX_OBJECTS="3")
    web_settings = replace(web_settings, job_timeout_s=120, predict_deadline_s=240)
    web = create_app(web_settings, QueuePredictor(web_settings, redis.Redis.from_url(web_settings.redis_url)))
    body = recorded("03-predict-batch.json")
    body["tasks"] = body["tasks"][:1]  # the 1024x768 image
    response = web.test_client().post("/predict", json=body)
    assert response.status_code == 200, response.json
    brushes = [region for region in response.json["results"][0]["result"] if region["type"] == "brushlabels"]
    assert brushes and all(decode_brush(region).shape == (768, 1024) for region in brushes)
    connection = redis.Redis.from_url(queue_redis.url)
    sizes = {key.decode(): connection.memory_usage(key, samples=0) for key in connection.scan_iter(count=1000)}
    assert any(key.startswith("sam:emb:") for key in sizes) and any(key.startswith("rq:results:") for key in sizes)
    others = {key: size for key, size in sizes.items() if not key.startswith("sam:emb:")}
    largest = max(others, key=others.get)
    assert others[largest] < 2.1 * 2**20, (largest, others[largest])


def test_clicks_go_ahead_of_waiting_pre_annotation_jobs(web_settings, workers, grounding_dino_files, queue_redis):
    connection = redis.Redis.from_url(queue_redis.url)
    predictor = QueuePredictor(web_settings, connection)
    config = parse_label_config(recorded("03-predict-batch.json")["label_config"])
    image = predictor.fetcher.fetch("/data/upload/1/b2b9d834-car_1024x768.jpg")
    connection.set(IMAGE_KEY.format(digest=image.digest), image.data)
    # Bulk jobs wait first, then a click arrives; one worker then starts taking jobs.
    bulk = [
        predictor.preannotate_queue.enqueue(
            PREANNOTATE_JOB, **preannotate_job([stored_url(image.digest)], config, None, None)
        )
        for _ in range(3)
    ]
    click_job = predictor.interactive_queue.enqueue(jobs.interactive, image.digest, 1, recorded_click())
    # Queue priority alone: without the clicks-only thread, one loop must take the click before any bulk job.
    workers.start(1, **grounding_env(grounding_dino_files), INTERACTIVE_THREAD="false")
    deadline = time.time() + 240
    while time.time() < deadline and not all(job.get_status(refresh=True) == "finished" for job in [*bulk, click_job]):
        time.sleep(0.5)
    assert click_job.get_status() == "finished" and all(job.get_status() == "finished" for job in bulk)
    for job in [*bulk, click_job]:
        job.refresh()
    assert click_job.ended_at <= min(job.started_at for job in bulk)


def test_a_click_is_answered_while_the_only_worker_runs_a_long_pre_annotation_job(
    web_settings, workers, grounding_dino_files, queue_redis
):
    connection = redis.Redis.from_url(queue_redis.url)
    predictor = QueuePredictor(web_settings, connection)
    config = parse_label_config(recorded("03-predict-batch.json")["label_config"])
    digests = []
    for seed in range(6):  # one job of six 1024x768 images: many clicks' worth of work
        data = encode(smooth_object_image(1024, 768, seed))
        digests.append(hashlib.sha256(data).hexdigest())
        connection.set(IMAGE_KEY.format(digest=digests[-1]), data)
    bulk = predictor.preannotate_queue.enqueue(
        PREANNOTATE_JOB,
        job_timeout=600,
        **preannotate_job([stored_url(digest) for digest in digests], config, None, None),
    )
    workers.start(1, **grounding_env(grounding_dino_files))
    deadline = time.time() + 300
    while time.time() < deadline and bulk.get_status(refresh=True) != "started":
        time.sleep(0.1)
    click_job = predictor.interactive_queue.enqueue(jobs.interactive, digests[0], 1, recorded_click())
    while time.time() < deadline and not all(job.get_status(refresh=True) == "finished" for job in (bulk, click_job)):
        time.sleep(0.2)
    assert click_job.get_status() == "finished" and bulk.get_status() == "finished"
    bulk.refresh()
    click_job.refresh()
    assert bulk.started_at < click_job.enqueued_at and click_job.ended_at < bulk.ended_at
    assert click_job.worker_name.endswith(CLICK_LANE_SUFFIX), click_job.worker_name
    assert alive_workers(connection) == 1  # the clicks-only loop is not counted as another worker


CAR_IMAGES = {  # path: (height, width) as the worker reads it
    "/data/upload/1/b2b9d834-car_1024x768.jpg": (768, 1024),
    "/data/upload/1/e0d87ad7-car_640x480.jpg": (480, 640),
    "/data/upload/1/a5529614-car_400x300_exif6.png": (400, 300),  # EXIF-rotated
}


def waiting_pre_annotation_jobs(predictor: QueuePredictor, images: list[bytes], timeout_s: int) -> list[Job]:
    """One single-image pre-annotation job per image, enqueued as the web tier does, while no worker runs."""
    config = parse_label_config(recorded("03-predict-batch.json")["label_config"])
    enqueued = []
    for data in images:
        digest = hashlib.sha256(data).hexdigest()
        predictor.connection.set(IMAGE_KEY.format(digest=digest), data)
        enqueued.append(
            predictor.preannotate_queue.enqueue(
                PREANNOTATE_JOB,
                job_timeout=timeout_s,
                retry=Retry(max=2),
                **preannotate_job([stored_url(digest)], config, None, None),
            )
        )
    return enqueued


def wait_finished(waiting: list[Job], bound_s: float = 300) -> None:
    deadline = time.time() + bound_s
    while time.time() < deadline and not all(job.get_status(refresh=True) == "finished" for job in waiting):
        time.sleep(0.5)
    for job in waiting:
        job.refresh()


def test_waiting_pre_annotation_jobs_run_as_one_batch_and_a_bad_image_fails_alone(
    web_settings, workers, grounding_dino_files, tmp_path
):
    predictor = QueuePredictor(web_settings, redis.Redis.from_url(web_settings.redis_url))
    images = [predictor.fetcher.fetch(path).data for path in CAR_IMAGES] + [b"not an image"]
    waiting = waiting_pre_annotation_jobs(predictor, images, timeout_s=120)
    workers.start(1, **grounding_env(grounding_dino_files), PREANNOTATE_BATCH="4")
    wait_finished(waiting)
    assert [job.get_status() for job in waiting] == ["finished"] * 4
    assert all(job.meta["batch"] == {"jobs": 4, "images": 4} for job in waiting)
    assert "batch of 4 jobs / 4 images (1 label configs)" in (tmp_path / "worker0.log").read_text()
    for job, size in zip(waiting, CAR_IMAGES.values(), strict=False):
        (answer,) = job.latest_result().return_value
        assert isinstance(answer, TaskAnswer)
        brushes = [region for region in answer.entry["result"] if region["type"] == "brushlabels"]
        assert brushes and all(decode_brush(region).shape == size for region in brushes)
        assert {region["value"]["brushlabels"][0] for region in brushes} <= {"Car", "Wheel"}
    (error,) = waiting[3].latest_result().return_value
    assert isinstance(error, ImageError) and error.status == 422


def test_jobs_a_worker_took_but_had_not_begun_come_back_when_it_dies(queue_redis):
    """A job a worker takes is never in its memory alone: taken off one of several queues it lies in RQ's
    intermediate list until the worker registers it, and it is registered already STARTED (RQ marks it only
    as it begins, and its clean-up of a dead worker's jobs re-enqueues STARTED ones alone: the first job of a
    batch, registered while the others were claimed, was lost). Here a worker takes three pre-annotation
    jobs as it does for a batch, its click lane takes a click, and both die before running any."""
    connection = redis.Redis.from_url(queue_redis.url)
    names = (INTERACTIVE_QUEUE, PREANNOTATE_QUEUE, TRAINING_QUEUE)
    queues = [ClaimingQueue(name, connection=connection) for name in names]
    interactive, preannotate, _ = queues
    waiting = [preannotate.enqueue(jobs.learn, project, retry=Retry(max=2)) for project in (1, 2, 3)]
    worker = ModelWorker(queues, connection=connection, preannotate_batch=3)
    first, queue = ClaimingQueue.dequeue_any(queues, None, connection=connection)
    assert (first.id, queue.name) == (waiting[0].id, PREANNOTATE_QUEUE)
    assert preannotate.intermediate_queue.get_job_ids() == [first.id]
    worker.prepare_execution(first)
    worker._claim_waiting(queue, 2)
    click = interactive.enqueue(jobs.learn, 4, retry=Retry(max=2))
    lane = ModelWorker([interactive], connection=connection)
    taken, _ = ClaimingQueue.dequeue_any([interactive], None, connection=connection)
    lane.prepare_execution(taken)
    for queue, taken_jobs in ((preannotate, waiting), (interactive, [click])):
        registry = StartedJobRegistry(queue.name, connection=connection)
        assert sorted(registry.get_job_ids(cleanup=False)) == sorted(job.id for job in taken_jobs)
        assert queue.get_job_ids() == [] and queue.intermediate_queue.get_job_ids() == []
        registry.cleanup(timestamp=time.time() + 3600)  # as another worker's maintenance, once the leases lapse
        assert sorted(queue.get_job_ids()) == sorted(job.id for job in taken_jobs)
        for job in taken_jobs:
            job.refresh()
            assert (job.get_status(), job.retries_left) == ("queued", 1), job.id


def test_a_job_a_worker_dies_holding_before_registering_it_comes_back(queue_redis):
    """Taken off one of the worker's three queues, a job lies in RQ's intermediate list until it is
    registered; a worker dying in between leaves it there, and RQ's maintenance re-enqueues it after a minute
    (RQ's own BLPOP over several queues left it nowhere but in the dead worker's memory)."""
    connection = redis.Redis.from_url(queue_redis.url)
    names = (INTERACTIVE_QUEUE, PREANNOTATE_QUEUE, TRAINING_QUEUE)
    queues = [ClaimingQueue(name, connection=connection) for name in names]
    job = queues[1].enqueue(jobs.learn, 1, retry=Retry(max=2))
    taken, queue = ClaimingQueue.dequeue_any(queues, None, connection=connection)  # and the worker dies
    intermediate = queue.intermediate_queue
    assert taken.id == job.id and queue.get_job_ids() == [] and intermediate.get_job_ids() == [job.id]
    other = ModelWorker(queues, connection=connection)
    other.clean_registries()  # another worker's maintenance sees the job in the list
    connection.set(intermediate.get_first_seen_key(job.id), time.time() - 120)  # and sees it again later
    other.clean_registries()
    assert queue.get_job_ids() == [job.id] and intermediate.get_job_ids() == []
    job.refresh()
    assert (job.get_status(), job.retries_left) == ("queued", 1)


def test_jobs_claimed_into_a_batch_by_a_killed_worker_are_finished_by_another(
    web_settings, workers, grounding_dino_files, queue_redis
):
    connection = redis.Redis.from_url(queue_redis.url)
    predictor = QueuePredictor(web_settings, connection)
    # A dead worker's claims hold for a lease (WORKER_TTL + 5 s), not the job timeout, which only bounds the batch.
    waiting = waiting_pre_annotation_jobs(predictor, [predictor.fetcher.fetch(path).data for path in CAR_IMAGES], 120)
    env = dict(grounding_env(grounding_dino_files), PREANNOTATE_BATCH="3")
    workers.start(1, **env)
    registry = StartedJobRegistry(PREANNOTATE_QUEUE, connection=connection)
    deadline = time.time() + 120
    while len(registry.get_job_ids(cleanup=False)) < 3 and time.time() < deadline:
        time.sleep(0.005)
    assert sorted(registry.get_job_ids(cleanup=False)) == sorted(job.id for job in waiting)
    leases = [score for _, score in connection.zrange(registry.key, 0, -1, withscores=True)]
    assert max(leases) <= time.time() + LEASE_S + 1, leases
    (victim,) = model_workers(connection)
    os.kill(victim.pid, signal.SIGKILL)
    workers.start(1, **env)
    wait_finished(waiting)
    assert [job.get_status() for job in waiting] == ["finished"] * 3
    assert all(job.worker_name != victim.name for job in waiting)
    assert all(job.meta["batch"]["jobs"] >= 1 for job in waiting)


def test_a_live_worker_keeps_its_jobs_past_one_lease(workers, queue_redis):
    """A lease lasts WORKER_TTL + 5 s and is renewed while the worker holds the job: neither a job that runs
    longer nor the job claimed behind it is taken for abandoned by the maintenance other workers run."""
    connection = redis.Redis.from_url(queue_redis.url)
    preannotate = Queue(PREANNOTATE_QUEUE, connection=connection)
    held_s = LEASE_S + 2
    sleepers = [preannotate.enqueue(time.sleep, held_s, job_timeout=60, retry=Retry(max=2)) for _ in range(2)]
    workers.start(1, PREANNOTATE_BATCH="2")
    registry = StartedJobRegistry(PREANNOTATE_QUEUE, connection=connection)
    deadline = time.time() + 120
    while len(registry.get_job_ids(cleanup=False)) < 2 and time.time() < deadline:
        time.sleep(0.01)
    claimed_at = time.time()
    while time.time() < deadline and not all(job.get_status(refresh=True) == "finished" for job in sleepers):
        registry.cleanup()  # what another worker's maintenance does, every half second
        time.sleep(0.5)
    assert time.time() - claimed_at > 2 * held_s - 1  # the second job waited its turn, claimed, past a lease
    for job in sleepers:
        job.refresh()
        assert (job.get_status(), job.retries_left) == ("finished", 2), job.id
    assert len({job.worker_name for job in sleepers}) == 1


def test_a_worker_held_up_past_its_lease_mid_job_is_counted_again_at_its_next_renewal(workers, queue_redis):
    """A worker whose process does not run for longer than its lease (a machine loaded far past its cores, as the
    soak's was) loses its registration. Its next renewal, while the same long job runs on, must register it again:
    renewing only the expiry left a registration of `last_heartbeat` alone, which the web tier does not count, and
    with the other worker's restart it answered 503 "no inference worker is running" while this one served on."""
    connection = redis.Redis.from_url(queue_redis.url)
    workers.start(1)
    process = workers.processes[0]
    long_job = Queue(PREANNOTATE_QUEUE, connection=connection).enqueue(time.sleep, 5 * LEASE_S, job_timeout=120)
    deadline = time.time() + 60
    while long_job.get_status(refresh=True) != "started" and time.time() < deadline:
        time.sleep(0.1)
    assert alive_workers(connection) == 1
    os.kill(process.pid, signal.SIGSTOP)
    try:
        deadline = time.time() + 3 * LEASE_S
        while alive_workers(connection) == 1 and time.time() < deadline:
            time.sleep(0.2)
        assert alive_workers(connection) == 0  # its registration expired
    finally:
        os.kill(process.pid, signal.SIGCONT)
    deadline = time.time() + LEASE_S  # renewals come every WORKER_TTL / 3
    while alive_workers(connection) == 0 and time.time() < deadline:
        time.sleep(0.2)
    assert long_job.get_status(refresh=True) == "started"  # still in the same job
    assert alive_workers(connection) == 1


def test_rq_dashboard_reads_the_same_redis(workers, queue_redis, tmp_path):
    """The job library's own dashboard, pointed at the backend's Redis, sees its queues, jobs and workers."""
    workers.start(1)
    connection = redis.Redis.from_url(queue_redis.url)
    waiting = Queue("sam-dashboard-check", connection=connection).enqueue(jobs.learn, 1)
    port = free_port()
    log = open(tmp_path / "rq-dashboard.log", "w")  # noqa: SIM115 (lives with the process)
    dashboard = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "rq-dashboard"),
            "--redis-url",
            queue_redis.url,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=log,
    )
    try:
        base = f"http://127.0.0.1:{port}/0/data"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                queues = requests.get(f"{base}/queues.json", timeout=5).json()["queues"]
                break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            raise AssertionError((tmp_path / "rq-dashboard.log").read_text())
        assert "sam-dashboard-check" in {queue["name"] for queue in queues}, queues
        listed_workers = requests.get(f"{base}/workers.json", timeout=5).json()["workers"]
        names = [worker["name"] for worker in listed_workers]
        assert len(names) == 2 and sum(name.endswith(CLICK_LANE_SUFFIX) for name in names) == 1, names
        assert INTERACTIVE_QUEUE in json.dumps(listed_workers), listed_workers
        listed = requests.get(f"{base}/jobs/sam-dashboard-check/queued/8/asc/1.json", timeout=5).json()["jobs"]
        assert [job["id"] for job in listed] == [waiting.id], listed
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=10)


def test_a_click_enqueued_after_the_only_worker_was_killed_answers_503_within_a_lease(web, workers, queue_redis):
    """The killed worker's registration outlives it by up to a lease, so the click is enqueued; the web tier then
    notices that no worker is alive to take it instead of waiting out PREDICT_DEADLINE (60 s here)."""
    workers.start(1)
    connection = redis.Redis.from_url(queue_redis.url)
    (victim,) = model_workers(connection)
    os.kill(victim.pid, signal.SIGKILL)
    assert alive_workers(connection) == 1
    started = time.monotonic()
    response = click(web)
    waited_s = time.monotonic() - started
    assert response.status_code == 503 and response.headers["Retry-After"], response.json
    assert "no inference worker is alive" in response.json["error"], response.json
    # It was enqueued, and no one runs it: it waits in the queue, or in RQ's intermediate list when the dead click
    # lane's blocking read was still registered in Redis.
    queue = Queue(INTERACTIVE_QUEUE, connection=connection)
    assert len(queue.get_job_ids() + queue.intermediate_queue.get_job_ids()) == 1
    assert waited_s < 2 * LEASE_S, waited_s


def outcome_while_paused(server: RedisServer, call: Callable[[], object]) -> tuple[bool, dict]:
    """Runs `call` in a thread while `server` is paused (SIGSTOP: the kernel still accepts connections, nothing
    answers them): whether it ended before the server was resumed, three socket time-outs later, and its value
    or Redis error."""
    outcome = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except redis.RedisError as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    server.pause()
    try:
        thread.start()
        thread.join(timeout=3 * SOCKET_TIMEOUT_S)
        ended_while_paused = not thread.is_alive()
    finally:
        server.resume()
    thread.join(timeout=60)
    return ended_while_paused, outcome


def test_a_hung_redis_costs_a_click_one_socket_timeout_not_its_thread(web_settings, queue_redis):
    """The web tier's client, made as `python -m backend` makes it, gives up on each command after its socket
    time-out, and the click answers 503."""
    web = create_app(web_settings, make_predictor(web_settings)).test_client()
    ended_while_paused, outcome = outcome_while_paused(queue_redis, lambda: click(web))
    assert ended_while_paused
    response = outcome["value"]
    assert response.status_code == 503 and response.headers["Retry-After"] and "Redis" in response.json["error"]


def test_a_worker_keeps_its_socket_timeout_whatever_its_ttl_and_a_hung_redis_fails_within_it(queue_redis):
    """RQ raises a worker connection's socket time-out to the worker's wait for a job plus 10 s (595 s with
    WORKER_TTL=600): a paused Redis then held a worker's threads for minutes. The worker's waits for a job stay
    below the backend's socket time-out instead, and a command on a paused Redis fails within it."""
    connection = redis_client(queue_redis.url)
    lane = ModelWorker([ClaimingQueue(INTERACTIVE_QUEUE, connection=connection)], connection=connection, worker_ttl=600)
    assert lane.dequeue_timeout < SOCKET_TIMEOUT_S
    ended_while_paused, outcome = outcome_while_paused(queue_redis, lane.connection.ping)
    assert ended_while_paused and isinstance(outcome.get("error"), redis.TimeoutError), outcome


COMPOSE = REPO / "docker" / "docker-compose.yml"


def compose_services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_the_compose_file_gives_the_web_tier_and_the_workers_one_model_and_one_redis_layout():
    web, worker = (compose_services()[name]["environment"] for name in ("web", "worker"))
    for name in ("SAM_MODEL_TYPE", "MODEL_VERSION", "REDIS_URL", "CACHE_REDIS_URL"):
        assert name in web and web[name] == worker.get(name), name


def test_the_shipped_redis_layout_keeps_every_queued_job_when_the_cache_overflows(
    web_settings, sam_checkpoint, grounding_dino_files, tmp_path
):
    """One redis-server per Redis of docker/docker-compose.yml, with its eviction policy; the one the workers cache
    embeddings in gets a small memory bound. Pre-annotation jobs wait while the cache is filled to three times its
    bound, then a worker (configured as the compose file configures it) runs them all."""
    services = compose_services()
    worker_env = services["worker"]["environment"]
    cache_host = urlparse(worker_env.get("CACHE_REDIS_URL", worker_env["REDIS_URL"])).hostname
    cache_bytes = 16 << 20  # room for the four 2 MiB embeddings the jobs store, and the keys written beside them
    servers = {}
    for name, service in services.items():
        if service.get("image", "").startswith("redis"):
            command = service["command"]
            policy = command[command.index("--maxmemory-policy") + 1]
            bound = cache_bytes if name == cache_host else 256 << 20
            directory = tmp_path / name
            directory.mkdir()
            servers[name] = RedisServer(directory, "--maxmemory", str(bound), "--maxmemory-policy", policy).start()
    pool = None
    try:

        def local(url: str) -> str:
            return servers[urlparse(url).hostname].url

        queue_url, cache_url = local(worker_env["REDIS_URL"]), servers[cache_host].url
        predictor = QueuePredictor(replace(web_settings, redis_url=queue_url), redis_client(queue_url))
        images = [encode(smooth_object_image(160, 120, seed)) for seed in range(4)]
        waiting = waiting_pre_annotation_jobs(predictor, images, timeout_s=120)
        cache = redis.Redis.from_url(cache_url)
        for index in range(3 * cache_bytes // (256 << 10)):
            cache.set(f"sam:emb:filler:{index}", os.urandom(256 << 10), ex=600)
        assert cache.info("stats")["evicted_keys"] > 0
        pool = Workers(queue_url, sam_checkpoint, tmp_path).start(
            1, **grounding_env(grounding_dino_files), CACHE_REDIS_URL=cache_url
        )
        wait_finished(waiting)
        assert [job.get_status() for job in waiting] == ["finished"] * 4
        assert all(isinstance(job.latest_result().return_value[0], TaskAnswer) for job in waiting)
        assert cache.keys("sam:emb:*") != [] and redis.Redis.from_url(queue_url).keys("sam:emb:*") == []
    finally:
        if pool is not None:
            pool.stop()
        for server in servers.values():
            server.stop()


def test_the_web_tier_reports_the_workers_model_version_so_a_second_project_run_imports_nothing(
    web_settings, workers, grounding_dino_files, label_studio
):
    workers_version = "sam-vit_h"
    assert web_settings.base_model_version != workers_version
    workers.start(1, **grounding_env(grounding_dino_files), MODEL_VERSION=workers_version)
    web_settings = replace(web_settings, job_timeout_s=120, predict_deadline_s=240)
    web = create_app(web_settings, make_predictor(web_settings)).test_client()
    images = ["/data/upload/1/e0d87ad7-car_640x480.jpg", "/data/upload/1/a5529614-car_400x300_exif6.png"]
    project = label_studio.add_project(recorded("03-predict-batch.json")["label_config"], images)
    setup = web.post("/setup", json={"project": f"{project}.1764087701"})
    assert setup.status_code == 200 and setup.json["model_version"] == workers_version
    assert web.get("/status").json["model_version"] == workers_version
    for run in range(2):
        assert web.post("/preannotate", json={"project": project}).status_code == 202
        deadline = time.time() + 300
        while (progress := web.get("/preannotate", query_string={"project": project}).json)["state"] in (
            "starting",
            "running",
        ) and time.time() < deadline:
            time.sleep(0.5)
        assert progress["state"] == "finished" and progress["model_version"] == workers_version, progress
        assert (progress["predicted"], progress["skipped"]) == ((2, 0) if run == 0 else (0, 2)), progress
    imported = label_studio.imported[project]
    assert len(imported) == 2 and {prediction["model_version"] for prediction in imported} == {workers_version}


def test_chunks_the_workers_have_not_answered_by_the_deadline_go_on_in_the_background_and_are_imported(
    web_settings, workers, grounding_dino_files, label_studio
):
    """ "Retrieve predictions" in queue mode: a chunk still waiting for a worker at PREDICT_DEADLINE is cancelled and
    its tasks handed to the project's background run, which imports their predictions, as in the local mode."""
    workers.start(1, **grounding_env(grounding_dino_files))
    (worker,) = workers.processes
    images = ["/data/upload/1/e0d87ad7-car_640x480.jpg", "/data/upload/1/a5529614-car_400x300_exif6.png"]
    project = label_studio.add_project(recorded("03-predict-batch.json")["label_config"], images)
    task_ids = [task["id"] for task in label_studio.projects[project]["tasks"]]
    body = recorded("03-predict-batch.json")
    body["project"] = f"{project}.1795623701"
    body["tasks"] = [{"id": task_id, "data": label_studio.task(task_id)["data"]} for task_id in task_ids]
    # The only worker paused (still registered: a lease outlives the deadline) leaves every chunk waiting.
    web_settings = replace(web_settings, predict_deadline_s=1, grounding_dino_batch=1, job_timeout_s=120)
    web = create_app(web_settings, make_predictor(web_settings)).test_client()
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        response = web.post("/predict", json=body)
        queue = Queue(PREANNOTATE_QUEUE, connection=redis.Redis.from_url(web_settings.redis_url))
        cancelled = CanceledJobRegistry(queue=queue).count
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert response.status_code == 503, response.json
    assert response.json["background"] == {
        "project": project,
        "tasks": task_ids,
        "progress": f"/preannotate?project={project}",
    }
    assert "PREDICT_DEADLINE" in response.json["error"] and "background" in response.json["error"]
    assert cancelled == len(task_ids)  # the batch's chunk jobs (one image each), not left for the worker
    deadline = time.time() + 300
    while len(label_studio.imported[project]) < len(task_ids) and time.time() < deadline:
        time.sleep(0.5)
    assert sorted(prediction["task"] for prediction in label_studio.imported[project]) == task_ids
    assert all(prediction["result"] for prediction in label_studio.imported[project])


def test_a_stopped_click_lane_takes_no_click_enqueued_after_its_stop(queue_redis):
    """The worker's click lane, stopped while it waits (the worker's SIGTERM), leaves before the process exits: a
    click enqueued next stays queued for a live worker instead of waiting in RQ's intermediate list for a minute."""
    connection = redis_client(queue_redis.url)
    clicks = ClaimingQueue(INTERACTIVE_QUEUE, connection=connection)
    main = ModelWorker([clicks], name="lane", connection=connection, worker_ttl=3)  # not started: only read
    lane = ClickLane([clicks], main=main, name="lane" + CLICK_LANE_SUFFIX, connection=connection, worker_ttl=3)
    lane.start("WARNING")

    def registered() -> bool:
        return lane.key.encode() in connection.smembers(worker_registration.REDIS_WORKER_KEYS)

    deadline = time.time() + 30
    while not registered() and time.time() < deadline:
        time.sleep(0.1)
    assert registered(), "the lane never registered"

    lane.stop(wait_s=5)

    assert not lane.thread.is_alive()
    job = clicks.enqueue("os.getcwd")
    time.sleep(3)  # longer than one of the lane's polls
    assert clicks.job_ids == [job.id] and connection.llen(clicks.intermediate_queue.key) == 0
    assert not registered()


FREED_HEAP_PROGRAM = """
import numpy as np
from backend.worker.runner import hand_back_freed_memory

def rss_mib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024

# Blocks below glibc's mmap threshold come from its arenas; the last one kept pins the heap's top, as a job's
# long-lived tensors do, so freeing the others leaves glibc's own trim of the top nothing to give back.
blocks = [np.ones(12_000, np.float64) for _ in range(4_000)]  # 384 MB in 96 KB blocks
kept = blocks[-1]
del blocks
freed = rss_mib()
hand_back_freed_memory()
print(freed, rss_mib())
"""


def test_a_worker_hands_the_memory_a_job_freed_back_to_the_system():
    """What a worker runs after each job that is not a click: 384 MB freed inside glibc's heap leave the RSS, instead
    of staying in the process for reuse."""
    done = subprocess.run(
        [sys.executable, "-c", FREED_HEAP_PROGRAM], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    freed, handed_back = map(float, done.stdout.split())
    assert freed - handed_back > 300, (freed, handed_back)
