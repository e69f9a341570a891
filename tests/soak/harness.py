"""The soak: a project of N imported tasks walked in order by two annotators against the real processes of a queue-mode
deployment, with a cache that holds a tenth of the project, restarts, torn bookkeeping lines and webhooks throughout.

Processes (all on loopback, see tests/services.py and tests/load_harness.py): gunicorn (INFERENCE=queue), RQ workers
(`python -m backend worker`, the reduced-size SAM of tests/assets.py), two redis-servers laid out as
docker/docker-compose.yml lays them out (REDIS_URL: queue, noeviction; CACHE_REDIS_URL: embeddings, allkeys-lru with a
maxmemory of N/10 embeddings, sized from the first embedding stored), and the Label Studio stand-in serving the images.

The walk: Label Studio's sequential sampling hands each annotator the next task not yet taken. Per task the annotator
clicks once on opening it (the first click, whose X-Embedding-Cache header is counted), once more (warm), submits its
annotation (ANNOTATION_CREATED, a brush mask), every UPDATE_EVERY-th task updates the annotation before it
(ANNOTATION_UPDATED), then dwells DWELL_FACTOR x the encode time measured first. The project's tasks arrive by
TASKS_CREATED webhooks in batches, each sent when the walk comes within IMPORT_LEAD tasks of the last one imported.

Faults, at fractions of the walk (FAULTS): the web tier SIGTERMed and started again three times, one RQ worker
SIGTERMed and replaced, the cache Redis restarted (empty: it keeps nothing on disk), and one unfinished line appended to
each bookkeeping file (MODEL_DIR/<project>/imported-tasks.jsonl, the imported tasks; encoded-images.jsonl, the
coverage list). The queue Redis is not restarted: it holds the queued jobs, which the compose file keeps in memory only
(`--save ""`), so restarting it is a deploy that drops work by design rather than a fault the backend can absorb.

A request that finds no listening socket (the web tier between its SIGTERM and its restart) is sent again until the
web tier is back, as an annotator clicks again; Label Studio never resends a webhook, so an annotation submitted
exactly then would be lost before reaching the backend, and the soak resends it so that it tests what the backend
keeps once it has answered.

`run_soak` returns a SoakReport; tests/soak/test_soak.py asserts on it.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import redis
import requests
import torch
from rq import Queue
from rq.registry import StartedJobRegistry

from backend.config import Settings
from backend.inference.queue import WORKER_QUEUES
from bench.annotator_walk import tasks_created
from tests.assets import build_small_sam
from tests.label_studio_standin import LabelStudioStandIn
from tests.load_harness import GunicornServer, Outcome, classify, click_body, write_images
from tests.services import RedisServer, Workers
from tests.test_active_learning import annotation_event

DEFAULTS = Settings.from_env({})
PROJECT = 1
LABEL_STUDIO_PROJECT = f"{PROJECT}.1795623701"  # as Label Studio names the project in a /predict body
IMAGE_SIZE = (512, 384)
UPDATE_EVERY = 5
RECONNECT_S = 120.0  # how long a request is sent again while nothing listens (a web tier restarting)
CLICK_TIMEOUT_S = 120.0
STOP_GRACE_S = 30.0  # between a worker's SIGTERM and its SIGKILL
# A worker's log line of a one-time cost: the end of a training, or a fine-tuned version loaded to serve.
ONE_TIME_COST = re.compile(
    r"^(?P<at>\S+ \S+) \w+ (?P<pid>\d+) backend\.(?P<what>training\.trainer: project \d+: wrote v"
    r"|decoders\.serving: project \d+: serving fine-tuned decoder)"
)
WARMED_UP_AT = 0.55  # RSS is compared between this point of the walk (after every fault) and its end
FAULTS = (
    (0.10, "restart_web"),
    (0.20, "tear_imported_tasks"),
    (0.25, "restart_worker"),
    (0.30, "restart_web"),
    (0.35, "restart_cache_redis"),
    (0.40, "tear_coverage"),
    (0.45, "restart_web"),
)
TORN = {"tear_imported_tasks": "imported-tasks.jsonl", "tear_coverage": "encoded-images.jsonl"}


@dataclass(frozen=True)
class SoakPlan:
    tasks: int = 500
    annotators: int = 2
    cache_share: float = 0.1  # of the project's embeddings the cache Redis holds
    workers: int = 2
    dwell_factor: float = 1.5  # an annotator's time on a task, in encode times
    first_import: float = 0.2  # share of the tasks imported before the walk starts
    import_batch: float = 0.1  # share of the tasks in each later TASKS_CREATED
    import_lead: int = 10  # the next batch is imported when the walk comes this close to the last task imported
    drain_s: float = 600.0  # how long the inbox may take to empty after the walk

    @property
    def cache_entries(self) -> int:
        return max(1, math.ceil(self.tasks * self.cache_share))


@dataclass(frozen=True)
class RssSample:
    round: int  # samples of one round were taken together
    fraction: float  # of the walk's tasks taken by then
    role: str  # web (a gunicorn worker) or worker (an RQ worker)
    pid: int
    bytes: int
    after_faults: bool  # every fault had run (a fault held up, e.g. by a worker's grace period, runs late)
    at: float  # time.time() when taken


@dataclass
class FirstClick:
    index: int  # of the task in the walk
    outcome: Outcome


@dataclass
class SoakReport:
    plan: SoakPlan
    encode_s: float
    dwell_s: float
    cache_bytes: int
    entry_bytes: int
    first_clicks: list[FirstClick] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)  # every click
    webhooks: list[tuple[str, int | None, str]] = field(default_factory=list)  # (action, status, answer status)
    reconnects: int = 0
    faults: list[str] = field(default_factory=list)
    watch_error: str | None = None  # a fault that failed to run, after which none ran
    filled_at: int | None = None  # tasks taken when the cache first filled
    rss: list[RssSample] = field(default_factory=list)
    # Per RQ worker, when its one-time costs were behind it: its first training and its first fine-tuned version
    # loaded (bench/worker_memory.py: +144 MiB in the first round of both, +39 in the second, none after).
    warm_from: dict[int, float] = field(default_factory=dict)
    submitted: set[int] = field(default_factory=set)  # annotation ids the backend answered "queued" for
    trained: set[int] = field(default_factory=set)  # in the training set (MODEL_DIR/<project>/annotations)
    in_inbox: set[int] = field(default_factory=set)
    set_aside: list[str] = field(default_factory=list)  # events in failed/
    versions: list[str] = field(default_factory=list)
    training_set_listed: int | None = None  # annotations /versions counts in the training set
    log_lines: int = 0
    top_log_lines: list[tuple[str, int]] = field(default_factory=list)
    walk_s: float = 0.0
    total_s: float = 0.0  # processes started, calibration, walk, drain and accounting
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at the walk's start and end

    @property
    def server_errors(self) -> list[str]:
        clicks = [f"click {o.status}: {o.detail}" for o in self.outcomes if o.status is None or o.status >= 500]
        hooks = [f"{action} {status}: {answer}" for action, status, answer in self.webhooks if status != 200]
        return clicks + hooks

    @property
    def lost(self) -> set[int]:
        return self.submitted - self.trained - self.in_inbox

    @property
    def counted_first_clicks(self) -> list[FirstClick]:
        """The first clicks on the tasks taken after the cache first filled."""
        filled_at = self.filled_at
        return [] if filled_at is None else [click for click in self.first_clicks if click.index >= filled_at]

    @property
    def hit_rate(self) -> float:
        counted = self.counted_first_clicks
        return sum(click.outcome.cache == "hit" for click in counted) / len(counted) if counted else 0.0

    def rss_compared(self, role: str) -> dict[int, tuple[int, int]]:
        """Per process of the role, its RSS (bytes) at its warmed-up point and at the end: the first sample after
        WARMED_UP_AT of the walk, every fault, and its own one-time costs (`warm_from`), and the last sample (taken
        once every job was done). A process with no sample between the two is left out."""
        last_round = max((sample.round for sample in self.rss), default=0)
        compared = {}
        for pid in {sample.pid for sample in self.rss if sample.role == role}:
            own = [sample for sample in self.rss if sample.pid == pid]
            end = [sample for sample in own if sample.round == last_round]
            warmed = [
                sample
                for sample in own
                if sample.round != last_round
                and sample.fraction >= WARMED_UP_AT
                and sample.after_faults
                and sample.at >= self.warm_from.get(pid, 0.0)
            ]
            if warmed and end:
                compared[pid] = (warmed[0].bytes, end[0].bytes)
        return compared

    def rss_growth(self) -> dict[str, float]:
        """Per role, the largest end / warmed-up RSS ratio over its processes."""
        return {
            role: max((end / warm for warm, end in self.rss_compared(role).values()), default=math.nan)
            for role in ("web", "worker")
        }

    def rss_mib(self, role: str) -> list[float]:
        """The role's RSS summed over the processes compared, MiB, at their warmed-up points and at the end."""
        compared = self.rss_compared(role).values()
        return [round(sum(pair[index] for pair in compared) / 2**20, 1) for index in (0, 1)]

    def rss_mib_per_process(self, role: str) -> dict[int, list[float]]:
        """Per process compared, its RSS in MiB at its warmed-up point and at the end."""
        return {
            pid: [round(warm / 2**20, 1), round(end / 2**20, 1)] for pid, (warm, end) in self.rss_compared(role).items()
        }

    @property
    def log_lines_per_click(self) -> float:
        return self.log_lines / max(1, len(self.outcomes))

    def summary(self) -> dict:
        counted = self.counted_first_clicks
        ok_first = [c.outcome.seconds for c in counted if c.outcome.kind == "ok"]
        return {
            "tasks": self.plan.tasks,
            "annotators": self.plan.annotators,
            "rq_workers": self.plan.workers,
            "cache_entries": self.plan.cache_entries,
            "cache_bytes": self.cache_bytes,
            "entry_bytes": self.entry_bytes,
            "encode_s": round(self.encode_s, 3),
            "dwell_s": round(self.dwell_s, 3),
            "walk_s": round(self.walk_s, 1),
            "total_s": round(self.total_s, 1),
            "load_avg_1m": f"{self.load[0]:.2f}->{self.load[1]:.2f}",
            "clicks": len(self.outcomes),
            "webhooks": len(self.webhooks),
            "server_errors": self.server_errors[:10],
            "reconnects": self.reconnects,
            "cache_filled_at_task": self.filled_at,
            "first_clicks_after_fill": len(counted),
            "first_click_hit_rate": round(self.hit_rate, 4),
            "first_click_misses_at": [c.index for c in counted if c.outcome.cache != "hit"][:50],
            "first_click_p50_s": round(float(np.median(ok_first)), 3) if ok_first else None,
            "annotations_submitted": len(self.submitted),
            "in_training_set": len(self.trained & self.submitted),
            "in_inbox": len(self.in_inbox & self.submitted),
            "lost": sorted(self.lost)[:20],
            "set_aside": self.set_aside[:10],
            "versions": self.versions,
            "training_set_listed": self.training_set_listed,
            "rss_growth": {role: round(ratio, 3) for role, ratio in self.rss_growth().items()},
            "rss_mib_warm_end": {role: self.rss_mib(role) for role in ("web", "worker")},
            "rss_mib_per_process": {role: self.rss_mib_per_process(role) for role in ("web", "worker")},
            "log_lines_per_click": round(self.log_lines_per_click, 2),
            "top_log_lines": self.top_log_lines,
            "faults": self.faults,
            "watch_error": self.watch_error,
        }


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def annotation_mask(index: int) -> np.ndarray:
    """A rectangle that moves with the task: a brush region every task has, never empty."""
    width, height = IMAGE_SIZE
    mask = np.zeros((height, width), bool)
    left, top = 20 + (index * 7) % (width // 2), 20 + (index * 5) % (height // 2)
    mask[top : top + height // 3, left : left + width // 3] = True
    return mask


def log_template(line: str) -> str:
    """A log line without its numbers, ids and timestamps, so that repeats of one message count together."""
    return re.sub(r"[0-9a-f]{6,}|\d+(\.\d+)?", "#", line)[:120]


class Soak:
    """Starts the processes, walks, injects the faults; `run()` returns the report."""

    def __init__(self, plan: SoakPlan, work_dir: Path) -> None:
        self.plan = plan
        self.work_dir = work_dir
        self.model_dir = work_dir / "models"
        self.project_dir = self.model_dir / str(PROJECT)
        self.mutex = threading.Lock()
        self.taken = 0  # tasks handed to annotators
        self.imported = 0
        self.first_id = 1
        self.done = threading.Event()
        self.import_mutex = threading.Lock()  # one TASKS_CREATED at a time, in order
        self.report_reconnects = 0
        self.rss_round = 0

    # Processes.
    def start(self) -> None:
        checkpoint = self.work_dir / "sam_small.pth"
        torch.save(build_small_sam().state_dict(), checkpoint)
        (self.work_dir / "queue").mkdir()
        (self.work_dir / "cache").mkdir()
        self.queue_redis = RedisServer(self.work_dir / "queue", "--maxmemory-policy", "noeviction").start()
        self.cache_redis = RedisServer(self.work_dir / "cache", "--maxmemory-policy", "allkeys-lru").start()
        media = self.work_dir / "media"
        self.calibration = write_images(media / "upload" / "1", 1, IMAGE_SIZE, seed=99_000)[0]
        self.urls = write_images(media / "upload" / "1", self.plan.tasks, IMAGE_SIZE, seed=100)
        self.label_studio = LabelStudioStandIn(media).start()
        self.environment = {
            "LABEL_STUDIO_URL": self.label_studio.url,
            "LABEL_STUDIO_API_KEY": self.label_studio.legacy_token,
            "SAM_CHECKPOINT": str(checkpoint),
            "REDIS_URL": self.queue_redis.url,
            "CACHE_REDIS_URL": self.cache_redis.url,
            "INFERENCE": "queue",
            "MODEL_DIR": str(self.model_dir),
            "JOB_TIMEOUT": "60",
            "PREDICT_DEADLINE": "60",
            "DOWNLOAD_TIMEOUT": "30",
            "TORCH_THREADS": "1",
            # The shipped worker lease, not tests/services.py's 3 s: on a loaded machine a 3 s registration lapses
            # between heartbeats and the web tier answers 503 "no inference worker is running".
            "WORKER_TTL": str(DEFAULTS.worker_ttl_s),
            "WORKER_MAINTENANCE_INTERVAL": str(DEFAULTS.worker_maintenance_s),
            # A few small trainings over the walk: what the soak checks is that each annotation reaches one.
            "TRAIN_AFTER_ANNOTATIONS": str(max(10, self.plan.tasks // 4)),
            "TRAIN_STEPS": "4",
            "TRAIN_BATCH_SIZE": "2",
            "TRAIN_CORRECTION_ROUNDS": "0",
        }
        self.logs = self.work_dir / "logs"
        self.logs.mkdir()
        self.workers = Workers(self.queue_redis.url, checkpoint, self.logs)
        self.workers.start(self.plan.workers, **self.environment)
        self.server = GunicornServer(self.environment, self.logs / "gunicorn.log", workers=2, threads=4)
        self.server.start()

    def stop(self) -> None:
        """Whatever `start` got to start, also when it failed half-way."""
        for name in ("server", "workers", "label_studio", "queue_redis", "cache_redis"):
            if (started := getattr(self, name, None)) is not None:
                started.stop()

    def calibrate(self) -> tuple[float, int]:
        """Encode time (cold click minus warm click, on an image outside the project) and the cache entry's bytes;
        then the cache Redis is bounded to the plan's share of the project and emptied."""
        session = requests.Session()
        rng = random.Random(0)
        self.wait_workers()
        cold = self.click(session, 99_000, self.calibration, rng)
        warm = self.click(session, 99_000, self.calibration, rng)
        if cold.kind != "ok" or warm.kind != "ok":
            raise RuntimeError(f"calibration clicks failed: {cold}, {warm}")
        cache = redis.Redis.from_url(self.cache_redis.url)
        entries = [key for key in cache.scan_iter("sam:emb:*") if not key.endswith(b":lock")]
        entry_bytes = max(cache.memory_usage(key, samples=0) or 0 for key in entries)
        cache.flushall()
        baseline = cache.info("memory")["used_memory"]
        self.cache_bytes = baseline + self.plan.cache_entries * entry_bytes
        self.cache_redis.options = (*self.cache_redis.options, "--maxmemory", str(self.cache_bytes))
        cache.config_set("maxmemory", self.cache_bytes)
        return max(0.05, cold.seconds - warm.seconds), entry_bytes

    def wait_workers(self) -> None:
        give_up = time.monotonic() + 180
        while requests.get(self.server.url + "/status", timeout=10).json().get("workers", 0) < self.plan.workers:
            if time.monotonic() > give_up:
                raise RuntimeError("the RQ workers never showed in /status")
            time.sleep(0.5)

    # Requests.
    def post(self, session: requests.Session, path: str, body: dict) -> tuple[requests.Response | None, int]:
        """POST, sent again while nothing listens (a web tier restarting) for up to RECONNECT_S; the retries made."""
        give_up = time.monotonic() + RECONNECT_S
        retries = 0
        while True:
            try:
                return session.post(self.server.url + path, json=body, timeout=CLICK_TIMEOUT_S), retries
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
                if time.monotonic() > give_up:
                    return None, retries
                retries += 1
                time.sleep(0.25)

    def click(self, session: requests.Session, task_id: int, image_url: str, rng: random.Random) -> Outcome:
        body = click_body(image_url, task_id, rng)
        body["project"] = LABEL_STUDIO_PROJECT
        started = time.perf_counter()
        response, retries = self.post(session, "/predict", body)
        with self.mutex:
            self.report_reconnects += retries
        if response is None:
            return Outcome("lost", None, time.perf_counter() - started, retried=True, detail="no web tier")
        return classify(response, time.perf_counter() - started, retried=retries > 0)

    def webhook(self, session: requests.Session, body: dict) -> dict:
        response, retries = self.post(session, "/webhook", body)
        status = response.status_code if response is not None else None
        try:
            answer = response.json() if response is not None else {}
        except ValueError:
            answer = {"status": response.text[:100] if response is not None else ""}
        with self.mutex:
            self.report_reconnects += retries
            self.report.webhooks.append((body["action"], status, str(answer.get("status"))))
        return answer if status == 200 else {}

    def annotate(self, session: requests.Session, action: str, index: int, seed: int) -> None:
        annotation_id = self.first_id + index
        body = annotation_event(
            action, PROJECT, annotation_id, self.first_id + index, self.urls[index], annotation_mask(seed)
        )
        if self.webhook(session, body).get("status") == "queued":
            with self.mutex:
                self.report.submitted.add(annotation_id)

    def import_more(self, session: requests.Session) -> None:
        """The next TASKS_CREATED batch, sent by the annotator who comes near the end of what was imported."""
        batch = max(1, round(self.plan.tasks * (self.plan.import_batch if self.imported else self.plan.first_import)))
        start, end = self.imported, min(self.plan.tasks, self.imported + batch)
        body = tasks_created(PROJECT, self.first_id + start, self.urls[start:end])
        if self.webhook(session, body).get("status") not in ("queued", "recorded"):
            raise RuntimeError(f"TASKS_CREATED for tasks {start}..{end} refused")
        self.imported = end

    def next_task(self, session: requests.Session) -> int | None:
        with self.mutex:
            if self.taken >= self.plan.tasks:
                return None
            index = self.taken
            self.taken += 1
        with self.import_mutex:
            while self.imported < self.plan.tasks and index + self.plan.import_lead >= self.imported:
                self.import_more(session)
        return index

    def annotator(self, number: int) -> None:
        session = requests.Session()
        rng = random.Random(number)
        while (index := self.next_task(session)) is not None:
            task_id, url = self.first_id + index, self.urls[index]
            first = self.click(session, task_id, url, rng)
            warm = self.click(session, task_id, url, rng)
            self.annotate(session, "ANNOTATION_CREATED", index, index)
            if index % UPDATE_EVERY == 0 and index > 0:
                self.annotate(session, "ANNOTATION_UPDATED", index - 1, index + 10_000)
            with self.mutex:
                self.report.first_clicks.append(FirstClick(index, first))
                self.report.outcomes.extend((first, warm))
            time.sleep(self.report.dwell_s)

    # Faults and observation, from one thread.
    def restart_web(self) -> str:
        old = self.server.worker_pids()
        self.server.stop()  # SIGTERM to gunicorn's master: its workers finish the requests they hold
        self.server.start()
        return f"web tier SIGTERMed (workers {old}) and started again (workers {self.server.worker_pids()})"

    def restart_worker(self) -> str:
        """As a deploy stops a container: SIGTERM, then SIGKILL after the grace period (Kubernetes' default)."""
        process = self.workers.processes[0]
        process.send_signal(signal.SIGTERM)  # RQ's warm shutdown: the job it holds may end first
        try:
            process.wait(timeout=STOP_GRACE_S)
            how = "exited"
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            how = f"still running after {STOP_GRACE_S:g} s: SIGKILLed"
        self.workers.start(1, **self.environment)  # the dead one stays listed: the new log gets its own name
        return f"RQ worker {process.pid} SIGTERMed ({how}, code {process.returncode}), a new one started"

    def restart_cache_redis(self) -> str:
        self.cache_redis.stop()
        self.cache_redis.start()  # same port and maxmemory, empty
        return "cache redis-server SIGTERMed and started again (empty)"

    def tear(self, name: str) -> str:
        path = self.project_dir / name
        if not path.is_file():
            raise RuntimeError(f"{path} does not exist: the bookkeeping file moved, and the soak must follow it")
        with open(path, "ab") as handle:
            handle.write(b'{"id": 4')  # an append cut short: a full disk, a kill mid-write
        return f"torn line appended to {name}"

    def watch(self) -> None:
        try:
            self.observe_and_inject()
        except Exception as error:  # the walk goes on; the report says why the faults stopped
            self.report.watch_error = f"{type(error).__name__}: {error}"[:2000]
            while not self.done.wait(1.0):
                self.sample_rss(self.taken / self.plan.tasks)

    def observe_and_inject(self) -> None:
        """Runs the faults at their points of the walk, samples RSS and notes when the cache first fills."""
        pending = list(FAULTS)
        cache = redis.Redis.from_url(self.cache_redis.url, socket_timeout=2)
        while not self.done.is_set():
            with self.mutex:
                fraction = self.taken / self.plan.tasks
            if self.report.filled_at is None:
                try:
                    info = {**cache.info("memory"), **cache.info("stats")}
                    if info["evicted_keys"] > 0 or info["used_memory"] >= 0.9 * self.cache_bytes:
                        self.report.filled_at = self.taken
                except redis.RedisError:
                    pass
            self.sample_rss(fraction)
            if pending and fraction >= pending[0][0]:
                at, name = pending.pop(0)
                line = self.tear(TORN[name]) if name in TORN else getattr(self, name)()
                self.report.faults.append(f"at {at:.0%} of the walk (task {self.taken}): {line}")
            time.sleep(1.0)

    def sample_rss(self, fraction: float) -> None:
        self.rss_round += 1
        processes = [("web", pid) for pid in self.server.worker_pids()] + [
            ("worker", process.pid) for process in self.workers.processes if process.poll() is None
        ]
        for role, pid in processes:
            if (rss := rss_bytes(pid)) is not None:
                after_faults = len(self.report.faults) == len(FAULTS) or self.report.watch_error is not None
                self.report.rss.append(RssSample(self.rss_round, fraction, role, pid, rss, after_faults, time.time()))

    # After the walk.
    def drain(self) -> None:
        """Until the inbox is empty (every event applied or set aside) and no job is queued or running, or drain_s;
        then the last RSS sample, of idle processes: one taken at the walk's end caught a worker in a training,
        whose working memory then read as growth."""
        inbox = self.project_dir / "inbox"
        give_up = time.monotonic() + self.plan.drain_s
        while time.monotonic() < give_up and (inbox.is_dir() and any(inbox.glob("*.json")) or self.jobs_left()):
            time.sleep(1)
        self.sample_rss(1.0)

    def jobs_left(self) -> bool:
        connection = redis.Redis.from_url(self.queue_redis.url)
        return any(
            Queue(name, connection=connection).count or StartedJobRegistry(name, connection=connection).count
            for name in WORKER_QUEUES
        )

    def account(self) -> None:
        report = self.report
        annotations = self.project_dir / "annotations"
        report.trained = {int(path.stem) for path in annotations.glob("*.npz")} if annotations.is_dir() else set()
        for path in sorted((self.project_dir / "inbox").glob("*.json")):
            event = json.loads(path.read_text())
            if isinstance(event.get("annotation"), dict):
                report.in_inbox.add(event["annotation"]["id"])
        failed = self.project_dir / "failed"
        report.set_aside = sorted(path.name for path in failed.glob("*.json")) if failed.is_dir() else []
        listing = requests.get(self.server.url + "/versions", params={"project": PROJECT}, timeout=30).json()
        report.versions = [version["name"] for version in listing.get("versions", [])]
        report.training_set_listed = listing.get("training_set", {}).get("annotations")

    def note_warm_up(self) -> None:
        """When each RQ worker had its first training and first fine-tuned version behind it (`warm_from`), from
        the workers' logs."""
        firsts: dict[tuple[int, str], float] = {}
        for path in self.logs.glob("worker*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if (found := ONE_TIME_COST.match(line)) is None:
                    continue
                at = datetime.strptime(found["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # noqa: DTZ007 (local)
                key = (int(found["pid"]), found["what"])
                firsts[key] = min(at, firsts.get(key, at))
        for (pid, _), at in firsts.items():
            self.report.warm_from[pid] = max(at, self.report.warm_from.get(pid, 0.0))

    def count_logs(self, offsets: dict[Path, int]) -> None:
        templates: Counter[str] = Counter()
        lines = 0
        for path in sorted(self.logs.glob("*.log")):
            with open(path, "rb") as handle:
                handle.seek(offsets.get(path, 0))
                for line in handle.read().decode("utf-8", "replace").splitlines():
                    lines += 1
                    templates[log_template(line)] += 1
        self.report.log_lines = lines
        self.report.top_log_lines = templates.most_common(8)

    def run(self) -> SoakReport:
        began = time.monotonic()
        try:
            self.start()
            encode_s, entry_bytes = self.calibrate()
            self.report = SoakReport(
                self.plan, encode_s, self.plan.dwell_factor * encode_s, self.cache_bytes, entry_bytes
            )
            offsets = {path: path.stat().st_size for path in self.logs.glob("*.log")}
            self.report.load = (os.getloadavg()[0], 0.0)
            watcher = threading.Thread(target=self.watch, daemon=True)
            started = time.monotonic()
            watcher.start()
            annotators = [threading.Thread(target=self.annotator, args=(n,)) for n in range(self.plan.annotators)]
            for thread in annotators:
                thread.start()
            for thread in annotators:
                thread.join()
            self.report.walk_s = time.monotonic() - started
            self.report.load = (self.report.load[0], os.getloadavg()[0])
            self.done.set()
            watcher.join()
            self.report.reconnects = self.report_reconnects
            self.count_logs(offsets)
            self.drain()
            self.note_warm_up()
            self.account()
            self.report.total_s = time.monotonic() - began
            return self.report
        finally:
            self.stop()


def run_soak(plan: SoakPlan, work_dir: Path) -> SoakReport:
    return Soak(plan, work_dir).run()
