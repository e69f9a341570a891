"""The functions RQ runs inside a worker process, against that process's loaded models.

A worker loads its models once (`install_predictor`); each job reads the image the web tier stored
in Redis by content hash, runs the model half of the prediction and returns plain data (a pre-annotation
job: each task's Label Studio JSON, kilobytes, never the full-size masks). Input
errors come back as values, not exceptions, so that RQ does not retry what can never succeed and
the web tier can answer the right 4xx. Pre-annotation jobs a worker claimed together
(`claimed_together`) share one batched model pass.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import redis
from rq import Queue, get_current_job
from rq.exceptions import DeserializationError
from rq.job import Job

from backend.bookkeeping.imports import ImportedTasks
from backend.cache.connection import get_bytes
from backend.deadline import TimeLimit
from backend.errors import (
    BackendError,
    BadRequest,
    ConfigError,
    DeadlineExceeded,
    ImageError,
    PromptError,
    VideoError,
)
from backend.images import FetchedImage, FetchRules, ImageFetcher
from backend.inference.encode_ahead import Step
from backend.inference.local import Predictor
from backend.inference.queue import (
    BATCH_GROUP_META,
    ENCODE_SCHEDULED_KEY,
    IMAGE_KEY,
    PREANNOTATE_JOB,
    PREFETCH_KEY,
    STORED_PREFIX,
    TRAINING_QUEUE,
    enqueue_import_encoding,
    enqueue_learning,
    schedule_import_encoding,
    stored_url,
)
from backend.outcomes import TaskPrediction
from backend.project_files import ProjectFiles
from backend.prompts.interactive import ContextPrompts
from backend.protocol.label_config import ProjectConfig, VideoConfig
from backend.protocol.results import TaskAnswer
from backend.protocol.video import VideoObject
from backend.training.service import check_model_dir

log = logging.getLogger(__name__)

_predictor: Predictor | None = None
_batch: PreannotateBatch | None = None


class StoredImageFetcher(ImageFetcher):
    """The worker's fetcher: images the web tier stored in the queue's Redis (where no cache entry can evict
    them while their job waits), by content hash."""

    def __init__(self, rules: FetchRules, queue_connection: redis.Redis) -> None:
        super().__init__(rules)
        self.queue_connection = queue_connection

    def fetch(self, url: str) -> FetchedImage:
        if not isinstance(url, str) or not url.startswith(STORED_PREFIX):
            return super().fetch(url)
        digest = url[len(STORED_PREFIX) :]
        data = get_bytes(self.queue_connection, IMAGE_KEY.format(digest=digest))
        if data is None:
            # The web tier stores the image before enqueuing; only an expired or flushed key lands here.
            raise ImageError("the image is no longer in Redis; send the request again", 503)
        return FetchedImage(url=url, data=data)


def _installed() -> Predictor:
    """The worker's predictor; RuntimeError for a job run where none was installed (not a model worker)."""
    if _predictor is None:
        raise RuntimeError("backend.worker.jobs runs in a model worker, which installs its predictor first")
    return _predictor


def install_predictor(predictor: Predictor, queue_connection: redis.Redis) -> None:
    """Called once by the worker before it takes jobs."""
    global _predictor
    predictor.fetcher = StoredImageFetcher(FetchRules.of(predictor.settings), queue_connection)
    _predictor = predictor


def _refusal(error: BackendError) -> BackendError:
    log.warning("job refused: %s", error)
    return error


def interactive(
    digest: str,
    task_id: object,
    prompts: ContextPrompts,
    project_id: int | None = None,
    config: ProjectConfig | None = None,
) -> TaskPrediction | BackendError:
    """Masks for prompts the web tier has read and checked (`InteractiveFront.read_context`)."""
    predictor = _installed()
    try:
        image = predictor.fetcher.fetch(stored_url(digest))
        return predictor.predict_for_image(image, task_id, prompts, project_id, config)
    except (ImageError, PromptError, ConfigError) as error:
        return _refusal(error)


def preannotate(
    image_urls: list[str], config: ProjectConfig, project_id: int | None = None, deadline_at: float | None = None
) -> list[TaskAnswer | BackendError] | BackendError:
    """Each task's answer; those not done by `deadline_at` (wall-clock time, the web tier's request deadline)
    get DeadlineExceeded."""
    predictor = _installed()
    job = get_current_job()
    if _batch is not None and job is not None and (outcome := _batch.outcome(job.id)) is not None:
        return outcome
    try:
        outcome = predictor.predict_batch(image_urls, config, project_id, TimeLimit.until_wall_clock(deadline_at))
    except (PromptError, ConfigError, ImageError) as error:
        return _refusal(error)
    if job is not None:
        _record_pass(job, jobs=1, images=len(image_urls))
    return outcome


def _record_pass(job: Job, jobs: int, images: int) -> None:
    """The job's meta says how large the model pass that answered it was, for operators (rq-dashboard)."""
    job.meta["batch"] = {"jobs": jobs, "images": images}
    job.save_meta()


@dataclass
class _Group:
    """Claimed jobs of one project, label config and deadline: their images can share one GroundingDINO caption."""

    config: ProjectConfig
    project_id: int | None
    deadline_at: float | None
    jobs: list[tuple[Job, list[str]]] = field(default_factory=list)  # with their image URLs
    ran: bool = False


class PreannotateBatch:
    """Pre-annotation jobs that a worker claimed together. The first job of a group to run computes the whole
    group in one `predict_batch`; the group's other jobs then return their share of it."""

    def __init__(self, claimed: list[Job]) -> None:
        self.groups: list[_Group] = []
        self._group_of: dict[str, _Group] = {}
        self._outcomes: dict[str, list[TaskAnswer | BackendError]] = {}
        by_key: dict[str, _Group] = {}
        for job in claimed:
            call = _preannotate_call(job)
            if call is None:
                continue
            key, urls, config, project_id, deadline_at = call
            group = by_key.get(key)
            if group is None:
                group = by_key[key] = _Group(config, project_id, deadline_at)
                self.groups.append(group)
            group.jobs.append((job, urls))
            self._group_of[job.id] = group

    @property
    def images(self) -> int:
        return sum(len(urls) for group in self.groups for _, urls in group.jobs)

    def outcome(self, job_id: str) -> list[TaskAnswer | BackendError] | None:
        """The job's share of its group's pass, running the pass if it has not run; None when the job is to run
        alone (not in the batch, or its group's pass failed)."""
        group = self._group_of.get(job_id)
        if group is None:
            return None
        if not group.ran:
            group.ran = True  # even if the pass raises: the group's other jobs then run alone
            self._run(group)
        return self._outcomes.pop(job_id, None)

    def _run(self, group: _Group) -> None:
        predictor = _installed()
        urls = [url for _, job_urls in group.jobs for url in job_urls]
        try:
            limit = TimeLimit.until_wall_clock(group.deadline_at)
            outcomes = iter(predictor.predict_batch(urls, group.config, group.project_id, limit))
        except (PromptError, ConfigError, ImageError) as error:
            # One job's refusal (its image expired from Redis, say) must not become the others': each runs alone.
            log.warning(
                "batched pre-annotation of %d jobs refused (%s); they run one at a time", len(group.jobs), error
            )
            return
        for job, job_urls in group.jobs:
            self._outcomes[job.id] = [next(outcomes) for _ in job_urls]
            _record_pass(job, jobs=len(group.jobs), images=len(urls))


def _preannotate_call(job: Job) -> tuple[str, list[str], ProjectConfig, int | None, float | None] | None:
    """A pre-annotation job's batch group and arguments (as `preannotate_job` enqueued them); None for any other
    job, or one whose data cannot be read (RQ fails it when it runs)."""
    try:
        group = job.meta.get(BATCH_GROUP_META)
        kwargs = job.kwargs
    except DeserializationError:
        return None
    if group is None or job.func_name != PREANNOTATE_JOB or not isinstance(kwargs.get("image_urls"), list):
        return None
    return group, kwargs["image_urls"], kwargs["config"], kwargs.get("project_id"), kwargs.get("deadline_at")


@contextlib.contextmanager
def claimed_together(claimed: list[Job]) -> Iterator[PreannotateBatch]:
    """While a worker performs the jobs it claimed together, their pre-annotation runs as one batch."""
    global _batch
    _batch = PreannotateBatch(claimed)
    try:
        yield _batch
    finally:
        _batch = None


def track_video(
    video_url: object, objects: list[VideoObject], config: VideoConfig, deadline_at: float | None = None
) -> list[dict] | BackendError:
    """A <Video> task's tracks, done by `deadline_at` (wall-clock time, the web tier's request deadline); with no
    objects, those the project's labels find (zero-click pre-annotation, on this worker's detector)."""
    try:
        return _installed().track_video(video_url, objects, config, TimeLimit.until_wall_clock(deadline_at))
    except (ImageError, VideoError, DeadlineExceeded, BadRequest, PromptError) as error:
        return _refusal(error)


def learn(project_id: int, web_model_dir: dict | None = None) -> dict | None:
    """Apply a project's recorded webhook events and, if that makes a training due, train it here. The job fails
    (ModelDirNotShared) if this worker's MODEL_DIR is not `web_model_dir`, where the web tier recorded them."""
    predictor = _installed()
    if web_model_dir is not None:
        check_model_dir(predictor.settings, web_model_dir)
    if not predictor.learning.apply(project_id):
        return None
    result = predictor.train_project(project_id)
    if result.status == "stopped":
        # The training waits in the inbox; another worker takes it up now rather than at the project's next webhook.
        job = get_current_job()
        if job is not None:
            training_queue = Queue(TRAINING_QUEUE, connection=job.connection)
            enqueue_learning(training_queue, predictor.settings, project_id, web_model_dir)
    return result.as_dict()


def encode_batch(image_urls: list[object], project_id: int | None = None) -> list[bool | BackendError]:
    """A whole-project encoding run's batch (`runs.encode`): each image's embedding cached, or its error."""
    return _installed().encode_batch(image_urls, project_id)


def encode_ahead(project_id: int, imports: bool = True) -> None:
    """Encode one image ahead of the annotator (a prefetched one, else the project's next imported task), then queue
    this job again while any is left: one job per image keeps clicks and batches, which the worker takes first, from
    waiting behind a whole import."""
    predictor = _installed()
    job = get_current_job()
    if job is None:
        raise RuntimeError("encode_ahead runs as an RQ job")
    connection = job.connection
    timeout_s = predictor.settings.job_timeout_s

    def prefetched() -> str | None:
        url = connection.lpop(PREFETCH_KEY.format(project=project_id))
        return url.decode() if isinstance(url, bytes) else None

    step = predictor.encode_ahead(project_id, prefetched, imports)
    if step is Step.ENCODED:
        enqueue_import_encoding(connection, project_id, timeout_s, imports)
        return
    connection.delete(ENCODE_SCHEDULED_KEY.format(project=project_id))
    # At the bound the imported tasks wait for the next prefetch (a click) or import: queueing again now would spin.
    # Else a task recorded after the list looked empty and before the key went would wait for the next import.
    if (
        step is Step.DONE
        and imports
        and ImportedTasks(ProjectFiles(predictor.settings.model_dir, project_id)).pending()
    ):
        schedule_import_encoding(connection, project_id, timeout_s, imports)
