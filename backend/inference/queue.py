"""The web tier's side of INFERENCE=queue: fetch and hash images, enqueue jobs on RQ, wait for answers.

The web process loads no model. Interactive jobs go to their own queue, which every worker
empties before the pre-annotation queue, so a click never waits behind a bulk run; encoding ahead of the annotator
(imported tasks) has a fourth queue, taken last, holding at most one job per project (`schedule_import_encoding`).
A request that has no answer within PREDICT_DEADLINE, or finds no worker alive, answers 503 with retry advice.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation
from rq.job import Job, JobStatus
from rq.results import Result

from backend.bookkeeping.imports import ImportedTasks
from backend.cache.connection import BLOCKING_READ_S
from backend.cache.digests import ImageDigests
from backend.cache.store import MemoryStore, ResilientStore
from backend.config import Settings
from backend.deadline import NO_LIMIT, TimeLimit
from backend.decoders.serving import ProjectDecoders
from backend.errors import BackendError, DeadlineExceeded, ImageError, InferenceUnavailable
from backend.images import FetchedImage, FetchRules, ImageFetcher
from backend.inference.base import FETCH_THREADS, InteractiveFront, StepReport
from backend.outcomes import TaskPrediction
from backend.project_files import ProjectFiles
from backend.prompts.interactive import ContextPrompts
from backend.protocol.label_config import ProjectConfig, VideoConfig
from backend.protocol.results import TaskAnswer
from backend.protocol.video import VideoObject
from backend.training.service import ActiveLearning, LearningSettings, model_dir_stamp, publish_model_dir

log = logging.getLogger(__name__)

INTERACTIVE_QUEUE = "sam-interactive"
PREANNOTATE_QUEUE = "sam-preannotate"
# Encoding ahead of the annotator: taken when the clicks' and batches' are empty, before the webhook events. Below
# them, one learn job per annotation (and each training) kept the workers busy while the annotators clicked, and every
# first click was cold until the events ran out. It cannot hold the events back for long: at the cache's bound it
# encodes only the PREFETCH_TASKS images after each click, and below it no more than the bound has room for.
ENCODE_QUEUE = "sam-encode"
TRAINING_QUEUE = "sam-training"  # webhook events and trainings; taken when every other queue is empty
WORKER_QUEUES = (INTERACTIVE_QUEUE, PREANNOTATE_QUEUE, ENCODE_QUEUE, TRAINING_QUEUE)  # the order a worker takes them
ENCODE_SCHEDULED_KEY = "sam:encode-imports:{project}"  # set while a project's encoding job is queued or running
PREFETCH_KEY = "sam:prefetch:{project}"  # the image URLs that job encodes before the imported tasks
WORKER_KEY_PREFIX = "rq:worker:"
STATE_FALLBACK_BYTES = 16 * 1024 * 1024
IMAGE_KEY = "sam:img:{digest}"  # an image the web tier stored for the workers, by content hash
STORED_PREFIX = "redis-image:"  # how a job names such an image in place of its URL
# The functions a worker runs (backend.worker.jobs), named rather than imported: the web tier loads no model code.
INTERACTIVE_JOB = "backend.worker.jobs.interactive"
PREANNOTATE_JOB = "backend.worker.jobs.preannotate"
LEARN_JOB = "backend.worker.jobs.learn"
ENCODE_AHEAD_JOB = "backend.worker.jobs.encode_ahead"
ENCODE_BATCH_JOB = "backend.worker.jobs.encode_batch"
TRACK_VIDEO_JOB = "backend.worker.jobs.track_video"
CLICK_LANE_SUFFIX = "-clicks"  # a worker process's second, clicks-only loop registers under its name + this
BATCH_GROUP_META = "batch_group"  # jobs with the same value may share one model pass on a worker
MODEL_VERSION_FIELD = "model_version"  # in a worker's registration: the model_version its predictions carry


def preannotate_job(
    image_urls: list[str], config: ProjectConfig, project_id: int | None, deadline_at: float | None
) -> dict[str, object]:
    """RQ's enqueue options for a pre-annotation job (`backend.worker.jobs.preannotate`): its arguments by name,
    and in its meta the group it may be batched with on a worker, the jobs of one project, label config and
    deadline, whose images can share one GroundingDINO caption."""
    group = hashlib.sha256(repr((config, project_id, deadline_at)).encode()).hexdigest()[:24]
    kwargs = {"image_urls": image_urls, "config": config, "project_id": project_id, "deadline_at": deadline_at}
    return {"kwargs": kwargs, "meta": {BATCH_GROUP_META: group}}


def enqueue_learning(training_queue: Queue, settings: Settings, project_id: int, web_model_dir: dict | None) -> None:
    """A job that applies the project's recorded webhook events on a worker and trains it when that makes a training
    due; `web_model_dir` is the MODEL_DIR the events were recorded in (`model_dir_stamp`), which the worker checks."""
    training_queue.enqueue(
        LEARN_JOB,
        project_id,
        web_model_dir,
        job_timeout=settings.train_job_timeout_s,
        result_ttl=24 * 3600,
        failure_ttl=24 * 3600,
    )


def schedule_import_encoding(connection: redis.Redis, project_id: int, job_timeout_s: int, imports: bool) -> None:
    """Queue the project's encoding job unless one is queued or running already. The job encodes one prefetched or
    (`imports`: ENCODE_ON_IMPORT) imported task and queues itself again while tasks are left
    (`backend.worker.jobs.encode_ahead`), so an import of any size is one job in Redis."""
    if connection.set(ENCODE_SCHEDULED_KEY.format(project=project_id), b"1", nx=True, ex=4 * job_timeout_s):
        enqueue_import_encoding(connection, project_id, job_timeout_s, imports)


def enqueue_import_encoding(connection: redis.Redis, project_id: int, job_timeout_s: int, imports: bool) -> None:
    """Queue the project's encoding job; the caller holds ENCODE_SCHEDULED_KEY (and renews it). The job carries the
    web tier's ENCODE_ON_IMPORT, so the workers need not be given it."""
    connection.expire(ENCODE_SCHEDULED_KEY.format(project=project_id), 4 * job_timeout_s)
    Queue(ENCODE_QUEUE, connection=connection).enqueue(
        ENCODE_AHEAD_JOB, project_id, imports, job_timeout=job_timeout_s, result_ttl=0, failure_ttl=24 * 3600
    )


def stored_url(digest: str) -> str:
    """How a job names an image the web tier stored in Redis."""
    return STORED_PREFIX + digest


def _live_registrations(connection: redis.Redis, field: str) -> list[str]:
    """One entry per worker process whose registration has not expired (a killed worker's expires one lease after
    it died; click lanes are not counted): the value of `field` it registered, "" if none."""
    from rq import Worker

    keys = [key for key in Worker.all_keys(connection=connection) if not key.endswith(CLICK_LANE_SUFFIX)]
    if not keys:
        return []
    with connection.pipeline() as pipeline:
        for key in keys:
            pipeline.hmget(key, "pid", field)
        registrations = pipeline.execute()
    return [(value or b"").decode() for pid, value in registrations if pid is not None]


def _live_worker_versions(connection: redis.Redis) -> list[str]:
    """The model_version each live worker process published, "" if none."""
    return _live_registrations(connection, MODEL_VERSION_FIELD)


def alive_workers(connection: redis.Redis) -> int:
    """Worker processes whose registration has not expired."""
    return len(_live_worker_versions(connection))


def workers_on_host(connection: redis.Redis, hostname: str) -> int:
    """Live worker processes that registered from `hostname`: a container's own worker, for its health check."""
    return _live_registrations(connection, "hostname").count(hostname)


def served_model_versions(connection: redis.Redis) -> set[str]:
    """The model_versions the live workers' predictions carry, as each published it in its registration."""
    return {version for version in _live_worker_versions(connection) if version}


def _returned(result: Result) -> Any:
    """A successful job's return value; the refusal a job returns (a BackendError) is raised here. RQ keeps
    return values untyped (pickled): each caller knows which job function it sent."""
    value = result.return_value
    if isinstance(value, BackendError):
        raise value
    return value


class QueuePredictor(InteractiveFront):
    """Same surface as `Predictor` for the HTTP layer; the model half runs on the workers."""

    def __init__(self, settings: Settings, connection: redis.Redis, fetcher: ImageFetcher | None = None) -> None:
        self.settings = settings
        self.connection = connection
        self.fetcher = fetcher or ImageFetcher(FetchRules.of(settings))
        # Small state the web tier keeps (project-run progress); image embeddings live with the workers.
        self.store = ResilientStore(connection, MemoryStore(STATE_FALLBACK_BYTES), settings.redis_url)
        self._cache_store = (
            ResilientStore.from_url(settings.cache_url, MemoryStore(0))  # counted here, never stored in
            if settings.cache_url != settings.redis_url
            else self.store
        )
        self.digests = ImageDigests(self._cache_store, settings.embedding_ttl_s)  # the workers' encoding ahead reads
        self.interactive_queue = Queue(INTERACTIVE_QUEUE, connection=connection)
        self.preannotate_queue = Queue(PREANNOTATE_QUEUE, connection=connection)
        self.training_queue = Queue(TRAINING_QUEUE, connection=connection)
        self.encode_queue = Queue(ENCODE_QUEUE, connection=connection)
        self._served_version = settings.base_model_version
        self.decoders = ProjectDecoders(settings.model_dir, self.served_model_version, settings.model_version_pin)
        self.learning = ActiveLearning(
            LearningSettings.of(settings), None, self.decoders, dispatch=self._learn_on_a_worker
        )

    def served_model_version(self) -> str:
        """The model_version of the workers' predictions, which /setup and project runs must report too (Label
        Studio and project runs skip the tasks holding a prediction of that version). While no worker is alive or
        Redis is unreachable: the last one seen, or before any, this process's settings."""
        try:
            versions = served_model_versions(self.connection)
        except redis.RedisError as error:
            log.warning("Redis unreachable, reporting the workers' last model_version: %s", error)
            versions = set()
        if len(versions) > 1:
            log.warning(
                "workers serve different models %s: give every worker the same SAM_MODEL_TYPE and MODEL_VERSION",
                sorted(versions),
            )
        if versions:
            self._served_version = min(versions)
        return self._served_version

    def parallel_batches(self) -> int:
        """Two batches per live worker, so that no worker waits for its next one."""
        return 2 * max(alive_workers(self.connection), 1)

    def warm_up(self) -> None:
        """Nothing to load here (the workers hold the models); say which MODEL_DIR the workers must share, and
        hand on webhook events recorded earlier."""
        try:
            publish_model_dir(self.connection, self.settings)
        except redis.RedisError as error:  # each training job carries it too
            log.warning("MODEL_DIR not published for the workers to check, Redis unreachable: %s", error)
        self.learning.start()

    def _learn_on_a_worker(self, project_id: int) -> None:
        try:
            enqueue_learning(self.training_queue, self.settings, project_id, model_dir_stamp(self.settings))
        except redis.RedisError as error:
            # The events are on disk: the project's next webhook, or a restart of the web tier, hands them on.
            log.warning("project %d: webhook events recorded but not queued, Redis unreachable: %s", project_id, error)

    def encode_imports(self, project_id: int) -> None:
        try:
            schedule_import_encoding(
                self.connection, project_id, self.settings.job_timeout_s, self.settings.encode_on_import
            )
        except redis.RedisError as error:
            # The tasks are on disk: the project's next import or click hands them on.
            log.warning("project %d: imported tasks recorded but not queued, Redis unreachable: %s", project_id, error)

    def encode_batch(self, image_urls: Sequence[object], project_id: int | None = None) -> list[bool | BackendError]:
        """On a worker, from the encoding queue (below clicks and pre-annotation); the worker fetches the images."""
        return self._run(self.encode_queue, [], ENCODE_BATCH_JOB, list(image_urls), project_id)

    def track_video(
        self,
        video_url: object,
        objects: Sequence[VideoObject],
        config: VideoConfig,
        limit: TimeLimit,
        on_step: StepReport | None = None,
    ) -> list[dict]:
        """On a worker, from the pre-annotation queue (below clicks); the worker downloads the video itself: a video
        is too large to hand over through Redis as images are."""
        return self._run(
            self.preannotate_queue, [], TRACK_VIDEO_JOB, video_url, list(objects), config, limit.wall_clock()
        )

    def cache_store(self) -> ResilientStore:
        """The workers' cache: CACHE_REDIS_URL when set, else the queue's Redis."""
        return self._cache_store

    def prefetch(self, project_id: int, task_id: int) -> None:
        following = ImportedTasks(ProjectFiles(self.settings.model_dir, project_id)).following(
            task_id, self.settings.prefetch_tasks
        )
        if not following:
            return
        key = PREFETCH_KEY.format(project=project_id)
        try:
            with self.connection.pipeline() as pipeline:  # the tasks after the newest request replace the others
                pipeline.delete(key)
                pipeline.rpush(key, *(task.image_url for task in following))
                pipeline.expire(key, 4 * self.settings.job_timeout_s)
                pipeline.execute()
        except redis.RedisError as error:
            log.warning("project %d: nothing prefetched, Redis unreachable: %s", project_id, error)
            return
        self.encode_imports(project_id)

    def status(self) -> dict:
        # The embeddings are cached by the workers, which each log their cache at start-up.
        where = {"inference": "queue", "cache": "on the workers", "redis_url": self.store.url}
        if not self.store.reachable_now():  # at once, rather than one socket time-out per count below
            return {**where, "redis_reachable": False, "redis_error": self.store.redis_error}
        try:
            return {
                **where,
                "redis_reachable": True,
                "workers": alive_workers(self.connection),
                "queued": {
                    INTERACTIVE_QUEUE: self.interactive_queue.count,
                    PREANNOTATE_QUEUE: self.preannotate_queue.count,
                    TRAINING_QUEUE: self.training_queue.count,
                    ENCODE_QUEUE: self.encode_queue.count,
                },
                "failed_jobs": self.interactive_queue.failed_job_registry.count
                + self.preannotate_queue.failed_job_registry.count,
            }
        except redis.RedisError as error:
            return {**where, "redis_reachable": False, "redis_error": type(error).__name__}

    def predict_for_image(
        self,
        image: FetchedImage,
        task_id: object,
        prompts: ContextPrompts,
        project_id: int | None = None,
        config: ProjectConfig | None = None,
    ) -> TaskPrediction:
        """The model half runs on a worker, from the image stored in Redis."""
        return self._run(
            self.interactive_queue, [image], INTERACTIVE_JOB, image.digest, task_id, prompts, project_id, config
        )

    def predict_batch(
        self,
        image_urls: Sequence[object],
        config: ProjectConfig,
        project_id: int | None = None,
        limit: TimeLimit = NO_LIMIT,
    ) -> list[TaskAnswer | BackendError]:
        """Pre-annotation on the low-priority queue, one job per chunk of GROUNDING_DINO_BATCH images: each
        chunk's images are fetched here side by side, stored in Redis and let go before the next chunk's, so
        the web tier holds one chunk at a time. The workers run the same pass as the local mode and send back
        each task's Label Studio JSON. The jobs carry the limit, so a worker starts no step past it: `limit`
        (PREDICT_DEADLINE at most) for a request, and for work without one (a project run, a task open going on
        in the background) as long as the chunks take one after another on one worker, each stopped by
        JOB_TIMEOUT. A chunk still queued or running at the limit gives its tasks DeadlineExceeded, as the
        local mode's chunks past the deadline do, so that "Retrieve predictions" hands them to the project's
        background run; a chunk that failed or found no worker gives them the reason, raised when no chunk is
        answered at all."""
        chunk = max(self.settings.grounding_dino_batch, 1)
        if math.isinf(limit.expires_at):
            waited = TimeLimit(self.settings.job_timeout_s * math.ceil(len(image_urls) / chunk))
            late = DeadlineExceeded(
                f"the workers did not answer within {waited.seconds:.0f} s (JOB_TIMEOUT for each chunk of "
                "GROUNDING_DINO_BATCH images); a task left without a prediction is tried again by the next run"
            )
        else:
            waited = TimeLimit(min(limit.remaining(), self.settings.predict_deadline_s))
            late = waited.exceeded()
        # Per chunk: each task's error, or None for an image sent in the chunk's job.
        sent: list[tuple[list[BackendError | None], Job | None]] = []
        for first in range(0, len(image_urls), chunk):
            urls = image_urls[first : first + chunk]
            if waited.expired():
                sent.append(([late] * len(urls), None))
                continue
            with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(urls))) as pool:
                loaded = list(pool.map(self._fetch_or_error, urls))
            images = [item for item in loaded if not isinstance(item, ImageError)]
            stored = [stored_url(image.digest) for image in images]
            job = (
                self._enqueue(
                    self.preannotate_queue,
                    images,
                    PREANNOTATE_JOB,
                    **preannotate_job(stored, config, project_id, waited.wall_clock()),
                )
                if images
                else None
            )
            sent.append(([item if isinstance(item, ImageError) else None for item in loaded], job))
        outcomes: list[TaskAnswer | BackendError] = []
        unanswered: list[InferenceUnavailable] = []
        for slots, job in sent:
            answers: list[TaskAnswer | BackendError] = []
            if job is not None:
                try:
                    answers = self._chunk_answers(job, waited, late)
                except (InferenceUnavailable, BackendError) as error:
                    if isinstance(error, InferenceUnavailable):
                        unanswered.append(error)
                    answers = [error] * slots.count(None)
            found = iter(answers)
            outcomes += [slot if slot is not None else next(found) for slot in slots]
        if unanswered and len(unanswered) == sum(job is not None for _, job in sent):
            raise unanswered[0]
        return outcomes

    def _chunk_answers(self, job: Job, waited: TimeLimit, late: DeadlineExceeded) -> list[TaskAnswer | BackendError]:
        """A chunk job's answers; looked up once more past the limit, for a chunk answered while earlier ones
        were awaited. Past the limit without an answer: `late` while the job waits or runs (a job
        still queued is cancelled, as its limit has passed), InferenceUnavailable when it failed or no worker
        is alive."""
        if not waited.expired():
            try:
                return self._wait(job, waited.expires_at)
            except InferenceUnavailable:
                if not waited.expired():  # lost, failed or no worker alive: said before the limit
                    raise
        result = job.latest_result()
        if result is not None and result.type == Result.Type.SUCCESSFUL:
            return _returned(result)
        try:
            status = job.get_status(refresh=True)
            if status == JobStatus.QUEUED:
                job.cancel()
        except (InvalidJobOperation, redis.RedisError):
            status = None
        if status in (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
            raise late
        raise InferenceUnavailable(f"no answer from the workers within {waited.seconds:.0f} s")

    def _fetch_or_error(self, url: object) -> FetchedImage | ImageError:
        try:
            return self.fetcher.fetch(url)  # type: ignore[arg-type]  # fetch answers a 400 for what is no URL
        except ImageError as error:
            return error

    def _run(self, queue: Queue, images: list[FetchedImage], function, *args):
        """Store the images for the workers, enqueue `function(*args)` and wait for its answer."""
        deadline = time.monotonic() + self.settings.predict_deadline_s
        return self._wait(self._enqueue(queue, images, function, *args), deadline)

    def _enqueue(
        self, queue: Queue, images: list[FetchedImage], function: str, *args: object, **options: object
    ) -> Job:
        """Store the images for the workers and enqueue `function(*args)` (with RQ's `options`: kwargs, meta)."""
        try:
            if not alive_workers(self.connection):
                raise InferenceUnavailable("no inference worker is running; start `python -m backend worker`")
            with self.connection.pipeline() as pipeline:
                for image in images:
                    key = IMAGE_KEY.format(digest=image.digest)
                    pipeline.set(key, image.data, ex=self.settings.job_timeout_s * 4, nx=True)
                pipeline.execute()
            return queue.enqueue(
                function,
                *args,
                job_timeout=self.settings.job_timeout_s,
                retry=Retry(max=2),
                result_ttl=60,
                failure_ttl=24 * 3600,
                **options,  # RQ's own enqueue keywords: the job's kwargs and meta
            )
        except redis.RedisError as error:
            log.warning("Redis error while queueing an inference job", exc_info=True)
            raise InferenceUnavailable(f"the job queue (Redis) is unreachable: {type(error).__name__}") from error

    def _wait(self, job: Job, deadline: float) -> Any:
        """The job's return value, waited for until `deadline` (monotonic); InferenceUnavailable if none comes."""
        while (left := deadline - time.monotonic()) > 0:
            result = job.latest_result(timeout=max(1, min(int(left), BLOCKING_READ_S)))
            if result is not None and result.type == Result.Type.SUCCESSFUL:
                return _returned(result)
            try:
                status = job.get_status(refresh=True)
            except InvalidJobOperation as error:  # RQ's word for a job whose hash is gone
                raise InferenceUnavailable(
                    f"inference job {job.id} was lost (Redis restarted?); send it again"
                ) from error
            if status == JobStatus.FAILED:
                raise InferenceUnavailable(f"inference job {job.id} failed on the worker; see the worker's log")
            # A dead worker's registration lapses one lease after its last renewal: from then on no worker holds
            # the job or can take it, and waiting out the deadline would only delay the same 503.
            if status != JobStatus.FINISHED and not alive_workers(self.connection):
                raise InferenceUnavailable(
                    f"no inference worker is alive to run job {job.id} (the last one stopped); "
                    "start `python -m backend worker`"
                )
        raise InferenceUnavailable(f"no answer from the workers within {self.settings.predict_deadline_s:.0f} s")
