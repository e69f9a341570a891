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
from dataclasses import replace

import pytest
import redis
import requests
from rq import Queue, Retry, Worker
from rq.job import Job
from rq.registry import StartedJobRegistry

from backend.images import ImageError
from backend.protocol.label_config import parse_label_config
from backend.protocol.results import TaskAnswer, decode_brush
from backend.protocol.server import create_app
from backend.worker import jobs
from backend.worker.client import (
    CLICK_LANE_SUFFIX,
    INTERACTIVE_QUEUE,
    PREANNOTATE_QUEUE,
    TRAINING_QUEUE,
    QueuePredictor,
    alive_workers,
)
from backend.worker.runner import HEARTBEAT_MARGIN_S, ClaimingQueue, ModelWorker
from tests.conftest import encode, recorded, smooth_object_image
from tests.services import WORKER_ENV, RedisServer, Workers, free_port, model_workers

LEASE_S = int(WORKER_ENV["WORKER_TTL"]) + HEARTBEAT_MARGIN_S  # the test workers' job lease


@pytest.fixture
def queue_redis(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def workers(queue_redis, sam_checkpoint, tmp_path):
    pool = Workers(queue_redis.url, sam_checkpoint, tmp_path)
    yield pool
    pool.stop()


@pytest.fixture
def web_settings(settings, queue_redis):
    return replace(settings, inference="queue", redis_url=queue_redis.url, predict_deadline_s=60, job_timeout_s=6)


@pytest.fixture
def web(web_settings):
    predictor = QueuePredictor(web_settings, redis.Redis.from_url(web_settings.redis_url))
    return create_app(web_settings, predictor).test_client()


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
    assert status["queued"] == {"sam-interactive": 0, "sam-preannotate": 0, "sam-training": 0}
    text = web.get("/metrics").get_data(as_text=True)
    assert "sam_workers_alive 1.0" in text and 'sam_queue_depth{queue="sam-interactive"} 0.0' in text


def test_no_worker_alive_answers_503_with_retry_advice(web, queue_redis):
    response = click(web)
    assert response.status_code == 503
    assert response.headers["Retry-After"] and "worker" in response.json["error"]


def test_bad_input_found_on_the_worker_comes_back_as_4xx_and_is_not_retried(web, workers, queue_redis):
    workers.start(1)
    body = recorded("04-predict-interactive-keypoints.json")
    body["params"]["context"]["result"][0]["value"]["x"] = 140.0
    response = web.post("/predict", json=body)
    assert response.status_code == 422 and "outside" in response.json["error"]
    queue = Queue(INTERACTIVE_QUEUE, connection=redis.Redis.from_url(queue_redis.url))
    assert queue.failed_job_registry.count == 0


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
    connection.set(jobs.IMAGE_KEY.format(digest=image.digest), image.data)
    # Bulk jobs wait first, then a click arrives; one worker then starts taking jobs.
    bulk = [
        predictor.preannotate_queue.enqueue(jobs.preannotate, [jobs.stored_url(image.digest)], config, None)
        for _ in range(3)
    ]
    click_job = predictor.interactive_queue.enqueue(
        jobs.interactive, image.digest, 1, recorded("04-predict-interactive-keypoints.json")["params"]["context"]
    )
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
        connection.set(jobs.IMAGE_KEY.format(digest=digests[-1]), data)
    bulk = predictor.preannotate_queue.enqueue(
        jobs.preannotate, [jobs.stored_url(digest) for digest in digests], config, None, job_timeout=600
    )
    workers.start(1, **grounding_env(grounding_dino_files))
    deadline = time.time() + 300
    while time.time() < deadline and bulk.get_status(refresh=True) != "started":
        time.sleep(0.1)
    context = recorded("04-predict-interactive-keypoints.json")["params"]["context"]
    click_job = predictor.interactive_queue.enqueue(jobs.interactive, digests[0], 1, context)
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
        predictor.connection.set(jobs.IMAGE_KEY.format(digest=digest), data)
        enqueued.append(
            predictor.preannotate_queue.enqueue(
                jobs.preannotate, [jobs.stored_url(digest)], config, None, job_timeout=timeout_s, retry=Retry(max=2)
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
