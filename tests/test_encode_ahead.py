"""Encoding ahead of the annotator: tasks Label Studio imports (TASKS_CREATED) are encoded in the background, below
clicks and pre-annotation, so their first click is a cache hit; an import of any size is one list on disk."""

from __future__ import annotations

import time
from dataclasses import replace

import redis
from rq import Queue, SimpleWorker
from rq.job import JobStatus

from backend.bookkeeping.coverage import EncodedImages
from backend.bookkeeping.imports import ImportedTask, ImportedTasks
from backend.cache.store import MemoryStore
from backend.http.server import create_app
from backend.inference.local import Predictor
from backend.inference.queue import (
    CLICK_LANE_SUFFIX,
    ENCODE_AHEAD_JOB,
    ENCODE_QUEUE,
    ENCODE_SCHEDULED_KEY,
    INTERACTIVE_JOB,
    INTERACTIVE_QUEUE,
    LEARN_JOB,
    TRAINING_QUEUE,
    QueuePredictor,
    schedule_import_encoding,
)
from backend.project_files import ProjectFiles
from backend.worker import jobs
from backend.worker.runner import ClaimingQueue, worker_queues
from tests.assets import cached_embedding_bytes, encode, encodes_logged, recorded, smooth_object_image
from tests.conftest import make_client

IMPORTED_IMAGES = 4  # of the recording's five tasks: the 512x384 one is on a host these tests do not serve


def click_task_1(client):
    return client.post("/predict", json=recorded("04-predict-interactive-keypoints.json"))


def test_a_task_imported_by_webhook_is_a_cache_hit_on_its_first_click(settings, redis_url, caplog):
    client, predictor = make_client(replace(settings, redis_url=redis_url))
    caplog.set_level("INFO")
    response = client.post("/webhook", json=recorded("12-webhook-tasks-created.json"))
    assert response.status_code == 200
    assert response.json == {"status": "queued", "action": "TASKS_CREATED", "project": 1}
    assert predictor.ahead.wait_idle(300)
    assert encodes_logged(caplog.records) == IMPORTED_IMAGES
    first_click = click_task_1(client)
    assert first_click.status_code == 200
    assert first_click.headers["X-Embedding-Cache"] == "hit"
    assert encodes_logged(caplog.records) == IMPORTED_IMAGES
    # The same import again: every image is cached, none is encoded twice.
    client.post("/webhook", json=recorded("12-webhook-tasks-created.json"))
    assert predictor.ahead.wait_idle(300)
    assert encodes_logged(caplog.records) == IMPORTED_IMAGES


def test_without_the_import_the_first_click_is_a_miss(settings, redis_url):
    """The control of the test above: the recorded click's image is not cached by anything else."""
    client, _ = make_client(replace(settings, redis_url=redis_url))
    assert click_task_1(client).headers["X-Embedding-Cache"] == "miss"


def test_imported_tasks_are_encoded_on_a_worker_and_the_first_click_hits(settings, queue_redis, workers, label_studio):
    web_settings = replace(settings, inference="queue", redis_url=queue_redis.url, predict_deadline_s=60)
    web = create_app(web_settings, QueuePredictor(web_settings, redis.Redis.from_url(queue_redis.url))).test_client()
    workers.start(
        1,
        MODEL_DIR=settings.model_dir,
        LABEL_STUDIO_URL=label_studio.url,
        LABEL_STUDIO_API_KEY=label_studio.legacy_token,
    )
    assert web.post("/webhook", json=recorded("12-webhook-tasks-created.json")).status_code == 200
    connection = redis.Redis.from_url(queue_redis.url)
    deadline = time.monotonic() + 300
    # The project's job chain ends (its key goes) once the list is done.
    while connection.exists(ENCODE_SCHEDULED_KEY.format(project=1)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ImportedTasks(ProjectFiles(settings.model_dir, 1)).pending()
    # The workers recorded the images they cached; the web tier, with no model, counts them in their cache.
    assert web.get("/status").json["encoded_images"] == {"1": {"images": IMPORTED_IMAGES, "encoded_now": 4}}
    assert click_task_1(web).headers["X-Embedding-Cache"] == "hit"


def test_a_worker_in_a_training_still_encodes_the_imported_tasks_on_its_click_lane(
    settings, queue_redis, workers, label_studio, tmp_path
):
    """A worker's main loop in a long job (a training, here a stand-in job that holds it for a minute) took no
    encoding ahead: with one worker, first clicks were cold for the whole training. Its click lane takes the
    encoding jobs meanwhile; the import is encoded while the long job still runs."""
    workers.start(
        1,
        MODEL_DIR=settings.model_dir,
        LABEL_STUDIO_URL=label_studio.url,
        LABEL_STUDIO_API_KEY=label_studio.legacy_token,
    )
    connection = redis.Redis.from_url(queue_redis.url)
    long_job = Queue(TRAINING_QUEUE, connection=connection).enqueue(time.sleep, 60, job_timeout=120)
    deadline = time.monotonic() + 30
    while long_job.get_status(refresh=True) != JobStatus.STARTED and time.monotonic() < deadline:
        time.sleep(0.1)
    assert long_job.get_status(refresh=True) == JobStatus.STARTED
    web_settings = replace(settings, inference="queue", redis_url=queue_redis.url)
    web = create_app(web_settings, QueuePredictor(web_settings, connection)).test_client()

    assert web.post("/webhook", json=recorded("12-webhook-tasks-created.json")).status_code == 200
    deadline = time.monotonic() + 50
    while connection.exists(ENCODE_SCHEDULED_KEY.format(project=1)) and time.monotonic() < deadline:
        time.sleep(0.2)

    assert long_job.get_status(refresh=True) == JobStatus.STARTED  # the training still holds the main loop
    assert not ImportedTasks(ProjectFiles(settings.model_dir, 1)).pending()
    assert web.get("/status").json["encoded_images"] == {"1": {"images": IMPORTED_IMAGES, "encoded_now": 4}}
    log = (tmp_path / "worker0.log").read_text()
    lane_lines = [line for line in log.splitlines() if f"{CLICK_LANE_SUFFIX}: {ENCODE_QUEUE}:" in line]
    assert len(lane_lines) >= IMPORTED_IMAGES


def test_a_click_queued_behind_encoding_jobs_is_taken_first(queue_redis):
    connection = redis.Redis.from_url(queue_redis.url)
    queues = worker_queues(connection)
    assert [queue.name for queue in queues][0] == INTERACTIVE_QUEUE
    encoding = [Queue(ENCODE_QUEUE, connection=connection).enqueue(ENCODE_AHEAD_JOB, project) for project in (1, 2)]
    click = Queue(INTERACTIVE_QUEUE, connection=connection).enqueue(INTERACTIVE_JOB, "digest", 1, None)
    taken = [ClaimingQueue.dequeue_any(queues, None, connection=connection)[0].id for _ in range(3)]
    assert taken == [click.id, *(job.id for job in encoding)]


def test_encoding_ahead_is_taken_before_waiting_webhook_events(queue_redis):
    """Each annotation queues a learn job: behind them, encoding ahead waited while the annotators worked, and the
    soak's first clicks were cold for half the walk. Encoding ahead goes first; the events wait on disk."""
    connection = redis.Redis.from_url(queue_redis.url)
    queues = worker_queues(connection)
    events = [Queue(TRAINING_QUEUE, connection=connection).enqueue(LEARN_JOB, 1, {"n": n}) for n in range(2)]
    encoding = Queue(ENCODE_QUEUE, connection=connection).enqueue(ENCODE_AHEAD_JOB, 1)
    taken = [ClaimingQueue.dequeue_any(queues, None, connection=connection)[0].id for _ in range(3)]
    assert taken == [encoding.id, *(job.id for job in events)]


def test_an_import_of_100000_tasks_is_one_list_on_disk_and_one_queued_job(settings, queue_redis):
    web_settings = replace(settings, inference="queue", redis_url=queue_redis.url)
    web = create_app(web_settings, QueuePredictor(web_settings, redis.Redis.from_url(queue_redis.url))).test_client()
    body = recorded("12-webhook-tasks-created.json")
    template = body["tasks"][0]
    for first in range(1, 100_001, 1000):
        body["tasks"] = [
            {**template, "id": task_id, "data": {"image": f"/data/upload/1/{task_id}.jpg"}}
            for task_id in range(first, first + 1000)
        ]
        assert web.post("/webhook", json=body).status_code == 200
    connection = redis.Redis.from_url(queue_redis.url)
    assert Queue(ENCODE_QUEUE, connection=connection).count == 1
    redis_bytes = sum(connection.memory_usage(key) or 0 for key in connection.scan_iter())
    assert redis_bytes < 64 * 1024
    imported = ImportedTasks(ProjectFiles(settings.model_dir, 1))
    assert imported.stored_bytes() < 100_000 * 64  # an id and a URL a task
    assert imported.take() == ImportedTask(1, "/data/upload/1/1.jpg")
    assert imported.take() == ImportedTask(2, "/data/upload/1/2.jpg")


def click(client, task_id: int, image_url: str):
    body = recorded("04-predict-interactive-keypoints.json")
    body["tasks"][0]["id"], body["tasks"][0]["data"]["image"] = task_id, image_url
    return client.post("/predict", json=body)


PROJECT_1_IMAGES = [
    "/data/upload/1/b2b9d834-car_1024x768.jpg",
    "/data/upload/1/e0d87ad7-car_640x480.jpg",
    "/data/upload/1/a5529614-car_400x300_exif6.png",
    "/data/upload/1/arc2017.jpg",
]


def test_a_click_encodes_the_next_tasks_and_skips_those_cached(settings, redis_url, caplog):
    """Tasks 1-4 imported earlier (their import's encoding done: the list's cursor at its end), task 3's image
    cached: a click on task 1 encodes task 2's image (PREFETCH_TASKS=2), not task 3's again nor task 4's."""
    client, predictor = make_client(replace(settings, redis_url=redis_url, prefetch_tasks=2))
    imported = ImportedTasks(ProjectFiles(settings.model_dir, 1))
    imported.append([ImportedTask(task_id, url) for task_id, url in enumerate(PROJECT_1_IMAGES, 1)])
    while imported.take() is not None:
        pass
    predictor.encode_url(PROJECT_1_IMAGES[2])
    caplog.set_level("INFO")
    assert click(client, 1, PROJECT_1_IMAGES[0]).headers["X-Embedding-Cache"] == "miss"
    assert predictor.ahead.wait_idle(300)
    assert encodes_logged(caplog.records) == 2  # task 1's image (the click's own) and task 2's
    assert click(client, 2, PROJECT_1_IMAGES[1]).headers["X-Embedding-Cache"] == "hit"
    assert predictor.ahead.wait_idle(300)
    assert encodes_logged(caplog.records) == 3  # the click on task 2 prefetched task 4: task 3's was cached
    assert click(client, 4, PROJECT_1_IMAGES[3]).headers["X-Embedding-Cache"] == "hit"


def test_the_tasks_after_a_task_are_found_in_a_long_list_in_ascending_id_order(tmp_path):
    imported = ImportedTasks(ProjectFiles(tmp_path, 1))
    assert imported.following(1, 3) == []
    ids = [1, 2, 5, 7, 8, 100, 101, 1000]
    imported.append([ImportedTask(task_id, "/data/upload/1/" + "x" * (task_id % 7)) for task_id in ids])
    for asked in (0, 1, 2, 3, 5, 6, 99, 100, 999, 1000, 2000):
        assert [task.id for task in imported.following(asked, 3)] == [i for i in ids if i > asked][:3]


def test_encoding_ahead_stops_before_it_would_evict_the_image_an_annotator_clicked(settings):
    """An in-process cache holding three embeddings: the clicked image's and one encoded ahead fit below its
    room fraction, a third would not, so encoding the imports ahead stops there and the clicked image stays cached
    (prefetch, which may evict, needs room for PREFETCH_TASKS + 2: docs/scaling.md)."""
    entry = cached_embedding_bytes(settings, 768, 1024)  # the clicked image's; the others' differ by a byte or two
    client, predictor = make_client(replace(settings, memory_cache_bytes=3 * entry + 512))
    assert click(client, 1, PROJECT_1_IMAGES[0]).headers["X-Embedding-Cache"] == "miss"
    ImportedTasks(ProjectFiles(settings.model_dir, 1)).append(
        [ImportedTask(task_id, url) for task_id, url in enumerate(PROJECT_1_IMAGES[1:], 2)]
    )
    predictor.encode_imports(1)
    assert predictor.ahead.wait_idle(300)
    assert predictor.store.describe()["used_bytes"] < 3 * entry  # two embeddings and the click's session
    assert ImportedTasks(ProjectFiles(settings.model_dir, 1)).pending()  # left for later, not dropped
    assert click(client, 1, PROJECT_1_IMAGES[0]).headers["X-Embedding-Cache"] == "hit"
    assert predictor.ahead.wait_idle(300)  # the click's prefetch, done before the next test counts encodes


def finished_run(client, project: int) -> dict:
    deadline = time.monotonic() + 300
    while (progress := client.get("/encode", query_string={"project": project}).json)["state"] in (
        "starting",
        "running",
    ) and time.monotonic() < deadline:
        time.sleep(0.2)
    return progress


def test_a_project_imported_before_the_backend_is_encoded_on_demand_once_and_its_clicks_hit(
    settings, redis_url, label_studio, caplog
):
    client, _ = make_client(replace(settings, redis_url=redis_url))
    caplog.set_level("INFO")
    images = [*PROJECT_1_IMAGES[:2], "/data/upload/1/missing.jpg"]
    project = label_studio.add_project(recorded("03-predict-batch.json")["label_config"], images)
    assert client.get("/encode", query_string={"project": project}).status_code == 404
    assert client.post("/encode", query_string={"project": project}).status_code == 202
    progress = finished_run(client, project)
    assert (progress["state"], progress["predicted"], progress["failed"]) == ("finished", 2, 1)
    assert encodes_logged(caplog.records) == 2
    # Run again (a resume walks the project again): the cached images are not encoded twice.
    assert client.post("/encode", query_string={"project": project}).status_code == 202
    assert finished_run(client, project)["state"] == "finished"
    assert encodes_logged(caplog.records) == 2
    assert click(client, 1, PROJECT_1_IMAGES[1]).headers["X-Embedding-Cache"] == "hit"


def test_status_counts_the_imported_images_whose_embedding_is_cached_now(settings, redis_url):
    client, predictor = make_client(replace(settings, redis_url=redis_url))
    assert client.get("/status").json["encoded_images"] == {}
    client.post("/webhook", json=recorded("12-webhook-tasks-created.json"))
    assert predictor.ahead.wait_idle(300)
    assert client.get("/status").json["encoded_images"] == {"1": {"images": 4, "encoded_now": 4}}
    assert click_task_1(client).headers["X-Embedding-Cache"] == "hit"  # a hit records nothing more
    keys, _ = EncodedImages(ProjectFiles(settings.model_dir, 1)).newest_keys(10)
    redis.Redis.from_url(redis_url).delete(keys[0])  # evicted, or its time to live ran out
    assert client.get("/status").json["encoded_images"] == {"1": {"images": 4, "encoded_now": 3}}


def test_status_in_queue_mode_counts_in_the_workers_cache_for_the_model_they_serve(settings, queue_redis, redis_url):
    """The workers cache in CACHE_REDIS_URL, not the queue's Redis; an image encoded by an earlier model is cached
    still but not counted: the newest entry names the model served."""
    web_settings = replace(settings, inference="queue", redis_url=queue_redis.url, cache_redis_url=redis_url)
    web = create_app(web_settings, QueuePredictor(web_settings, redis.Redis.from_url(queue_redis.url))).test_client()
    encoded = EncodedImages(ProjectFiles(settings.model_dir, 7))
    old, *served = ["sam:emb:vit_b-0000:" + "0" * 64] + [f"sam:emb:vit_b-1111:{n:064x}" for n in range(3)]
    for key in [old, *served]:
        encoded.record(key)
    cache, queue = redis.Redis.from_url(redis_url), redis.Redis.from_url(queue_redis.url)
    for key in [old, *served[:2]]:
        cache.set(key, b"embedding")
    queue.set(served[2], b"not the cache")
    assert web.get("/status").json["encoded_images"] == {"7": {"images": 3, "encoded_now": 2}}


def test_the_count_reads_a_bounded_sample_of_a_long_list(tmp_path):
    encoded = EncodedImages(ProjectFiles(tmp_path, 1))
    store = MemoryStore(1 << 20)
    for n in range(50):
        key = f"sam:emb:vit_b-1111:{n:064x}"
        encoded.record(key)
        if n % 2:
            store.set(key, b"e", 60)
    encoded.record("sam:emb:vit_b-1111:" + f"{49:064x}")  # encoded again: one image, counted once
    assert encoded.coverage(store, sample=10) == {"images": 9, "encoded_now": 5, "sampled": "the newest 10 entries"}
    assert encoded.coverage(store, sample=100) == {"images": 50, "encoded_now": 25}


def test_without_encode_on_import_an_import_encodes_nothing_until_a_request_prefetches(settings, redis_url, caplog):
    client, predictor = make_client(replace(settings, redis_url=redis_url, encode_on_import=False, prefetch_tasks=1))
    caplog.set_level("INFO")
    answer = client.post("/webhook", json=recorded("12-webhook-tasks-created.json")).json
    assert answer == {"status": "recorded", "action": "TASKS_CREATED", "project": 1}
    assert predictor.ahead.wait_idle(300)
    assert encodes_logged(caplog.records) == 0
    assert ImportedTasks(ProjectFiles(settings.model_dir, 1)).pending()  # recorded, for prefetch and /encode
    assert click_task_1(client).headers["X-Embedding-Cache"] == "miss"
    assert predictor.ahead.wait_idle(300)
    assert encodes_logged(caplog.records) == 2  # task 1's (the click's own) and task 2's: not the whole import
    assert client.get("/status").json["encoded_images"] == {"1": {"images": 2, "encoded_now": 2}}


def walk_images(media_root, count: int) -> list[str]:
    """`count` distinct task images served by the Label Studio stand-in."""
    for n in range(count):
        path = media_root / "upload" / "walk" / f"{n}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(smooth_object_image(320, 240, 100 + n)))
    return [f"/data/upload/walk/{n}.jpg" for n in range(count)]


def test_at_the_cache_bound_encoding_ahead_goes_on_and_first_clicks_still_hit(settings, media_root, caplog):
    """A cache with room for about 8 embeddings and a walk of 24 imported tasks: the import fills the cache, and
    each click's next tasks are still encoded ahead, evicting the images the annotator has left: every first click
    is a hit. Reaching the bound is logged once, not per click."""
    entry = cached_embedding_bytes(settings, 240, 320)
    client, predictor = make_client(replace(settings, memory_cache_bytes=int(8.5 * entry), prefetch_tasks=2))
    images = walk_images(media_root, 24)
    ImportedTasks(ProjectFiles(settings.model_dir, 1)).append(
        [ImportedTask(task_id, url) for task_id, url in enumerate(images, 1)]
    )
    caplog.set_level("INFO")
    predictor.encode_imports(1)
    assert predictor.ahead.wait_idle(300)
    first_clicks = []
    for task_id, url in enumerate(images, 1):
        first_clicks.append(click(client, task_id, url).headers["X-Embedding-Cache"])
        assert predictor.ahead.wait_idle(300)  # the annotator looks at the masks meanwhile
    assert predictor.store.used_bytes > 7 * entry  # the cache was full
    assert encodes_logged(caplog.records) == len(images)  # each image once: nothing evicted was needed again
    assert first_clicks == ["hit"] * len(images)
    assert sum("at its bound" in record.getMessage() for record in caplog.records) == 1


def encoding_jobs_run(connection: redis.Redis, caplog) -> int:
    """Schedule project 1's encoding ahead and work the encode queue in this process (50 jobs at most): how many
    jobs ran. One is right; a job that queues itself again runs until the cap."""
    schedule_import_encoding(connection, 1, 60, imports=True)
    caplog.set_level("INFO")
    SimpleWorker([Queue(ENCODE_QUEUE, connection=connection)], connection=connection).work(burst=True, max_jobs=50)
    return sum(": Job OK" in record.getMessage() for record in caplog.records)


def test_in_queue_mode_encoding_ahead_at_the_bound_does_not_queue_itself_again(
    settings, queue_redis, monkeypatch, caplog
):
    """Imported tasks left and no room in the worker's cache: the encoding job runs once and ends; the next click's
    prefetch or the next import queues it again."""
    entry = cached_embedding_bytes(settings, 768, 1024)
    predictor = Predictor(settings, MemoryStore(4 * entry))
    predictor.models.get(120)
    predictor.store.set("in use", bytes(int(3.8 * entry)), 600)  # what annotators opened fills the cache
    monkeypatch.setattr(jobs, "_predictor", predictor)
    ImportedTasks(ProjectFiles(settings.model_dir, 1)).append(
        [ImportedTask(task_id, url) for task_id, url in enumerate(PROJECT_1_IMAGES, 1)]
    )
    connection = redis.Redis.from_url(queue_redis.url)
    assert encoding_jobs_run(connection, caplog) == 1
    assert Queue(ENCODE_QUEUE, connection=connection).count == 0
    assert not connection.exists(ENCODE_SCHEDULED_KEY.format(project=1))
    assert ImportedTasks(ProjectFiles(settings.model_dir, 1)).pending()  # left for later, not dropped


def test_in_queue_mode_a_torn_last_import_line_does_not_queue_the_encoding_job_again(
    settings, queue_redis, monkeypatch, caplog
):
    """The soak tore the imported-task list's last line (a kill mid-append): `take` found nothing whole to take,
    `pending` still saw bytes past the cursor, and with room in the cache the job queued itself again and again until
    the next import repaired the line; ahead of the webhook events, that spin held them back too."""
    predictor = Predictor(settings, MemoryStore(1 << 30))
    predictor.models.get(120)
    monkeypatch.setattr(jobs, "_predictor", predictor)
    imported = ImportedTasks(ProjectFiles(settings.model_dir, 1))
    imported.append([ImportedTask(1, PROJECT_1_IMAGES[0])])
    assert imported.take() == ImportedTask(1, PROJECT_1_IMAGES[0])  # encoded already, say
    with open(imported.path, "ab") as handle:
        handle.write(b'{"id": 2, "ima')
    connection = redis.Redis.from_url(queue_redis.url)
    assert encoding_jobs_run(connection, caplog) == 1
    assert Queue(ENCODE_QUEUE, connection=connection).count == 0
    assert not imported.pending()
    imported.append([ImportedTask(2, PROJECT_1_IMAGES[1])])  # the next import is read whole
    assert imported.take() == ImportedTask(2, PROJECT_1_IMAGES[1])


def test_clicks_on_a_task_whose_next_images_are_cached_download_none_of_them(settings, redis_url, label_studio):
    """Ten clicks on task 1 with tasks 2-5's images cached: their images are recognised by URL, not downloaded
    again, and the coverage list does not grow."""
    client, predictor = make_client(replace(settings, redis_url=redis_url, prefetch_tasks=4))
    images = [*PROJECT_1_IMAGES, "/data/upload/1/voc.jpg"]
    ImportedTasks(ProjectFiles(settings.model_dir, 1)).append(
        [ImportedTask(task_id, url) for task_id, url in enumerate(images, 1)]
    )
    predictor.encode_imports(1)
    assert predictor.ahead.wait_idle(300)
    coverage = EncodedImages(ProjectFiles(settings.model_dir, 1)).path
    listed = coverage.read_bytes()
    before = len(label_studio.requests)
    for _ in range(10):
        assert click(client, 1, images[0]).headers["X-Embedding-Cache"] == "hit"
        assert predictor.ahead.wait_idle(300)
    downloads = [path for _, path, _ in label_studio.requests[before:] if path.split("?")[0] in images[1:]]
    assert downloads == []
    assert coverage.read_bytes() == listed
