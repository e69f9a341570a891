"""`python -m backend worker`: an RQ worker that loads the models once and keeps them.

It is RQ's SimpleWorker (jobs run in the worker process itself), because a forked job process would
start without the loaded models and must never fork after CUDA is initialised. Four changes to RQ:
- a dead worker and the jobs it held are noticed within seconds instead of minutes: short leases, which a
  thread renews while the worker holds jobs;
- a worker re-registers when Redis comes back empty after a restart, so the web tier still sees it;
- a job it takes is registered as this worker's and marked STARTED in one transaction (RQ marks it only
  when the job begins, and re-enqueues only the STARTED jobs of a dead worker: one killed in between lost
  the job);
- a job taken off several queues goes through RQ's intermediate list, as one taken off one queue does
  (ClaimingQueue), so it is never in the worker's memory alone.
Stops are announced to active learning (`training.ingest.interrupt_applying`): a warm or cold shutdown and a job's
time-out take back the attempt at the webhook event being applied, so that no deploy sets an event aside.
And two additions: a pre-annotation job takes along the pre-annotation jobs already waiting behind it, up
to PREANNOTATE_BATCH in all, so their images go through the models together; and a second RQ worker in a
thread of the same process (INTERACTIVE_THREAD), sharing the loaded models, takes clicks, so a click never waits
for a pre-annotation batch to finish, and, while the main loop is in a pre-annotation batch or a training, encoding
ahead too, so that the next tasks' first clicks stay warm meanwhile (a click then waits at most one image's encode).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable

import redis
from rq import Queue, SimpleWorker, worker_registration
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.job import Job
from rq.timeouts import BaseDeathPenalty, TimerDeathPenalty, UnixSignalDeathPenalty
from rq.utils import as_text
from rq.worker import WorkerStatus

from backend.cache.connection import BLOCKING_READ_S, SOCKET_TIMEOUT_S, redis_client
from backend.cache.locks import renewed
from backend.cache.store import make_store
from backend.config import Settings
from backend.errors import ModelDirNotShared
from backend.inference.local import Predictor
from backend.inference.queue import (
    CLICK_LANE_SUFFIX,
    ENCODE_QUEUE,
    INTERACTIVE_QUEUE,
    MODEL_VERSION_FIELD,
    PREANNOTATE_QUEUE,
    TRAINING_QUEUE,
    WORKER_QUEUES,
)
from backend.training.ingest import interrupt_applying
from backend.training.service import check_published_model_dir
from backend.worker import jobs

log = logging.getLogger(__name__)

HEARTBEAT_MARGIN_S = 5
LEASE_RENEWALS = 3  # per WORKER_TTL: a lease outlives a late renewal or two
DEQUEUE_POLL_S = 0.5  # an idle worker looks at its lower-priority queues this often
# Queues whose jobs take seconds to minutes: the click lane encodes ahead meanwhile.
LONG_JOB_QUEUES = (PREANNOTATE_QUEUE, TRAINING_QUEUE)


try:
    _MALLOC_TRIM: Callable[[int], int] | None = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # no glibc (musl, macOS): nothing to hand back this way
    _MALLOC_TRIM = None


def hand_back_freed_memory() -> None:
    """Give the heap memory that the job just done freed back to the system (glibc's `malloc_trim`). glibc keeps
    freed memory in its arenas for reuse: without this a worker's RSS swung by about 10 % from job to job and
    stayed near the largest job's; with it, RSS stays flat and lower (docs/scaling.md, "Memory"). It costs about
    10 ms after a job that freed 150 MB, so clicks, whose masks are small, are not followed by it."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class ClaimingQueue(Queue):
    """RQ's queue, except that a worker on several queues takes a job as RQ's worker on one queue does: LMOVE
    into the queue's intermediate list, from which the job is registered as the worker's. RQ's BLPOP over
    several queues held the job in the worker's memory alone until then, and a worker killed in that moment
    lost it; from the intermediate list RQ's maintenance re-enqueues it (after a minute)."""

    @classmethod
    def dequeue_any(
        cls,
        queues: Iterable[Queue],
        timeout: int | None,
        connection: redis.Redis,
        job_class: type[Job] | None = None,
        serializer=None,
        death_penalty_class=None,
    ) -> tuple[Job, Queue] | None:
        queues = list(queues)
        if len(queues) == 1:  # RQ's own single-queue dequeue already moves through the intermediate list
            return super().dequeue_any(queues, timeout, connection, job_class, serializer, death_penalty_class)
        fetch = functools.partial(
            cls._fetch_dequeued_job,
            connection,
            job_class=job_class,
            serializer=serializer,
            death_penalty_class=death_penalty_class,
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for queue in queues:  # in priority order: clicks first
                job_id = connection.lmove(queue.key, queue.intermediate_queue.key)
                if job_id is not None and (found := fetch(queue.key, as_text(job_id))) is not None:
                    return found
            if deadline is None:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise DequeueTimeout(timeout, [queue.key for queue in queues])
            # Block on the clicks' queue so that a click is taken the moment it arrives; the other queues are
            # looked at again within DEQUEUE_POLL_S.
            clicks = queues[0]
            wait_s = min(left, DEQUEUE_POLL_S)
            # redis-py types BLMOVE's timeout as int; Redis 6+ takes fractions of a second, as this poll needs.
            job_id = connection.blmove(clicks.key, clicks.intermediate_queue.key, wait_s)  # type: ignore[arg-type]
            if job_id is not None and (found := fetch(clicks.key, as_text(job_id))) is not None:
                return found


class AnnouncedTimeout(UnixSignalDeathPenalty):
    """RQ's job time-out, which first says so to active learning: a learn job that overran TRAIN_JOB_TIMEOUT while
    applying an event leaves it in the inbox, its attempt not counted."""

    def handle_death_penalty(self, signum, frame) -> None:
        interrupt_applying(f"the job overran its time-out ({self._timeout} s)", stopping=False)
        super().handle_death_penalty(signum, frame)


class ModelWorker(SimpleWorker):
    """RQ's SimpleWorker with the changes and the batching that the module docstring lists."""

    queue_class = ClaimingQueue
    death_penalty_class: type[BaseDeathPenalty] = AnnouncedTimeout

    def __init__(self, *args, preannotate_batch: int = 1, model_version: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.preannotate_batch = preannotate_batch
        self.model_version = model_version
        self.in_long_job = threading.Event()  # set while a job of LONG_JOB_QUEUES runs, read by the click lane

    def request_stop(self, signum, frame) -> None:
        """Warm shutdown (SIGTERM, SIGINT): the job in hand finishes, unless a SIGKILL comes first (`docker stop`'s
        ten seconds): either way the process ends by request."""
        interrupt_applying(f"the worker got {signal.Signals(signum).name} (warm shutdown)")
        super().request_stop(signum, frame)

    def request_force_stop(self, signum, frame) -> None:
        interrupt_applying(f"the worker got {signal.Signals(signum).name} again (cold shutdown)")
        super().request_force_stop(signum, frame)

    @property
    def lease_s(self) -> int:
        """How long this worker's registration and each job it holds last unless renewed."""
        return self.worker_ttl + HEARTBEAT_MARGIN_S

    @property
    def dequeue_timeout(self) -> int:
        # Each wait for a job is a blocking read, which must end before the connection's socket time-out.
        return min(super().dequeue_timeout, BLOCKING_READ_S)

    @property
    def connection_timeout(self) -> int:
        # RQ raises the connection's socket time-out to this; redis_client's already outlasts every blocking read,
        # and rounding down keeps it from being raised.
        return int(SOCKET_TIMEOUT_S)

    def serialize(self) -> dict:
        """RQ's registration, plus the model_version this worker's predictions carry, which the web tier reports
        as its own (`served_model_version`)."""
        return {**super().serialize(), MODEL_VERSION_FIELD: self.model_version}

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        # A lease lasts a few renewals (`_renew_leases`), not the job's timeout: jobs of a killed worker come
        # back within seconds, and the timeout alone says how long a job may run.
        return self.lease_s

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        timeout = timeout or self.lease_s
        super().heartbeat(timeout, pipeline=pipeline)
        if pipeline is None and not self._registered():
            log.warning(
                "worker %s: its registration was lost (Redis restarted, or the worker was held up past its lease); "
                "registering again",
                self.name,
            )
            self.connection.hset(self.key, mapping=self.serialize())
            self.connection.expire(self.key, timeout)
            worker_registration.register(self)

    def _registered(self) -> bool:
        """Whether the web tier counts this worker (`alive_workers`): listed, and its registration's hash whole. A
        heartbeat after the registration expired writes a hash of `last_heartbeat` alone, and the listing stays: the
        worker served on, uncounted, for good."""
        with self.connection.pipeline() as pipeline:
            pipeline.sismember(worker_registration.REDIS_WORKER_KEYS, self.key)
            pipeline.hexists(self.key, "pid")
            listed, whole = pipeline.execute()
        return bool(listed and whole)

    def prepare_execution(self, job: Job) -> Execution:
        """Register `job` as this worker's and mark it STARTED in one transaction (see the module docstring)."""
        with self.connection.pipeline() as pipeline:
            execution = self._take(job, pipeline)
            self.set_state(WorkerStatus.BUSY, pipeline=pipeline)
            pipeline.execute()
        return execution

    def _take(self, job: Job, pipeline) -> Execution:
        # Every job a worker takes comes through RQ's intermediate list (ClaimingQueue, RQ's own single-queue
        # dequeue, the batch claims); were it left there, RQ's clean-up of the list would retry or fail it too.
        intermediate = Queue(job.origin, connection=self.connection).intermediate_queue
        pipeline.lrem(intermediate.key, 1, job.id)
        pipeline.delete(intermediate.get_first_seen_key(job.id))
        execution = Execution.create(job, self.get_heartbeat_ttl(job), pipeline, worker_name=self.name)
        self.executions[execution.id] = execution
        job.prepare_for_execution(self.name, pipeline)
        return execution

    def execute_job(self, job: Job, queue: Queue) -> None:
        """As SimpleWorker, except that a pre-annotation job is performed together with the pre-annotation jobs
        claimed behind it: each still goes through RQ's own perform_job (results, retries, failures), and the
        first of a label config's jobs computes all of theirs in one batch."""
        batched = queue.name == PREANNOTATE_QUEUE and self.preannotate_batch > 1
        if queue.name in LONG_JOB_QUEUES:
            self.in_long_job.set()
        try:
            with renewed(self._renew_leases, self.worker_ttl / LEASE_RENEWALS, f"{self.name}'s job leases"):
                if batched:
                    self._perform_with_waiting(job, queue)
                else:
                    super().execute_job(job, queue)
        finally:
            self.in_long_job.clear()
        if batched:
            self.set_state(WorkerStatus.IDLE)
        if queue.name != INTERACTIVE_QUEUE:
            hand_back_freed_memory()

    def _perform_with_waiting(self, job: Job, queue: Queue) -> None:
        """`job` and the pre-annotation jobs claimed behind it, each through RQ's own perform_job."""
        claimed = [(job, self.prepare_execution(job)), *self._claim_waiting(queue, self.preannotate_batch - 1)]
        with jobs.claimed_together([each for each, _ in claimed]) as batch:
            if len(claimed) > 1:
                log.info(
                    "worker %s: batch of %d jobs / %d images (%d label configs)",
                    self.name,
                    len(claimed),
                    batch.images,
                    len(batch.groups),
                )
            for each, execution in claimed:
                self.perform_job(each, queue, execution)

    def _renew_leases(self) -> None:
        """This worker's registration and the lease of every job it holds (RQ's `executions`: the job running and
        those claimed behind it), as RQ's forking worker renews them from the parent of its job process."""
        self.heartbeat()  # not in the pipeline: it checks the registration is whole, and restores it if not
        with self.connection.pipeline() as pipeline:
            # A job that ends while this runs leaves only a stray last_heartbeat for one lease: the registries
            # are renewed only where the job still is (RQ's xx), and nothing reads an execution's hash otherwise.
            for execution in self.executions.copy().values():
                execution.heartbeat(execution.job.started_job_registry, self.lease_s, pipeline)
            pipeline.execute()

    def _claim_waiting(self, queue: Queue, limit: int) -> list[tuple[Job, Execution]]:
        """Up to `limit` jobs already waiting on `queue`; never waits for more, so a click that arrives meanwhile
        waits for one batch at most. A job is never only in this process's memory: LMOVE puts it in RQ's
        intermediate list, and one transaction moves it from there into the started registry as this worker's
        STARTED job. From either place another worker's maintenance re-enqueues it if this worker dies."""
        intermediate = queue.intermediate_queue
        job_ids: list[str] = []
        while len(job_ids) < limit and (job_id := self.connection.lmove(queue.key, intermediate.key)) is not None:
            job_ids.append(as_text(job_id))
        if not job_ids:
            return []
        claimed = []
        fetched = self.job_class.fetch_many(job_ids, self.connection, self.serializer)
        with self.connection.pipeline() as pipeline:
            for job_id, job in zip(job_ids, fetched, strict=True):
                if job is None:  # deleted while it waited; RQ's own dequeue skips these too
                    pipeline.lrem(intermediate.key, 1, job_id)
                else:
                    claimed.append((job, self._take(job, pipeline)))
            pipeline.execute()
        return claimed


class ClickLane(ModelWorker):
    """The worker's second loop, in a thread: clicks, and encoding ahead while `main` is in a long job. Without the
    latter a worker in a training encoded nothing ahead: with one worker, every first click during a training was
    cold, and in the soak the clicks after a worker restart that met a training on the other."""

    # SIGALRM, which RQ's default job time-out uses, reaches only the main thread: time jobs out with a timer.
    death_penalty_class = TimerDeathPenalty

    def __init__(self, *args, main: ModelWorker, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.main = main
        self.clicks_only = [queue for queue in self.queues if queue.name == INTERACTIVE_QUEUE]

    def queues_now(self) -> list[Queue]:
        """Clicks, and encoding ahead after them while the main loop is in a long job; clicks alone otherwise, so
        that a click does not wait behind an encode the main loop could have taken."""
        return list(self.queues) if self.main.in_long_job.is_set() else self.clicks_only

    def _install_signal_handlers(self) -> None:
        """Signals belong to the main worker, which stops this lane when it stops."""

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):
        """RQ's wait for a click (or an encode: `queues_now`), one poll (at most BLOCKING_READ_S) at a time, until a
        stop is asked: RQ's own wait never looks at a stop, so a lane about to exit could take a click that then
        waited in RQ's intermediate list until another worker's clean-up, a minute later."""
        self._ordered_queues = self.queues_now()
        if timeout is None:  # a burst's look, which does not wait
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        while not self._stop_requested:
            self._ordered_queues = self.queues_now()
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time=timeout)
            if result is not None:
                return result
        return None

    def stop(self, wait_s: float) -> None:
        """Finish the click in hand (up to `wait_s`) or the poll going on, then leave."""
        self._stop_requested = True
        self.thread.join(wait_s + BLOCKING_READ_S)
        if self.thread.is_alive():
            # Still in a click past its time: the process exits under it, so say goodbye on its behalf.
            self.register_death()

    def start(self, logging_level: str) -> None:
        self.thread = threading.Thread(
            target=self.work,
            kwargs={"logging_level": logging_level, "with_scheduler": False},
            name="click-lane",
            daemon=True,
        )
        self.thread.start()


class RoutineRqLines(logging.Filter):
    """RQ logs its registry clean-ups (every WORKER_MAINTENANCE_INTERVAL, per lane) and each result's time to live
    at INFO; nothing an operator acts on, so at DEBUG."""

    ROUTINE = ("Worker %s: cleaning ", "Worker %s: job %s result ")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(self.ROUTINE):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def worker_queues(connection: redis.Redis) -> list[ClaimingQueue]:
    """The queues a worker takes jobs from, in priority order: clicks, pre-annotation, encoding ahead, training."""
    return [ClaimingQueue(name, connection=connection) for name in WORKER_QUEUES]


def run_worker(settings: Settings, burst: bool = False) -> int:
    if not settings.redis_url:
        raise SystemExit("the worker needs REDIS_URL: it takes its jobs from Redis")
    logging.getLogger("rq.worker").addFilter(RoutineRqLines())
    connection = redis_client(settings.redis_url)
    try:
        check_published_model_dir(connection, settings)
    except ModelDirNotShared as error:
        raise SystemExit(f"the worker cannot start: {error}") from error
    predictor = Predictor(settings, make_store(settings.cache_url, settings.memory_cache_bytes))
    predictor.models.get(timeout_s=24 * 3600)  # load before announcing ourselves to the web tier
    jobs.install_predictor(predictor, connection)
    queues = worker_queues(connection)
    worker = ModelWorker(
        queues,
        connection=connection,
        worker_ttl=settings.worker_ttl_s,
        maintenance_interval=settings.worker_maintenance_s,
        preannotate_batch=settings.preannotate_batch,
        model_version=settings.base_model_version,
    )
    lane = None
    if settings.interactive_thread and not burst:
        lane = ClickLane(
            [queue for queue in queues if queue.name in (INTERACTIVE_QUEUE, ENCODE_QUEUE)],
            main=worker,
            name=worker.name + CLICK_LANE_SUFFIX,
            connection=connection,
            worker_ttl=settings.worker_ttl_s,
            maintenance_interval=settings.worker_maintenance_s,
        )
        lane.start(settings.log_level)
    log.info(
        "worker %s ready, taking jobs from %s%s",
        worker.name,
        [queue.name for queue in queues],
        f"; clicks also on {lane.name}" if lane else "",
    )
    try:
        worker.work(burst=burst, logging_level=settings.log_level, with_scheduler=False)
    finally:
        if lane is not None:
            lane.stop(wait_s=settings.job_timeout_s)
    return 0
