"""`python -m backend worker`: an RQ worker that loads the models once and keeps them.

It is RQ's SimpleWorker (jobs run in the worker process itself), because a forked job process would
start without the loaded models and must never fork after CUDA is initialised. Two changes to RQ's
defaults: a dead worker is noticed within seconds instead of minutes (short heartbeats), and a
worker re-registers when Redis comes back empty after a restart, so the web tier still sees it.
"""

from __future__ import annotations

import logging

import redis
from rq import Queue, SimpleWorker, worker_registration
from rq.job import Job

from backend.cache.store import make_store
from backend.config import Settings
from backend.predictor import Predictor
from backend.worker import jobs
from backend.worker.client import INTERACTIVE_QUEUE, PREANNOTATE_QUEUE, TRAINING_QUEUE

log = logging.getLogger(__name__)

HEARTBEAT_MARGIN_S = 5


class ModelWorker(SimpleWorker):
    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        # Jobs run inline, so nothing heartbeats during one: its timeout plus a margin bounds it.
        return int(job.timeout or self.worker_ttl) + HEARTBEAT_MARGIN_S

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        super().heartbeat(timeout or self.worker_ttl + HEARTBEAT_MARGIN_S, pipeline=pipeline)
        if pipeline is None and not self.connection.sismember(worker_registration.REDIS_WORKER_KEYS, self.key):
            log.warning("worker %s: Redis lost its registration (restarted?); registering again", self.name)
            self.connection.hset(self.key, mapping=self.serialize())
            self.connection.expire(self.key, timeout or self.worker_ttl + HEARTBEAT_MARGIN_S)
            worker_registration.register(self)


def run_worker(settings: Settings, burst: bool = False) -> int:
    if not settings.redis_url:
        raise SystemExit("the worker needs REDIS_URL: it takes its jobs from Redis")
    connection = redis.Redis.from_url(settings.redis_url)
    predictor = Predictor(settings, make_store(settings.redis_url, settings.memory_cache_bytes))
    predictor.models.get(timeout_s=24 * 3600)  # load before announcing ourselves to the web tier
    jobs.install_predictor(predictor)
    queues = [Queue(name, connection=connection) for name in (INTERACTIVE_QUEUE, PREANNOTATE_QUEUE, TRAINING_QUEUE)]
    worker = ModelWorker(
        queues,
        connection=connection,
        worker_ttl=settings.worker_ttl_s,
        maintenance_interval=settings.worker_maintenance_s,
    )
    log.info("worker %s ready, taking jobs from %s", worker.name, [queue.name for queue in queues])
    worker.work(burst=burst, logging_level=settings.log_level, with_scheduler=False)
    return 0
