"""Many annotators clicking against real gunicorn + Redis + a Label Studio stand-in, with faults injected.

Shared by bench/load.py (prints figures) and tests/test_faults.py (asserts nothing is lost). Loopback
only; every loop is bounded in count and in time. Each request ends as one of:
- ok: 200 with a brush result;
- clear error: a 4xx or 503 JSON body with an "error" (the 503s carry Retry-After);
- server error: a 500 or a body that is not the protocol's JSON (there must be none);
- lost: no HTTP answer at all, even after one retry of a refused or reset connection (as Label
  Studio's HTTP adapter retries connection errors, or an annotator clicks again). There must be none.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
import torch

from tests.assets import PROTOCOL_DIR, REPO, build_small_sam, encode, smooth_object_image
from tests.label_studio_standin import LabelStudioStandIn
from tests.services import RedisServer, free_port

ENCODED = re.compile(r"encoded image ([0-9a-f]{12})")
SERVER_TOTAL = re.compile(r"total;dur=([0-9.]+)")
KEYPOINTS_BODY = json.loads((PROTOCOL_DIR / "04-predict-interactive-keypoints.json").read_text())["label_studio_sent"][
    "json"
]


def write_images(upload_dir: Path, count: int, size: tuple[int, int] = (1024, 768), seed: int = 100) -> list[str]:
    """`count` distinct smooth-object JPEGs under upload_dir; returns their Label Studio URLs."""
    upload_dir.mkdir(parents=True, exist_ok=True)
    urls = []
    for index in range(count):
        name = f"load-{seed + index}.jpg"
        (upload_dir / name).write_bytes(encode(smooth_object_image(*size, seed=seed + index)))
        urls.append(f"/data/upload/1/{name}")
    return urls


class GunicornServer:
    """`gunicorn backend.wsgi:app` with the repository's gunicorn.conf.py, logging to one file."""

    def __init__(
        self,
        environment: dict[str, str],
        log_path: Path,
        workers: int = 2,
        threads: int = 4,
        auth: tuple[str, str] | None = None,
    ) -> None:
        self.auth = auth  # basic auth for /health, when the backend is configured with it
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.environment = {
            **os.environ,
            **environment,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "WORKERS": str(workers),
            "THREADS": str(threads),
            "LOG_LEVEL": "INFO",
        }
        self.workers = workers
        self.process: subprocess.Popen | None = None

    def start(self, ready_timeout_s: float = 180.0, models: str = "ready") -> GunicornServer:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child process owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "backend.wsgi:app", "-c", str(REPO / "gunicorn.conf.py")],
            cwd=REPO,
            env=self.environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.wait_ready(ready_timeout_s, models)
        return self

    def worker_pids(self) -> list[int]:
        assert self.process is not None
        children = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid:
                children.append(int(entry.name))
        return sorted(children)

    def wait_ready(self, timeout_s: float, models: str = "ready") -> None:
        """Until every worker has answered /health with its models in state `models`, "ready" (loaded) unless a
        test wants "failed" (in queue mode: has answered)."""
        give_up_at = time.monotonic() + timeout_s
        ready: set[int] = set()
        while time.monotonic() < give_up_at:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}; see {self.log_path}")
            pids = set(self.worker_pids())
            try:
                answer = requests.get(self.url + "/health", timeout=2, auth=self.auth)
                health = answer.json()
                if health.get("models") == models or health.get("inference") == "queue":
                    ready.add(int(answer.headers["X-Worker-Pid"]))
            except (requests.RequestException, ValueError):
                pass
            if len(pids) == self.workers and pids <= ready:
                return
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn workers not ready in {timeout_s:.0f} s; see {self.log_path}")

    def kill_worker(self) -> int:
        """SIGKILL one worker, as the OOM killer would; gunicorn's master starts a new one."""
        victim = self.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        return victim

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def log_offset(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def encodes_since(self, offset: int) -> Counter[str]:
        """Encoder passes per image (digest prefix) logged since `offset`, over all workers."""
        with open(self.log_path, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
        return Counter(ENCODED.findall(text))


@dataclass
class Outcome:
    kind: str  # ok, clear_error, server_error, lost
    status: int | None
    seconds: float
    cache: str | None = None
    retried: bool = False
    detail: str = ""
    server_ms: float | None = None  # the backend's own time (Server-Timing "total"), without HTTP and queueing


@dataclass
class PhaseReport:
    name: str
    outcomes: list[Outcome]
    encodes: Counter[str]
    fault_log: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, kind: str) -> int:
        return sum(outcome.kind == kind for outcome in self.outcomes)

    @property
    def duplicate_encodes(self) -> int:
        return sum(count - 1 for count in self.encodes.values() if count > 1)

    def latency_ms(self, quantile: float) -> float:
        seconds = [outcome.seconds for outcome in self.outcomes if outcome.kind == "ok"]
        return float(np.quantile(seconds, quantile) * 1000) if seconds else float("nan")

    def server_ms(self, quantile: float) -> float:
        times = [outcome.server_ms for outcome in self.outcomes if outcome.kind == "ok" and outcome.server_ms]
        return float(np.quantile(times, quantile)) if times else float("nan")

    def statuses(self) -> dict[str, int]:
        return dict(sorted(Counter(str(outcome.status) for outcome in self.outcomes).items()))

    def summary(self) -> dict:
        return {
            "phase": self.name,
            "requests": len(self.outcomes),
            "ok": self.count("ok"),
            "clear_errors": self.count("clear_error"),
            "server_errors": self.count("server_error"),
            "lost": self.count("lost"),
            "retried_connections": sum(outcome.retried for outcome in self.outcomes),
            "statuses": self.statuses(),
            "cache_hits": sum(outcome.cache == "hit" for outcome in self.outcomes),
            "encodes": sum(self.encodes.values()),
            "duplicate_encodes": self.duplicate_encodes,
            "p50_ms": round(self.latency_ms(0.5), 1),
            "p95_ms": round(self.latency_ms(0.95), 1),
            "server_p50_ms": round(self.server_ms(0.5), 1),
            "server_p95_ms": round(self.server_ms(0.95), 1),
            "seconds": round(self.seconds, 1),
            "faults": self.fault_log,
        }


def click_body(image_url: str, task_id: int, rng: random.Random) -> dict:
    """Label Studio's interactive keypoint request (as recorded), at a random point of another image."""
    body = json.loads(json.dumps(KEYPOINTS_BODY))
    body["tasks"][0]["id"] = task_id
    body["tasks"][0]["data"]["image"] = image_url
    region = body["params"]["context"]["result"][0]
    region["id"] = f"k{rng.randrange(10**9)}"
    region["value"]["x"], region["value"]["y"] = rng.uniform(10, 90), rng.uniform(10, 90)
    return body


def classify(response: requests.Response, seconds: float, retried: bool) -> Outcome:
    try:
        answer = response.json()
    except ValueError:
        return Outcome("server_error", response.status_code, seconds, retried=retried, detail=response.text[:200])
    cache = response.headers.get("X-Embedding-Cache")
    if response.status_code == 200:
        results = answer.get("results") if isinstance(answer, dict) else None
        regions = results[0].get("result", []) if results and isinstance(results[0], dict) else []
        if regions and regions[0].get("type") == "brushlabels":
            server = SERVER_TOTAL.search(response.headers.get("Server-Timing", ""))
            return Outcome("ok", 200, seconds, cache, retried, server_ms=float(server.group(1)) if server else None)
        return Outcome("server_error", 200, seconds, cache, retried, detail=json.dumps(answer)[:200])
    has_error = isinstance(answer, dict) and isinstance(answer.get("error"), str)
    clear = has_error and (400 <= response.status_code < 500 or response.status_code == 503)
    if response.status_code == 503 and not response.headers.get("Retry-After"):
        clear = False
    kind = "clear_error" if clear else "server_error"
    return Outcome(kind, response.status_code, seconds, cache, retried, detail=str(answer.get("error", ""))[:200])


def send_click(session: requests.Session, url: str, body: dict, timeout_s: float) -> Outcome:
    started = time.perf_counter()
    for attempt in range(2):
        try:
            response = session.post(url + "/predict", json=body, timeout=timeout_s)
            return classify(response, time.perf_counter() - started, retried=attempt > 0)
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as error:
            detail = type(error).__name__
            time.sleep(0.2)
        except requests.Timeout:
            return Outcome("lost", None, time.perf_counter() - started, retried=attempt > 0, detail="no answer")
    return Outcome("lost", None, time.perf_counter() - started, retried=True, detail=detail)


def run_phase(
    name: str,
    server: GunicornServer,
    cached_images: list[str],
    fresh_image: str,
    annotators: int,
    clicks: int,
    time_limit_s: float,
    fault: Callable[[], str] | None = None,
    repair: Callable[[], str] | None = None,
    seed: int = 0,
    timeout_s: float = 60.0,
) -> PhaseReport:
    """`annotators` threads click `clicks` times each (or until `time_limit_s`): first all on
    `fresh_image` at once (one encode must serve them all), then 80 % on cached images. `fault` runs
    a third of the way through the clicks, `repair` two thirds."""
    offset = server.log_offset()
    total = annotators * clicks
    done = Counter[str]()
    fault_log: list[str] = []
    events = [(total // 3, fault), (2 * total // 3, repair)]
    mutex = threading.Lock()
    stop_at = time.monotonic() + time_limit_s
    start_together = threading.Barrier(annotators)

    def maybe_inject() -> None:
        with mutex:
            done["clicks"] += 1
            clicked = done["clicks"]
        for at, action in events:
            if action is not None and clicked == at:
                fault_log.append(f"after {clicked} clicks: {action()}")

    def annotator(number: int) -> list[Outcome]:
        rng = random.Random(seed * 1000 + number)
        session = requests.Session()
        outcomes = []
        start_together.wait(timeout=60)
        for click in range(clicks):
            if time.monotonic() > stop_at:
                break
            image = fresh_image if click == 0 or rng.random() < 0.2 else rng.choice(cached_images)
            outcomes.append(send_click(session, server.url, click_body(image, 1000 * number + 1, rng), timeout_s))
            maybe_inject()
        return outcomes

    started = time.perf_counter()
    with ThreadPoolExecutor(annotators) as pool:
        outcomes = [outcome for batch in pool.map(annotator, range(annotators)) for outcome in batch]
    seconds = time.perf_counter() - started
    return PhaseReport(name, outcomes, server.encodes_since(offset), fault_log, seconds)


def warm_up(server: GunicornServer, images: list[str]) -> None:
    """Encode `images` once (through any worker: the embedding is shared in Redis)."""
    rng = random.Random(0)
    session = requests.Session()
    for image in images:
        outcome = send_click(session, server.url, click_body(image, 1, rng), 120)
        if outcome.kind != "ok":
            raise RuntimeError(f"warm-up click on {image} failed: {outcome}")


class LoadRig:
    """Redis, the Label Studio stand-in with `image_count` images, and gunicorn, all on loopback."""

    def __init__(
        self,
        work_dir: Path,
        checkpoint: Path | None = None,
        workers: int = 2,
        threads: int = 4,
        image_count: int = 6,
        predict_deadline_s: float = 5.0,
    ) -> None:
        self.work_dir = work_dir
        self.checkpoint = checkpoint
        self.workers = workers
        self.threads = threads
        self.image_count = image_count
        self.predict_deadline_s = predict_deadline_s

    def __enter__(self) -> LoadRig:
        if self.checkpoint is None:
            self.checkpoint = self.work_dir / "sam_small.pth"
            torch.save(build_small_sam().state_dict(), self.checkpoint)  # Meta's format, as tests/assets
        self.redis = RedisServer(self.work_dir).start()
        media = self.work_dir / "media"
        self.images = write_images(media / "upload" / "1", self.image_count)
        self.label_studio = LabelStudioStandIn(media).start()
        environment = {
            "LABEL_STUDIO_URL": self.label_studio.url,
            "LABEL_STUDIO_API_KEY": self.label_studio.legacy_token,
            "SAM_CHECKPOINT": str(self.checkpoint),
            "REDIS_URL": self.redis.url,
            "PREDICT_DEADLINE": str(self.predict_deadline_s),
            "DOWNLOAD_TIMEOUT": str(self.predict_deadline_s * 4),
            "MODEL_DIR": str(self.work_dir / "models"),
            "TORCH_THREADS": "1",
        }
        self.server = GunicornServer(environment, self.work_dir / "gunicorn.log", self.workers, self.threads)
        try:
            self.server.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.stop()
        self.label_studio.stop()
        self.redis.stop()

    # Faults; each returns a line for the report.
    def kill_redis(self) -> str:
        self.redis.process.kill()
        self.redis.process.wait()
        return "redis-server SIGKILLed"

    def restart_redis(self) -> str:
        self.redis.start()  # same port, empty: it keeps nothing on disk
        return "redis-server restarted (empty)"

    def kill_worker(self) -> str:
        return f"gunicorn worker {self.server.kill_worker()} SIGKILLed"

    def stall(self, image_url: str, seconds: float) -> Callable[[], str]:
        def start() -> str:
            self.label_studio.stalls[image_url] = seconds
            return f"downloads of {image_url} stall {seconds:g} s"

        return start

    def unstall(self, image_url: str) -> Callable[[], str]:
        def stop() -> str:
            self.label_studio.stalls.pop(image_url, None)
            return f"downloads of {image_url} answer again"

        return stop
